#!/usr/bin/env bash
# Runs MedBridge-JAX on every worker of a Cloud TPU pod slice.
#
# The same command runs on all workers; JAX finds the other hosts through the
# TPU metadata (jax.distributed.initialize() with no arguments), and each host
# reads its own shard of the data. Data and checkpoints must sit on storage
# that every worker sees (e.g. a gs:// bucket for the prepared ArrayRecord
# shards and for the workdir).
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [extra --config.* flags]
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; shift 3
CONFIG=${CONFIG:-configs/in_domain.py}
REPO=${REPO:-~/medbridge_jax}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd $REPO
  python3 -m pip install -q -e . 'jax[tpu]'
  MEDBRIDGE_MULTIHOST=1 python3 -m medbridge_jax.main \
      --config=$CONFIG --workdir=$WORKDIR $*
"
