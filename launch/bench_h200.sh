#!/usr/bin/env bash
# The GPU benchmark as one script (about 5-8 minutes on one H200).
#
# Measures, on this machine's first GPU: the bf16 matmul ceiling; the frozen
# forward of a CLIP ViT-B/16 at 224 px (random weights), batch 256, with the
# attention MedBridge picks (model.attention_impl=auto: cuDNN on NVIDIA GPUs)
# and again with XLA's; MedBridge's train and eval steps with the default
# views and experts (N = 5 training views, every sliding window at
# evaluation, K = 2), each against its N x K frozen forwards; and the input
# pipeline on the machine's CPU cores (1024 px PNG/JPEG -> 256 px, augmented,
# and records of prepared ArrayRecord shards).
#
# Usage, in the repository root of an installed checkout (pip install -e .):
#   bash launch/bench_h200.sh            # OUT=/tmp/bench_out by default
# JSON lines go to stdout and to $OUT/bench_h200.jsonl, the full log to
# $OUT/bench_h200.log; README's performance table reads them. On a machine
# without the package index and without grain or ml_collections installed,
# put their wheels in .whl/ first (launch/fetch_wheels.sh, run where pip
# can reach an index); the script installs them under /tmp/site.
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG="$OUT/bench_h200.log"
JSONL="$OUT/bench_h200.jsonl"
: >"$JSONL"

# The image lacks grain and ml_collections (shared NOTES): install the
# carried wheels into /tmp/site, outside the image's environment.
if ! "$PY" -c "import grain, ml_collections" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "bench_h200: no .whl/ wheels: run launch/fetch_wheels.sh here and" \
         "carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 MEDBRIDGE_CACHE=/tmp/medbridge_cache
export TF_CPP_MIN_LOG_LEVEL=1

{
  date -u; nproc; nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
  "$PY" -c "import jax, flax, sys; print(sys.version.split()[0], jax.__version__, flax.__version__, jax.devices())"
} 2>&1 | tee -a "$LOG"

bench() {  # bench SECONDS FLAGS...: one invocation, JSON lines kept.
  local limit=$1; shift
  echo "== medbridge_jax.bench $*" | tee -a "$LOG"
  timeout "$limit" "$PY" -m medbridge_jax.bench "$@" 2>>"$LOG" \
    | tee -a "$JSONL"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

# BENCH_FLAGS / BENCH_WORKERS override the model flags / pipeline workers
# (e.g. a dry run of this script on a CPU with --expert=tiny).
read -ra B16 <<<"${BENCH_FLAGS:---expert=vit_b16 --batch=256 \
--dtype=bfloat16 --steps=10 --warmup=2}"
# matmul + forward (auto: cuDNN) + train + eval.
bench 330 "${B16[@]}" --what=train,eval
# The forward with XLA attention: what cuDNN buys.
bench 120 "${B16[@]}" --what=forward --attention=xla
# The input pipeline on the machine's cores (CPU only): files, then shards.
bench 90 "${B16[@]}" --what=pipeline --pipeline_images=200 \
  --pipeline_workers="${BENCH_WORKERS:-$(nproc)}" --input_size=1024
bench 120 "${B16[@]}" --what=pipeline --pipeline_images=200 \
  --pipeline_workers="${BENCH_WORKERS:-$(nproc)}" --pipeline_source=shards
echo "== done: $(wc -l <"$JSONL") JSON lines" | tee -a "$LOG"
