"""The CLIP and SigLIP text towers as one linen module.

CLIP: causal attention (plus the padding mask), final LayerNorm, the hidden
state at the end-of-text token, bias-free `text_projection`. SigLIP:
bidirectional attention (plus the padding mask), final LayerNorm, the last
position's hidden state (padding included, as SigLIP was trained with
max-length padding), `head` Linear with bias. open_clip's own text
transformer is CLIP's, with its pooling named (`pool_type`) and optional
layer scale.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.experts import layers

Array = jax.Array
POOLINGS = ("argmax", "eos", "last")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Shape of a text tower, read from the checkpoint's `text_config`."""
  family: str  # "clip" | "siglip".
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  max_length: int  # max_position_embeddings.
  act: str
  eps: float
  projection_dim: int  # CLIP text_projection / SigLIP head output width.
  eos_token_id: int = 2  # CLIP pooling; 2 means "argmax of ids" (legacy).
  # Which position is pooled: "argmax" (the largest token id: the end token
  # in CLIP's BPE vocabulary), "eos" (the first `eos_token_id`), "last".
  # None: the family's rule (SigLIP "last"; CLIP "argmax" when
  # eos_token_id is 2, as transformers keeps for such configs, else "eos").
  pooling: Optional[str] = None
  layer_scale: bool = False  # Per-channel residual scales (open_clip's ls).

  def __post_init__(self):
    if self.pooling is not None and self.pooling not in POOLINGS:
      raise ValueError(f"text pooling {self.pooling!r} not in {POOLINGS}")

  @property
  def pool_rule(self) -> str:
    """The pooling in effect: `pooling`, or the family's rule."""
    if self.pooling is not None:
      return self.pooling
    if self.family == "siglip":
      return "last"
    # transformers keeps the pre-2023 rule for configs whose end token is
    # 2: the end token has the largest id in CLIP's original vocabulary.
    return "argmax" if self.eos_token_id == 2 else "eos"


class TextTower(nn.Module):
  """Token ids (B, T) -> text features (B, P), as get_text_features."""
  config: TextConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def setup(self):
    c = self.config
    d = c.hidden_size
    self.token_embedding = self.param(
        "token_embedding", nn.initializers.normal(0.02), (c.vocab_size, d))
    self.position_embedding = self.param(
        "position_embedding", nn.initializers.normal(0.01),
        (c.max_length, d))
    self.layers = [
        layers.EncoderLayer(d, c.num_heads, c.mlp_dim, c.act, c.eps,
                            self.dtype, self.attention_impl, c.layer_scale)
        for _ in range(c.num_layers)]
    self.final_norm = layers.layer_norm(c.eps, self.dtype)
    self.projection = layers.dense(c.projection_dim, self.dtype,
                                   use_bias=c.family == "siglip")

  def _mask(self, ids: Array, mask: Optional[Array]) -> Optional[Array]:
    """Boolean (B, 1, T, T) attention mask, or None for full attention."""
    t = ids.shape[1]
    allowed = None
    if mask is not None:
      keys = jnp.asarray(mask).astype(bool)[:, None, None, :]
      allowed = jnp.broadcast_to(keys, (ids.shape[0], 1, t, t))
    if self.config.family == "clip":
      causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
      allowed = causal if allowed is None else allowed & causal
    return allowed

  def _pool_index(self, ids: Array) -> Array:
    c = self.config
    rule = c.pool_rule
    if rule == "last":
      return jnp.full((ids.shape[0],), ids.shape[1] - 1)
    if rule == "argmax":
      return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == c.eos_token_id, axis=-1)

  def _check_ids(self, input_ids: Array) -> Array:
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length); got {ids.shape}")
    if ids.shape[1] > self.config.max_length:
      raise ValueError(f"text length {ids.shape[1]} exceeds the checkpoint's "
                       f"max_position_embeddings {self.config.max_length}")
    return ids

  def embed_tokens(self, input_ids: Array) -> Array:
    """(B, T) token ids -> (B, T, D) rows of the token embedding table
    (float32 params, no positions): what `encode_embeddings` takes."""
    return jnp.take(self.token_embedding, self._check_ids(input_ids), axis=0)

  def _encode(self, embeds: Array, ids: Array, attention_mask: Optional[Array],
              output_hidden_states: bool):
    """The tower from token embeddings on: positions, layers, norm, pooling
    at `ids`' end position, projection."""
    if embeds.shape != ids.shape + (self.config.hidden_size,):
      raise ValueError(f"token embeddings {embeds.shape} do not match ids "
                       f"{ids.shape} and width {self.config.hidden_size}")
    x = (embeds + self.position_embedding[None, :ids.shape[1]]
         ).astype(self.dtype)
    mask = self._mask(ids, attention_mask)
    hidden = [x]
    for layer in self.layers:
      x = layer(x, mask)
      hidden.append(x)
    x = self.final_norm(x)
    pooled = jnp.take_along_axis(
        x, self._pool_index(ids)[:, None, None], axis=1)[:, 0]
    features = self.projection(pooled)
    return features, (tuple(hidden) if output_hidden_states else ())

  def encode_embeddings(self, embeds: Array, input_ids: Array,
                        attention_mask: Optional[Array] = None) -> Array:
    """Token embeddings (B, T, D) -> text features (B, P).

    `embeds` replaces the token-embedding lookup (learned prompt context
    goes in here); `input_ids` (B, T) still decide the pooling position
    (CLIP's end token) and, with `attention_mask`, the attention mask.
    With `embeds = embed_tokens(input_ids)` this is `__call__`, bit for bit.
    """
    ids = self._check_ids(input_ids)
    return self._encode(embeds, ids, attention_mask, False)[0]

  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               output_hidden_states: bool = False):
    """(features (B, P), hidden_states): hidden states as transformers lists
    them (embeddings, then each layer's output), or () if not asked."""
    ids = self._check_ids(input_ids)
    x = jnp.take(self.token_embedding, ids, axis=0)
    return self._encode(x, ids, attention_mask, output_hidden_states)
