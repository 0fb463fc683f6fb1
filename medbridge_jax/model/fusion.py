"""Cross-view fusion, per expert: self-attention over all views, then max.

Input: the T tokens of each of the N views of one expert, (B, N, T, P) (T =
Q query tokens + 1 frozen summary, all in the expert's feature width P). A
learnable view-type embedding (global vs local) is added to every token of a
view; then all N * T tokens attend to each other in a few pre-LN transformer
blocks, so a local crop's queries can read the global context and vice
versa. Finally an element-wise max over the N views gives one set of T tokens
per expert: a finding seen in any one crop survives the pooling, and the
result does not depend on how many views there are (training draws a few
random crops, evaluation uses every sliding window).

`keep_global` (config `model.fusion.keep_global`, off by default as in the
paper): the max runs over the local views only and the global view's own T
tokens are kept beside it, (B, 2T, P), so that local crops cannot override
what the whole image shows. With one view it changes nothing.

The attention and MLP output projections and the view embeddings start at
zero, so at initialisation fusion is the identity on each view's tokens and
the text-initialised heads see the features they were initialised for.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError

Array = jax.Array


class Block(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x))."""
  num_heads: int
  mlp_ratio: int = 2

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    y = nn.LayerNorm(name="norm1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, out_kernel_init=nn.initializers.zeros,
        name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(name="norm2")(x)
    y = nn.gelu(nn.Dense(self.mlp_ratio * d, name="fc1")(y))
    return x + nn.Dense(d, kernel_init=nn.initializers.zeros, name="fc2")(y)


class CrossViewFusion(nn.Module):
  """(B, N, T, P) tokens of N views -> (B, T, P) fused tokens ((B, 2T, P)
  with `keep_global` and N > 1)."""
  num_heads: int = 4
  num_layers: int = 1
  keep_global: bool = False

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    b, n, t, p = tokens.shape
    if p % self.num_heads:
      raise UserError(f"model.fusion.num_heads={self.num_heads} does not "
                      f"divide an expert's feature width {p}")
    x = jnp.asarray(tokens, jnp.float32)
    view_type = self.param("view_type", nn.initializers.zeros, (2, p))
    local = (jnp.arange(n) > 0).astype(jnp.int32)  # view 0 is global
    x = x + view_type[local][None, :, None, :]
    x = x.reshape(b, n * t, p)
    for i in range(self.num_layers):
      x = Block(self.num_heads, name=f"block_{i}")(x)
    x = x.reshape(b, n, t, p)
    if self.keep_global and n > 1:
      return jnp.concatenate([jnp.max(x[:, 1:], axis=1), x[:, 0]], axis=1)
    return jnp.max(x, axis=1)
