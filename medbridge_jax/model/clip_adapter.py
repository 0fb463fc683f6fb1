"""CLIP-Adapter (Gao et al. 2021): a residual bottleneck MLP on the frozen
image features.

  f' = ratio * MLP(f) + (1 - ratio) * f,
  MLP = Dense(P / reduction, no bias) -> ReLU -> Dense(P, no bias) -> ReLU

as the paper's reference code has it. The frozen features keep most of the
weight (ratio 0.2 is the paper's choice for few-shot ImageNet), so the
adapted features start near the zero-shot ones. Params: `down/kernel`
(P, P / reduction), `up/kernel` (P / reduction, P).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class ClipAdapter(nn.Module):
  """Image features (B, P) -> adapted features (B, P), float32."""
  reduction: int = 4
  ratio: float = 0.2

  @nn.compact
  def __call__(self, features: Array) -> Array:
    f = jnp.asarray(features, jnp.float32)
    width = f.shape[-1]
    hidden = max(1, width // self.reduction)
    h = nn.relu(nn.Dense(hidden, use_bias=False, name="down")(f))
    h = nn.relu(nn.Dense(width, use_bias=False, name="up")(h))
    return self.ratio * h + (1.0 - self.ratio) * f
