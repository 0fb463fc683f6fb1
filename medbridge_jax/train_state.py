"""The train state: what a checkpoint holds and what training updates.

One definition for training, prediction and the benchmark: the step, the
trainable parameters and their optimizer state. The experts' towers are not
in it (frozen, read from their folders) and neither is anything derived.

  state = train_state.create(trainable, tx)          # training from scratch
  abstract = train_state.abstract(trainable, tx, s)  # restore (shapes only)
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax


def create(trainable: Any, tx: optax.GradientTransformation,
           sharding: Optional[Any] = None) -> dict:
  """A fresh state at step 0 (laid out with `sharding` if given)."""
  state = dict(step=jnp.zeros((), jnp.int32), params=trainable,
               opt_state=tx.init(trainable))
  return state if sharding is None else jax.device_put(state, sharding)


def abstract(trainable: Any, tx: optax.GradientTransformation,
             sharding: Optional[Any] = None) -> dict:
  """The state's ShapeDtypeStructs (with `sharding`), computing nothing.

  `trainable` may hold arrays or ShapeDtypeStructs (e.g. from
  `medbridge.abstract_params`), so a reader can restore a checkpoint without
  initialising anything.
  """
  shapes = jax.eval_shape(lambda p: create(p, tx), trainable)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      shapes)
