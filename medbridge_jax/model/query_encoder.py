"""The Query-Encoder: learnable query tokens read a frozen expert's layers.

Per expert, Q learnable query tokens (Q, D) join the image tokens after the
first T1 frozen layers (`inject_layer`; negative counts from the end) and go
through layers [T1, L) with them (`VisionTower.encode_with_extra`):

  non_destructive (default)  queries attend to image tokens and each other;
      image tokens never see the queries, so the image stream is exactly
      the plain backbone's. It is wrapped in `stop_gradient`: no backward
      pass runs through it, only the Q-token query stream is differentiated,
      and a training step costs about one frozen forward.
  joint  all tokens attend to each other; the image stream changes and the
      backward runs through layers [T1, L) of all tokens.

Outputs per view, in the expert's image-text feature space (width P):
  - the frozen summary: `VisionTower.pool` of the final tokens, i.e. exactly
    the expert's image feature (CLIP: post-norm class token + projection;
    SigLIP: post-norm + attention-pooling head);
  - each query token passed alone through the same pooling (a one-token
    sequence), so queries come out where the label-prompt text embeddings
    live and text-initialised heads make sense for them.

Queries start as N(0, 0.02^2), the usual ViT token init: the frozen layers
are pre-LN, so the first thing each layer does is normalise the query, and
a small residual stream means the query's output is dominated by what it
read from the image in the first injected layer. (Initialising from image
token statistics would need data at init time; we keep init static.)

With queries disabled (Q = 0) only the frozen summary comes out: the linear
probe ablation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError

Array = jax.Array


def resolve_layer(inject_layer: int, num_layers: int) -> int:
  """T1 in [0, L) from a possibly negative `inject_layer`."""
  t1 = inject_layer + num_layers if inject_layer < 0 else inject_layer
  if not 0 <= t1 < num_layers:
    raise UserError(
        f"model.queries.inject_layer={inject_layer} is outside an expert "
        f"with {num_layers} layers (use 0..{num_layers - 1} or "
        f"-{num_layers}..-1)")
  return t1


class QueryEncoder(nn.Module):
  """Frozen tower + Q query tokens: pixels (B, H, W, C) -> (B, T, P).

  T = Q + 1: the Q pooled query tokens, then the frozen summary. The tower
  is passed in at call time (it lives beside this module, under
  `expert_{k}/tower`, so partition rules see it by name).
  """
  num_queries: int = 4  # 0 = queries off (summary only).
  inject_layer: int = -2
  mode: str = "non_destructive"
  init_std: float = 0.02

  @nn.compact
  def __call__(self, tower: nn.Module, pixels: Array) -> Array:
    num_layers = tower.num_layers
    t1 = resolve_layer(self.inject_layer, num_layers)
    tokens = tower.embed(pixels)
    tokens = tower.encode(tokens, 0, t1)
    if self.num_queries == 0:
      tokens = tower.encode(tokens, t1, num_layers)
      summary = jax.lax.stop_gradient(tower.pool(tokens))
      return summary[:, None, :].astype(jnp.float32)
    d = tower.hidden_size
    queries = self.param("queries", nn.initializers.normal(self.init_std),
                         (self.num_queries, d))
    b = tokens.shape[0]
    extra = jnp.broadcast_to(queries[None].astype(tokens.dtype),
                             (b, self.num_queries, d))
    frozen = self.mode == "non_destructive"
    if frozen:
      tokens = jax.lax.stop_gradient(tokens)
    tokens, extra = tower.encode_with_extra(tokens, extra, t1, num_layers,
                                            self.mode)
    # Only differentiated paths need an attention kernel with a backward
    # (layers.choose_attention).
    summary = tower.pool(tokens, differentiated=not frozen)
    if frozen:
      summary = jax.lax.stop_gradient(summary)
    pooled = tower.pool_tokens(extra.reshape(b * self.num_queries, d),
                               differentiated=True)
    pooled = pooled.reshape(b, self.num_queries, -1)
    out = jnp.concatenate([pooled, summary[:, None, :]], axis=1)
    return out.astype(jnp.float32)


def pooled_queries(tokens: Array, num_queries: int) -> Array:
  """(B, P) mean of the Q query tokens of (B, T, P) tokens; the summary
  (the only token) when there are no queries."""
  if num_queries == 0:
    return tokens[:, 0]
  return jnp.mean(tokens[:, :num_queries], axis=1)
