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
  pipeline  decode + resize + augment of --input_size px PNG/JPEG files with
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

  tflops          analytic (bench_lib/flops.py): for forward, the ViT's
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
"""

import json
import math
import os
import sys
import tempfile
from typing import Iterator, Optional

from absl import app
from absl import flags

from medbridge_jax import errors

PROGRAM = "medbridge_jax.bench"
WHAT = ("matmul", "forward", "train", "eval", "pipeline")

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
                            f"{','.join(WHAT)}, or all.")
_PIPELINE_WORKERS = flags.DEFINE_integer(
    "pipeline_workers", 0, "Worker processes of the pipeline measurement (0: "
    "this process).")
_PIPELINE_IMAGES = flags.DEFINE_integer(
    "pipeline_images", 64, "Images each pipeline worker times.")
_INPUT_SIZE = flags.DEFINE_integer(
    "input_size", 1024, "Side of the pipeline's fixture files (px).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Stored image side H = W fed to the train/eval steps "
    "and made by the pipeline; 0: the default config's.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "cudnn"],
    "config.model.attention_impl (see layers.choose_attention).")
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 0, "n of the ceiling matmul; 0: 8192 on accelerators, "
    "1024 on CPU.")


def _round(x: Optional[float], digits: int) -> Optional[float]:
  return None if x is None else float(round(x, digits))


def parse_what(what: str) -> tuple:
  """The measurements to run, with what they need, in run order."""
  names = set(WHAT if what.strip() == "all" else
              (w.strip() for w in what.split(",") if w.strip()))
  unknown = names - set(WHAT)
  if unknown or not names:
    raise errors.UserError(f"--what={what!r}: use all or a comma-separated "
                           f"subset of {','.join(WHAT)}")
  if names & {"train", "eval"}:
    names.add("forward")
  if "forward" in names:
    names.add("matmul")
  return tuple(w for w in WHAT if w in names)


def run(*, expert: str = "tiny", batch: int = 32, dtype: str = "float32",
        views: Optional[int] = None, num_experts: Optional[int] = None,
        steps: int = 10, warmup: int = 2, what: str = "all",
        pipeline_workers: int = 0, pipeline_images: int = 64,
        input_size: int = 1024, image_size: int = 0,
        attention: str = "auto", matmul_size: int = 0) -> Iterator[dict]:
  """Yields one record per measurement, as soon as it is measured."""
  # Imported here: spawned pipeline workers re-import this module and need
  # none of it.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from medbridge_jax.bench_lib import flops  # pylint: disable=g-import-not-at-top
  from medbridge_jax.bench_lib import model_steps  # pylint: disable=g-import-not-at-top
  from medbridge_jax.bench_lib import timing  # pylint: disable=g-import-not-at-top

  names = parse_what(what)
  if batch < 1 or steps < 1:
    raise errors.UserError(f"--batch={batch} and --steps={steps} must be >= 1")
  spec = model_steps.expert_spec(expert)
  config = model_steps.make_config(
      spec, batch=batch, dtype=dtype, views=views, num_experts=num_experts,
      attention=attention, image_size=image_size or None)
  base = dict(timing.machine(), expert=expert, arch=spec, image_side=None,
              image_size=int(config.data.image_size), batch=batch,
              dtype=dtype, attention_frozen=None, attention_query=None,
              views=None, experts=None, steps=steps)
  empty = dict(images_per_s=None, step_ms=None, tflops=None,
               ceiling_tflops=None, ceiling_fraction=None,
               overhead_ratio=None, peak_memory_bytes=None, compiles=None,
               transfer_guard="disallow")
  rates = {}
  ceiling = None

  def record(name, seconds, **fields):
    out = dict(base, name=name, **empty)
    out.update(step_ms=None if seconds is None else _round(1e3 * seconds, 3),
               **fields)
    out["peak_memory_bytes"] = timing.peak_memory_bytes()
    return out

  if "matmul" in names:
    n = matmul_size or (1024 if jax.default_backend() == "cpu" else 8192)
    call, work = model_steps.matmul(n, jnp.dtype(dtype))
    t = timing.measure(call, steps=steps, warmup=warmup)
    ceiling = work / t.median / 1e12
    del call
    yield record("matmul", t.median, tflops=_round(ceiling, 4),
                 ceiling_tflops=_round(ceiling, 4), compiles=t.compiles,
                 matmul_size=n)

  setup = None
  if set(names) & {"forward", "train", "eval"}:
    setup = model_steps.build(config)
    base.update(image_side=setup.side,
                attention_frozen=setup.attention(differentiated=False),
                attention_query=setup.attention(differentiated=True),
                experts=setup.num_experts)
    per_view = flops.vit_forward_flops(setup.expert.vision.config,
                                       setup.side)["total"]

  def model_record(name, call, forwards_per_image, views_):
    t = timing.measure(call, steps=steps, warmup=warmup)
    rate = batch / t.median
    rates[name] = rate
    tflops = forwards_per_image * per_view * rate / 1e12
    overhead = None
    if name != "forward":
      overhead = rate * forwards_per_image / rates["forward"]
    return record(
        name, t.median, views=views_, images_per_s=_round(rate, 2),
        tflops=_round(tflops, 5), ceiling_tflops=_round(ceiling, 4),
        ceiling_fraction=_round(tflops / ceiling, 5) if ceiling else None,
        overhead_ratio=_round(overhead, 4), compiles=t.compiles,
        flops_per_view=per_view)

  if "forward" in names:
    yield model_record("forward", model_steps.forward(setup), 1, 1)
  for name, make in (("train", model_steps.train_step),
                     ("eval", model_steps.eval_step)):
    if name in names:
      n = setup.num_views(train_mode=name == "train")
      yield model_record(name, make(setup), n * setup.num_experts, n)
  del setup

  if "pipeline" in names:
    from medbridge_jax.bench_lib import input_speed  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory(prefix="medbridge-bench-") as tmp:
      paths = input_speed.write_fixtures(tmp, input_size)
      result = input_speed.measure(paths, int(config.data.image_size),
                                   pipeline_workers, pipeline_images)
    rate = result["images_per_s"]
    fields = dict(workers=result["workers"], input_size=input_size,
                  images_per_s=_round(rate, 2),
                  images_per_s_per_worker=_round(
                      result["images_per_s_per_worker"], 2),
                  transfer_guard=None)
    if "train" in rates:
      # Workers of this speed it takes to feed the measured train step.
      fields["workers_to_feed_train"] = math.ceil(
          rates["train"] / result["images_per_s_per_worker"])
    yield record("pipeline", None, **fields)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with errors.exit_on_user_error(PROGRAM):
    for rec in run(
        expert=_EXPERT.value, batch=_BATCH.value, dtype=_DTYPE.value,
        views=_VIEWS.value, num_experts=_EXPERTS.value, steps=_STEPS.value,
        warmup=_WARMUP.value, what=_WHAT.value,
        pipeline_workers=_PIPELINE_WORKERS.value,
        pipeline_images=_PIPELINE_IMAGES.value, input_size=_INPUT_SIZE.value,
        image_size=_IMAGE_SIZE.value, attention=_ATTENTION.value,
        matmul_size=_MATMUL_SIZE.value):
      print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  sys.exit(app.run(main))
