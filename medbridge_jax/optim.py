"""The optimizer: AdamW with linear warm-up, cosine decay and gradient clipping.

It is built for, and only ever sees, the trainable parameters: the frozen
experts have no optimizer state. Gradient accumulation is not an optimizer
wrapper here; the train step scans over micro-batches and applies this
optimizer once per step, so `config.train.steps` counts optimizer updates and
the schedule needs no rescaling.
"""

import jax
import ml_collections
import optax

from medbridge_jax import errors


def schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to 0 at `steps`."""
  if train.steps < 1:
    raise errors.UserError(f"config.train.steps={train.steps} must be >= 1")
  if not 0 <= train.warmup_steps < train.steps:
    raise errors.UserError(
        f"config.train.warmup_steps={train.warmup_steps} must be in "
        f"[0, config.train.steps={train.steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
      decay_steps=train.steps, end_value=0.0)


def _decay_mask(params):
  # Decay weight matrices and embeddings only: biases, norm scales and the
  # scalar temperature would be pulled to zero for no regularising gain.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer of `config.train`: clip -> AdamW(schedule)."""
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(schedule(train), weight_decay=train.weight_decay,
                           mask=_decay_mask))
  return optax.chain(*parts)
