#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), Python 3.12 wheels of what a GPU
# machine with only JAX's own stack (jax, flax, optax, orbax, Pillow, absl,
# PyYAML, protobuf, cloudpickle, etils, psutil) lacks for the benchmark:
# grain and ml_collections. Run once where pip can reach the package index,
# then copy the checkout with its .whl/ to the GPU machine;
# launch/bench_h200.sh installs them there.
#
#   ml_collections  imported by the model and the configs
#   grain           imported by the data pipeline (pipeline.Augment)
#   array_record, portpicker   grain's requirements missing there
# clu is not needed: only train.train_and_evaluate imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0
ls -l .whl
