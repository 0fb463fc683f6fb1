"""What evidence maps add to an evaluation step: one JSON line.

  python -m medbridge_jax.bench.evidence_cost [--expert=tiny] [--batch=8]

Times the project's jitted evaluation step alone (`evaluate.make_model_fn`,
every sliding window, as `bench --what=eval` does) and the same step that
also returns the per-label evidence maps (`model.evidence.maps`: its
probabilities and maps from one apply), on one device-resident batch of
the default config's stored images and experts (K copies of --expert, as
the harness builds them, bench/model_steps.py). Fields: the harness's
machine fields, expert, arch, image_size, batch, experts, views (per image
and expert), eval_ms and eval_maps_ms (medians of --steps timed calls,
`bench.timing.measure`), ratio (eval_maps_ms / eval_ms), compiles (of
each), and XLA's flops of both compiled steps.
"""

import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from medbridge_jax import errors
from medbridge_jax import evaluate
from medbridge_jax import sharding
from medbridge_jax.bench import model_steps
from medbridge_jax.bench import timing
from medbridge_jax.model import evidence
from medbridge_jax.model import partition

PROGRAM = "medbridge_jax.bench.evidence_cost"

_EXPERT = flags.DEFINE_string(
    "expert", "tiny", "tiny | vit_b16 | a random-expert spec (see "
    "python -m medbridge_jax.bench).")
_BATCH = flags.DEFINE_integer("batch", 8, "Stored images per step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of the frozen stream.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Stored image side; 0: the default config's.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per step.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first "
                               "compiles).")


def maps_step(setup: model_steps.Setup):
  """(jitted (trainable, frozen, images) -> (probabilities, maps), images)."""
  model = setup.model

  @jax.jit
  def fn(trainable, frozen, images):
    params = partition.merge(trainable, frozen)
    maps, info = evidence.maps(model, params, images)
    return jax.nn.sigmoid(info["logits"].astype(jnp.float32)), maps

  return fn


def _flops(fn, *args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per device.
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def measure(expert: str = "tiny", batch: int = 8, dtype: str = "float32",
            image_size: int = 0, steps: int = 5, warmup: int = 2) -> dict:
  """The record this module prints (see the module docstring)."""
  if batch < 1 or steps < 1:
    raise errors.UserError(f"--batch={batch} and --steps={steps} must be "
                           f">= 1")
  spec = model_steps.expert_spec(expert)
  config = model_steps.make_config(
      spec, batch=batch, dtype=dtype, views=None, num_experts=None,
      attention="auto", image_size=image_size or None)
  setup = model_steps.build(config)
  evidence.check_model(setup.model)
  size = int(config.data.image_size)
  images = timing.random_array((batch, size, size), jnp.uint8,
                               sharding.batch_sharding(setup.mesh), 3)
  args = (setup.trainable, setup.frozen, images)
  plain = evaluate.make_model_fn(setup.model)  # What bench's eval times.
  with_maps = maps_step(setup)
  t_plain = timing.measure(lambda: plain(*args), steps=steps, warmup=warmup)
  t_maps = timing.measure(lambda: with_maps(*args), steps=steps,
                          warmup=warmup)
  return dict(
      timing.machine(), name="evidence_cost", expert=expert, arch=spec,
      image_size=int(config.data.image_size), batch=batch, dtype=dtype,
      experts=setup.num_experts, views=setup.num_views(train_mode=False),
      eval_ms=round(1e3 * t_plain.median, 3),
      eval_maps_ms=round(1e3 * t_maps.median, 3),
      ratio=round(t_maps.median / t_plain.median, 4),
      compiles=[t_plain.compiles, t_maps.compiles],
      eval_flops=_flops(plain, *args),
      eval_maps_flops=_flops(with_maps, *args), steps=steps)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with errors.exit_on_user_error(PROGRAM):
    print(json.dumps(measure(
        expert=_EXPERT.value, batch=_BATCH.value, dtype=_DTYPE.value,
        image_size=_IMAGE_SIZE.value, steps=_STEPS.value,
        warmup=_WARMUP.value)), flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
