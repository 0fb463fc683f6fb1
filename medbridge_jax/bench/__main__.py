r"""The benchmark harness: one JSON line per measurement.

  python -m medbridge_jax.bench --expert=tiny                  # CPU, seconds
  python -m medbridge_jax.bench --expert=vit_b16 --batch=256 --dtype=bfloat16
  python -m medbridge_jax.bench --expert="clip:width=768,layers=12,heads=12,\
patch=16,image=224" --what=forward,matmul

Measurements (--what, comma-separated, or "all"), in this order:
  matmul    an (n, n) x (n, n) jitted matmul in --dtype: the ceiling;
  forward   one frozen expert tower on B views (bf16 stream with
            --dtype=bfloat16; params float32, cast at use);
  train     the project's MedBridge train step (train_step.make_train_step) on B
            stored images: N views x K experts, Query-Encoders, fusion, MoE,
            loss, backward, AdamW;
  eval      the project's evaluation step (evaluate.make_model_fn): every
            sliding window, so N is larger than in training;
  pipeline  decode + resize + augment of --input_size px PNG/JPEG files (or,
            with --pipeline_source=shards, records of ArrayRecord shards
            prepared at --image_size) with
            the data pipeline's own functions, per CPU worker.
train and eval need forward (their overhead ratio) and forward needs matmul
(its ceiling): asking for one measures what it needs too.

Each line: name, date, machine, cpu_count, platform, device_kind,
device_count, jax, expert, arch (the spec), image_side (the expert's input),
image_size (the stored image), batch, dtype, attention_frozen /
attention_query (the kernels `layers.choose_attention` picks for the frozen
image stream and the differentiated query stream), views (N), experts (K),
steps, images_per_s, step_ms (median of the timed steps), tflops,
ceiling_tflops, ceiling_fraction, overhead_ratio, peak_memory_bytes,
compiles, transfer_guard; the pipeline line adds workers,
images_per_s_per_worker and input_size.

  tflops          analytic (bench/flops.py): for forward, the ViT's
                  FLOPs per view times views/s; for train and eval, those of
                  the N x K frozen forwards inside the step (not the query
                  stream, fusion or backward).
  overhead_ratio  images_per_s(step) * N * K / images_per_s(forward): 1.0
                  means the step costs exactly N x K frozen forwards of the
                  batch (the target for train on a GPU: >= 0.85).
  compiles        XLA compilations during the warm-up and timed calls of
                  that step: 1 means compiled once for its shapes.
  peak_memory_bytes  the device's high-water mark so far (null on CPU).

Timing: --warmup calls (the first compiles), then --steps calls, each
blocked on, under jax.transfer_guard("disallow") with every input already
on the device; step_ms is their median.

--plan measures nothing but the matmul ceiling: it compiles the train and
eval steps of real configurations ahead of time from shapes alone
(bench/plan.py has its fields), one JSON line per configuration, image
size and step (name "plan"), then with --plan_format=markdown a table:

  python -m medbridge_jax.bench --plan --plan_format=markdown
  python -m medbridge_jax.bench --plan --plan_configs=b16_224 \
      --image_size=1024 --batch=16

--plan_configs (plan.CONFIGS, or all), --batch (training images per
device), --plan_eval_batch (0: the default config's), --image_size (0:
1024 and 2048), --dtype (bfloat16 unless given), --attention,
--matmul_size, --steps and --warmup (the ceiling) and --plan_reserve.
"""

import json
import sys

from absl import app
from absl import flags

from medbridge_jax import errors
from medbridge_jax.bench import harness
from medbridge_jax.bench import plan

PROGRAM = "medbridge_jax.bench"

_EXPERT = flags.DEFINE_string(
    "expert", "tiny", "tiny | vit_b16 | a random-expert spec such as "
    "'clip:width=768,layers=12,heads=12,patch=16,image=224'.")
_BATCH = flags.DEFINE_integer(
    "batch", 32, "B: views per forward call; stored images per train/eval "
    "step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of the frozen stream.")
