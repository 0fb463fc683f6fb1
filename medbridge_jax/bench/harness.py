"""The measurements of `python -m medbridge_jax.bench`, one function each.

`run` yields one record (a dict, printed as one JSON line) per measurement,
in this order: `_matmul` (the ceiling), `_model` (the frozen forward, then
the train and eval steps, on one built model, each held to the forward and
the ceiling) and `_pipeline` (the input pipeline on the CPU cores). Every
record has the same fields, null where a measurement has no value for one;
the module docstring of `medbridge_jax/bench/__main__.py` lists them.
"""

import dataclasses
import math
import tempfile
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from medbridge_jax import errors
from medbridge_jax.bench import flops
from medbridge_jax.bench import input_speed
from medbridge_jax.bench import model_steps
from medbridge_jax.bench import timing

WHAT = ("matmul", "forward", "train", "eval", "pipeline")
# The model measurements: what builds each one's call on a `Setup`.
MODEL_STEPS = {"forward": model_steps.forward,
               "train": model_steps.train_step,
               "eval": model_steps.eval_step}
# The measured fields: null in a record until its measurement sets them.
_UNMEASURED = dict(images_per_s=None, step_ms=None, tflops=None,
                   ceiling_tflops=None, ceiling_fraction=None,
                   overhead_ratio=None, peak_memory_bytes=None,
                   compiles=None, transfer_guard="disallow")


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


@dataclasses.dataclass
class _Context:
  """What the measurements of one run share, and what they found so far."""
  base: dict  # Fields of every record; the model's are filled once built.
  steps: int
  warmup: int
  ceiling: Optional[float] = None  # The matmul's TFLOP/s.
  rates: dict = dataclasses.field(default_factory=dict)  # Images/s by name.

  def time(self, call: Callable[[], Any]) -> timing.Timing:
    return timing.measure(call, steps=self.steps, warmup=self.warmup)

  def record(self, name: str, seconds: Optional[float], **fields) -> dict:
    """The shared fields, then `name`'s, and the memory high-water mark."""
    out = dict(self.base, name=name, **_UNMEASURED)
    out.update(step_ms=None if seconds is None else _round(1e3 * seconds, 3),
               **fields)
    out["peak_memory_bytes"] = timing.peak_memory_bytes()
    return out


def run(*, expert: str = "tiny", batch: int = 32, dtype: str = "float32",
        views: Optional[int] = None, num_experts: Optional[int] = None,
        steps: int = 10, warmup: int = 2, what: str = "all",
        pipeline_workers: int = 0, pipeline_images: int = 64,
        input_size: int = 1024, image_size: int = 0,
        pipeline_source: str = "files",
        attention: str = "auto", matmul_size: int = 0) -> Iterator[dict]:
  """Yields one record per measurement, as soon as it is measured."""
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
  context = _Context(base, steps, warmup)
  if "matmul" in names:
    yield _matmul(context, matmul_size, dtype)
  if set(names) & set(MODEL_STEPS):
    yield from _model(context, names, config)
  if "pipeline" in names:
    yield _pipeline(context, int(config.data.image_size), pipeline_workers,
                    pipeline_images, input_size, pipeline_source)


def _matmul(context: _Context, size: int, dtype: str) -> dict:
  """The ceiling: an (n, n) x (n, n) matmul's TFLOP/s, kept in `context`."""
  n = size or (1024 if jax.default_backend() == "cpu" else 8192)
  call, work = model_steps.matmul(n, jnp.dtype(dtype))
  t = context.time(call)
  context.ceiling = work / t.median / 1e12
  ceiling = _round(context.ceiling, 4)
  return context.record("matmul", t.median, tflops=ceiling,
                        ceiling_tflops=ceiling, compiles=t.compiles,
                        matmul_size=n)


def _model(context: _Context, names: tuple, config) -> Iterator[dict]:
  """The model measurements in `names`, in order, on one built model."""
  setup = model_steps.build(config)
  context.base.update(
      image_side=setup.side,
      attention_frozen=setup.attention(differentiated=False),
      attention_query=setup.attention(differentiated=True),
      experts=setup.num_experts)
  per_view = flops.vit_forward_flops(setup.expert.vision.config,
                                     setup.side)["total"]
  for name in MODEL_STEPS:
    if name in names:
      yield _model_step(context, setup, name, per_view)


def _model_step(context: _Context, setup: model_steps.Setup, name: str,
                per_view: int) -> dict:
  """Images/s and frozen-forward TFLOP/s of one model step (`name`).

  The forward runs one view per image on one expert; a train or eval step
  N views on each of K experts, so its overhead ratio is its images/s times
  N x K over the forward's.
  """
  if name == "forward":
    num_views = forwards = 1
  else:
    num_views = setup.num_views(train_mode=name == "train")
    forwards = num_views * setup.num_experts
  t = context.time(MODEL_STEPS[name](setup))
  rate = setup.batch / t.median
  context.rates[name] = rate
  tflops = forwards * per_view * rate / 1e12
  overhead = None
  if name != "forward":
    overhead = rate * forwards / context.rates["forward"]
  ceiling = context.ceiling
  return context.record(
      name, t.median, views=num_views, images_per_s=_round(rate, 2),
      tflops=_round(tflops, 5), ceiling_tflops=_round(ceiling, 4),
      ceiling_fraction=_round(tflops / ceiling, 5) if ceiling else None,
      overhead_ratio=_round(overhead, 4), compiles=t.compiles,
      flops_per_view=per_view)


def _pipeline(context: _Context, image_size: int, workers: int, images: int,
              input_size: int, source: str = "files") -> dict:
  """Read + augment images/s: decode + resize of fixture files of
  `input_size` ("files"), or records of shards prepared at `image_size`
  ("shards")."""
  with tempfile.TemporaryDirectory(prefix="medbridge-bench-") as tmp:
    if source == "shards":
      data = input_speed.write_shards(tmp, image_size)
      input_size = image_size
    else:
      data = input_speed.write_fixtures(tmp, input_size)
    result = input_speed.measure(data, image_size, workers, images)
  per_worker = result["images_per_s_per_worker"]
  fields = dict(workers=result["workers"], input_size=input_size,
                source=source,
                images_per_s=_round(result["images_per_s"], 2),
                images_per_s_per_worker=_round(per_worker, 2),
                transfer_guard=None)
  if "train" in context.rates:
    # Workers of this speed it takes to feed the measured train step.
    fields["workers_to_feed_train"] = math.ceil(
        context.rates["train"] / per_worker)
  return context.record("pipeline", None, **fields)
