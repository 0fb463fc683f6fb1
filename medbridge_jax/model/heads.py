"""Per-expert linear heads: fused tokens -> per-label logits.

An expert's fused tokens (B, T, P) live in the expert's image-text space:
the frozen summary is the expert's own image feature (`VisionTower.pool`),
and each query token is passed through the same frozen post-norm +
projection (CLIP) or attention-pooling head (SigLIP) as a one-token
sequence. Each token is scaled to unit RMS (the direction, as CLIP compares
normalised features) and the head is linear over all of them:

  logits[l] = sum_t <x_t / |x_t| * sqrt(P), W[t, :, l]> + b[l]

Text initialisation: with normalised label-prompt embeddings e_pos, e_neg
(L, 2, P) and the expert's logit scale s, W[t, :, l] = s (e_pos[l] -
e_neg[l]) / (sqrt(P) T). Then every token contributes the zero-shot logit
s (cos(x_t, e_pos) - cos(x_t, e_neg)) / T, and a model with only the summary
token (queries off, global view) starts exactly at the expert's zero-shot
classifier: sigmoid of that logit is the softmax over the prompt pair.
Without text initialisation W starts at zero (big_vision's head init).
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def text_directions(prompt_embeddings, logit_scale: float) -> np.ndarray:
  """(L, P) float32 rows s (e_pos - e_neg) from (L, 2, P) prompt embeddings."""
  e = np.asarray(prompt_embeddings, np.float32)
  if e.ndim != 3 or e.shape[1] != 2:
    raise ValueError(f"prompt embeddings must be (L, 2, P); got {e.shape}")
  return (float(logit_scale) * (e[:, 0] - e[:, 1])).astype(np.float32)


class TextDirections:
  """(L, P) text-init rows as a hashable linen attribute with a short repr.

  Linen modules are dataclasses that get hashed and printed in errors; a
  bare array is neither hashable nor short.
  """

  def __init__(self, rows):
    self.array = np.array(rows, np.float32)
    self.array.setflags(write=False)
    self._hash = hash((self.array.shape, self.array.tobytes()))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return (isinstance(other, TextDirections)
            and self.array.shape == other.array.shape
            and np.array_equal(self.array, other.array))

  def __repr__(self):
    return f"TextDirections(shape={self.array.shape})"


def unit_rms(x: Array, eps: float = 1e-6) -> Array:
  """x scaled to root-mean-square 1 along the last axis (x / |x| * sqrt(P)).

  Both the heads and the gate read tokens this way, so that experts whose
  features differ in scale meet on one.
  """
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps)


class Head(nn.Module):
  """(B, T, P) tokens -> (B, L) float32 logits."""
  num_labels: int
  directions: Optional[TextDirections] = None  # None: zero init.

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    _, t, p = tokens.shape
    l = self.num_labels

    def kernel_init(key, shape, dtype=jnp.float32):
      del key
      if self.directions is None:
        return jnp.zeros(shape, dtype)
      d = jnp.asarray(self.directions.array, dtype)  # (L, P)
      if d.shape != (l, p):
        raise ValueError(f"text directions {d.shape} do not match "
                         f"(labels, width) = {(l, p)}")
      w = d.T / (math.sqrt(p) * t)
      return jnp.broadcast_to(w[None], shape).astype(dtype)

    kernel = self.param("kernel", kernel_init, (t, p, l))
    bias = self.param("bias", nn.initializers.zeros, (l,))
    x = unit_rms(jnp.asarray(tokens, jnp.float32))
    return jnp.einsum("btp,tpl->bl", x, kernel) + bias