_VIEWS = flags.DEFINE_integer(
    "views", None, "N: training views per image (1 global + N-1 crops); "
    "default: the default config's.")
_EXPERTS = flags.DEFINE_integer(
    "experts", None, "K: experts (copies of --expert); default: the default "
    "config's.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first "
                               "compiles).")
_WHAT = flags.DEFINE_string("what", "all", "Comma-separated subset of "
                            f"{','.join(harness.WHAT)}, or all.")
_PIPELINE_WORKERS = flags.DEFINE_integer(
    "pipeline_workers", 0, "Worker processes of the pipeline measurement (0: "
    "this process).")
_PIPELINE_IMAGES = flags.DEFINE_integer(
    "pipeline_images", 64, "Images each pipeline worker times.")
_INPUT_SIZE = flags.DEFINE_integer(
    "input_size", 1024, "Side of the pipeline's fixture files (px).")
_PIPELINE_SOURCE = flags.DEFINE_enum(
    "pipeline_source", "files", ["files", "shards"],
    "What the pipeline measurement reads: --input_size px PNG/JPEG files, "
    "or ArrayRecord shards prepared at --image_size.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Stored image side H = W fed to the train/eval steps "
    "and made by the pipeline; 0: the default config's.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "cudnn"],
    "config.model.attention_impl (see layers.choose_attention).")
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 0, "n of the ceiling matmul; 0: 8192 on accelerators, "
    "1024 on CPU.")
_PLAN = flags.DEFINE_bool(
    "plan", False, "Plan real configurations ahead of time from shapes "
    "alone (bench/plan.py) instead of measuring the model.")
_PLAN_CONFIGS = flags.DEFINE_string(
    "plan_configs", "all", "Comma-separated subset of "
    f"{','.join(plan.CONFIGS)}, or all.")
_PLAN_FORMAT = flags.DEFINE_enum(
    "plan_format", "json", ["json", "markdown"],
    "json: the JSON lines; markdown: the JSON lines, then a table.")
_PLAN_EVAL_BATCH = flags.DEFINE_integer(
    "plan_eval_batch", 0, "Evaluation images per device in the plan; 0: the "
    "default config's eval batch.")
_PLAN_RESERVE = flags.DEFINE_float(
    "plan_reserve", plan.RESERVE, "Fraction of each GPU's memory the plan "
    "keeps free when it fits a batch.")


def _plan(argv) -> None:
  """--plan: one JSON line per planned step, then the table if asked."""
  sizes = (_IMAGE_SIZE.value,) if _IMAGE_SIZE.value else plan.IMAGE_SIZES
  records = []
  for rec in plan.run(
      names=plan.parse_configs(_PLAN_CONFIGS.value), image_sizes=sizes,
      train_batch=_BATCH.value, eval_batch=_PLAN_EVAL_BATCH.value,
      dtype=_DTYPE.value if _DTYPE.present else "bfloat16",
      attention=_ATTENTION.value, reserve=_PLAN_RESERVE.value,
      matmul_size=_MATMUL_SIZE.value, steps=_STEPS.value,
      warmup=_WARMUP.value, command=" ".join(["python -m", PROGRAM] +
                                             argv[1:])):
    records.append(rec)
    print(json.dumps(rec), flush=True)
  if _PLAN_FORMAT.value == "markdown":
    print("\n" + plan.markdown(records), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with errors.exit_on_user_error(PROGRAM):
    if _PLAN.value:
      _plan(sys.argv)
      return
    for rec in harness.run(
        expert=_EXPERT.value, batch=_BATCH.value, dtype=_DTYPE.value,
        views=_VIEWS.value, num_experts=_EXPERTS.value, steps=_STEPS.value,
        warmup=_WARMUP.value, what=_WHAT.value,
        pipeline_workers=_PIPELINE_WORKERS.value,
        pipeline_images=_PIPELINE_IMAGES.value, input_size=_INPUT_SIZE.value,
        image_size=_IMAGE_SIZE.value,
        pipeline_source=_PIPELINE_SOURCE.value, attention=_ATTENTION.value,
        matmul_size=_MATMUL_SIZE.value):
      print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
