#!/usr/bin/env bash
# The GPU benchmark as one script (~5-8 minutes on one H200).
#
# CLIP ViT-B/16 at 224 px (random weights), bf16 frozen stream, batch 256,
# N views and K experts of the default config (N=5 training views, every
# sliding window in evaluation, K=2): matmul ceiling, frozen forward (cuDNN
# attention under attention_impl=auto), MedBridge train and eval steps; the
# forward again with XLA attention for comparison; the input pipeline on 16
# CPU worker processes (1024 px PNG/JPEG -> 256 px, augmented).
#
# From a session with the GPU, in the repo root:
#   bash launch/fetch_wheels.sh      # here, once: grain, ml_collections...
#   run(command="bash launch/bench_h200.sh", carry=[".whl"], timeout_s=600)
# JSON lines go to stdout and to $OUT/bench_h200.jsonl; the full log to
# $OUT/bench_h200.log. They are the numbers for README's performance table.
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
# The input pipeline on the machine's 16 cores (CPU only).
bench 90 "${B16[@]}" --what=pipeline --pipeline_images=200 \
  --pipeline_workers="${BENCH_WORKERS:-16}" --input_size=1024
echo "== done: $(wc -l <"$JSONL") JSON lines" | tee -a "$LOG"
