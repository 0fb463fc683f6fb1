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

Without a global view (`model.focal.global_view=False`, `has_global`
False) every view is local and `keep_global` has nothing to keep.

The attention and MLP output projections and the view embeddings start at
zero, so at initialisation fusion is the identity on each view's tokens and
the text-initialised heads see the features they were initialised for.
`model.fusion.enabled=False` drops the attention blocks and keeps only the
max over views (`max_over_views`).
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


def max_over_views(tokens: Array, keep_global: bool = False) -> Array:
  """(B, N, T, P) -> (B, T, P) element-wise max over the N views; with
  `keep_global` and N > 1, the max over views 1.. beside view 0's own
  tokens, (B, 2T, P)."""
  if keep_global and tokens.shape[1] > 1:
    return jnp.concatenate([jnp.max(tokens[:, 1:], axis=1), tokens[:, 0]],
                           axis=1)
  return jnp.max(tokens, axis=1)


class CrossViewFusion(nn.Module):
  """(B, N, T, P) tokens of N views -> (B, T, P) fused tokens ((B, 2T, P)
  with `keep_global` and N > 1). View 0 is the global view if `has_global`."""
  num_heads: int = 4
  num_layers: int = 1
  keep_global: bool = False
  has_global: bool = True

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    b, n, t, p = tokens.shape
    if p % self.num_heads:
      raise UserError(f"model.fusion.num_heads={self.num_heads} does not "
                      f"divide an expert's feature width {p}")
    if self.keep_global and not self.has_global:
      raise UserError("model.fusion.keep_global=True needs a global view "
                      "(model.focal.global_view=True)")
    x = jnp.asarray(tokens, jnp.float32)
    view_type = self.param("view_type", nn.initializers.zeros, (2, p))
    first_local = 1 if self.has_global else 0
    local = (jnp.arange(n) >= first_local).astype(jnp.int32)
    x = x + view_type[local][None, :, None, :]
    x = x.reshape(b, n * t, p)
    for i in range(self.num_layers):
      x = Block(self.num_heads, name=f"block_{i}")(x)
    x = x.reshape(b, n, t, p)
    # Each view's fused tokens before the max (model.evidence reads them;
    # nothing is kept unless the caller collects "intermediates").
    self.sow("intermediates", "views", x)
    return max_over_views(x, self.keep_global)
