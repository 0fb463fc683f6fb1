"""A Hugging Face BERT text tower, as open_clip's `HFTextEncoder` runs it.

BiomedCLIP (an open_clip model) encodes text with PubMedBERT: transformers'
`BertModel`, then a pooling of its last hidden state, then a projection into
the joint space. `BertTower` computes the same numbers in linen and has
`TextTower`'s interface (`__call__`, `embed_tokens`, `encode_embeddings`,
`num_layers`, `hidden_size`, `config.max_length`, `config.family`), so model
code that runs text towers (CoOp's learned context included) takes either.

BERT layers are post-norm: embeddings (word + position + token type 0)
-> LayerNorm; per layer: self-attention, dense, residual, LayerNorm, then
intermediate dense, activation, output dense, residual, LayerNorm. There
is no final LayerNorm.

Pooling (open_clip's `hf_pooler_type`): "cls" (`cls_last_hidden_state_pooler`,
BiomedCLIP's): the last hidden state at position 0; "mean"
(`mean_pooler`): its mean over the attended tokens; "cls_pooler"
(`cls_pooler`): BERT's own pooler, tanh(dense(hidden state at 0)).
Projection (open_clip's `hf_proj_type`): "mlp": Linear(d, (d + out) // 2)
-> GELU (erf) -> Linear(.., out); "linear": Linear(d, out); "none": the
pooled state itself (open_clip's Identity, width d). open_clip 3.3's
Linears have no bias; `projection_bias` reads forks that add one.
"""

import dataclasses
import re
from typing import Any, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts import names
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.names import Entry

Array = jax.Array

POOLINGS = ("cls", "mean", "cls_pooler")
PROJECTIONS = ("mlp", "linear", "none")
# open_clip's `hf_pooler_type` names -> ours (its max pooler is not read).
OPEN_CLIP_POOLERS = {"cls_last_hidden_state_pooler": "cls",
                     "mean_pooler": "mean", "cls_pooler": "cls_pooler"}
# BERT's convention (base: 768 / 12, large: 1024 / 16): 64 channels a head.
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT text tower and of open_clip's pooling and projection.

  `projection_hidden` (the MLP projection's width) defaults to open_clip's
  (hidden_size + projection_dim) // 2; `projection_dim` of "none" must be
  hidden_size (0 stands for it).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int  # intermediate_size.
  max_length: int  # max_position_embeddings.
  type_vocab_size: int = 2
  act: str = "gelu"  # hidden_act.
  eps: float = 1e-12  # layer_norm_eps.
  pad_token_id: int = 0
  projection: str = "mlp"
  projection_dim: int = 0
  projection_hidden: Optional[int] = None
  projection_bias: bool = False
  pooling: str = "cls"
  family: str = "bert"

  def __post_init__(self):
    if self.family != "bert":
      raise UserError(f"BertConfig family {self.family!r}; expected 'bert'")
    if self.pooling not in POOLINGS:
      raise UserError(f"BERT text pooling {self.pooling!r}; expected one of "
                      f"{', '.join(POOLINGS)}")
    if self.projection not in PROJECTIONS:
      raise UserError(f"BERT text projection {self.projection!r}; expected "
                      f"one of {', '.join(PROJECTIONS)}")
    if self.num_heads <= 0 or self.hidden_size % self.num_heads:
      raise UserError(f"BERT hidden_size {self.hidden_size} is not divisible "
                      f"by num_attention_heads {self.num_heads}")
    layers.activation(self.act)  # A UserError for an unknown one.
    if self.projection == "none":
      if self.projection_dim not in (0, self.hidden_size):
        raise UserError(
            f"BERT text projection 'none' keeps the width {self.hidden_size}; "
            f"projection_dim {self.projection_dim} asks for another")
      object.__setattr__(self, "projection_dim", self.hidden_size)
    elif self.projection_dim <= 0:
      raise UserError(f"BERT text projection {self.projection!r} needs a "
                      f"projection_dim (the joint embedding width)")
    if self.projection == "mlp" and self.projection_hidden is None:
      object.__setattr__(self, "projection_hidden",
                         (self.hidden_size + self.projection_dim) // 2)


class BertLayer(nn.Module):
  """One post-norm BERT layer, numerically as transformers' `BertLayer`."""
  hidden_size: int
  num_heads: int
  mlp_dim: int
  act: str
  eps: float
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  def setup(self):
    self.attn = layers.SelfAttention(self.hidden_size, self.num_heads,
                                     self.dtype, self.attention_impl)
    self.attn_norm = layers.layer_norm(self.eps, self.dtype)
    self.mlp = layers.Mlp(self.hidden_size, self.mlp_dim, self.act,
                          self.dtype)
    self.mlp_norm = layers.layer_norm(self.eps, self.dtype)

  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    x = self.attn_norm(x + self.attn(x, mask))
    return self.mlp_norm(x + self.mlp(x))


class BertTower(nn.Module):
  """Token ids (B, T) -> text features (B, P), as open_clip's
  `HFTextEncoder` (BERT) computes them.

  The attention mask: open_clip takes no mask and builds it from the ids,
  `input_ids != pad_token_id`. `attention_mask=None` does the same here. A
  given 0/1 `attention_mask` (B, T) replaces it, for attention and the
  "mean" pooling alike; a BERT tokenizer's mask is exactly
  `ids != pad_token_id`, so both give open_clip's numbers.
  """
  config: BertConfig
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
    init = nn.initializers.normal(0.02)
    # `token_embedding` as TextTower names it (CoOp reads it by that name).
    self.token_embedding = self.param("token_embedding", init,
                                      (c.vocab_size, d))
    self.position_embedding = self.param("position_embedding", init,
                                         (c.max_length, d))
    self.token_type_embedding = self.param("token_type_embedding", init,
                                           (c.type_vocab_size, d))
    self.embed_norm = layers.layer_norm(c.eps, self.dtype)
    self.layers = [
        BertLayer(d, c.num_heads, c.mlp_dim, c.act, c.eps, self.dtype,
                  self.attention_impl)
        for _ in range(c.num_layers)]
    if c.pooling == "cls_pooler":
      self.pooler = layers.dense(d, self.dtype)
    bias = c.projection_bias
    if c.projection == "mlp":
      self.proj_fc1 = layers.dense(c.projection_hidden, self.dtype,
                                   use_bias=bias)
      self.proj_fc2 = layers.dense(c.projection_dim, self.dtype,
                                   use_bias=bias)
    elif c.projection == "linear":
      self.projection = layers.dense(c.projection_dim, self.dtype,
                                     use_bias=bias)

  def _check_ids(self, input_ids: Array) -> Array:
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, length); got {ids.shape}")
    if ids.shape[1] > self.config.max_length:
      raise ValueError(f"text length {ids.shape[1]} exceeds the checkpoint's "
                       f"max_position_embeddings {self.config.max_length}")
    return ids

  def _keys(self, ids: Array, attention_mask: Optional[Array]) -> Array:
    """Boolean (B, T): which tokens are attended to (and mean-pooled)."""
    if attention_mask is None:
      return ids != self.config.pad_token_id
    keys = jnp.asarray(attention_mask)
    if keys.shape != ids.shape:
      raise ValueError(f"attention_mask {keys.shape} does not match "
                       f"input_ids {ids.shape}")
    return keys.astype(bool)

  def embed_tokens(self, input_ids: Array) -> Array:
    """(B, T) token ids -> (B, T, D) rows of the word embedding table
    (float32 params, no positions): what `encode_embeddings` takes."""
    return jnp.take(self.token_embedding, self._check_ids(input_ids), axis=0)

  def _pool(self, x: Array, keys: Array) -> Array:
    c = self.config
    if c.pooling == "mean":
      # In float32: a bfloat16 count of tokens is inexact past 256.
      weights = keys.astype(jnp.float32)[..., None]
      mean = (x.astype(jnp.float32) * weights).sum(1) / weights.sum(1)
      return mean.astype(x.dtype)
    cls = x[:, 0]
    if c.pooling == "cls_pooler":
      return jnp.tanh(self.pooler(cls))
    return cls

  def _project(self, pooled: Array) -> Array:
    c = self.config
    if c.projection == "mlp":
      return self.proj_fc2(layers.activation("gelu")(self.proj_fc1(pooled)))
    if c.projection == "linear":
      return self.projection(pooled)
    return pooled

  def _encode(self, embeds: Array, ids: Array, attention_mask: Optional[Array],
              output_hidden_states: bool):
    """The tower from word embeddings on: token type 0 and positions,
    LayerNorm, layers, pooling, projection."""
    t = ids.shape[1]
    if embeds.shape != ids.shape + (self.config.hidden_size,):
      raise ValueError(f"token embeddings {embeds.shape} do not match ids "
                       f"{ids.shape} and width {self.config.hidden_size}")
    # transformers' order: (words + token type) + positions.
    x = embeds + self.token_type_embedding[0]
    x = x + self.position_embedding[None, :t]
    x = self.embed_norm(x.astype(self.dtype))
    keys = self._keys(ids, attention_mask)
    mask = jnp.broadcast_to(keys[:, None, None, :], (ids.shape[0], 1, t, t))
    hidden = [x]
    for layer in self.layers:
      x = layer(x, mask)
      hidden.append(x)
    features = self._project(self._pool(x, keys))
    return features, (tuple(hidden) if output_hidden_states else ())

  def encode_embeddings(self, embeds: Array, input_ids: Array,
                        attention_mask: Optional[Array] = None) -> Array:
    """Word embeddings (B, T, D) -> text features (B, P).

    `embeds` replaces the word-embedding lookup (learned prompt context
    goes in here); `input_ids` (B, T) still decide the attention mask
    (see the class docstring). With `embeds = embed_tokens(input_ids)` this
    is `__call__`, bit for bit.
    """
    ids = self._check_ids(input_ids)
    return self._encode(embeds, ids, attention_mask, False)[0]

  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               output_hidden_states: bool = False):
    """(features (B, P), hidden_states): hidden states as transformers lists
    them (embeddings after their LayerNorm, then each layer's output; the
    last is BertModel's `last_hidden_state`), or () if not asked."""
    ids = self._check_ids(input_ids)
    x = jnp.take(self.token_embedding, ids, axis=0)
    return self._encode(x, ids, attention_mask, output_hidden_states)


def bert_entries(c: BertConfig, prefix: str, proj_prefix: str,
                 ours: names.Path = ("text",)) -> List[Entry]:
  """The tensors of a BERT tower and its projection, and our params.

  `prefix`: where the BertModel's tensors live, e.g. "text.transformer."
  in an open_clip state dict ("" for a BertModel saved alone);
  `proj_prefix`: open_clip's projection, e.g. "text.proj." (an MLP is
  "text.proj.0" and "text.proj.2", a Linear "text.proj"). BertModel's
  pooler (`pooler.dense`) is an entry with "cls_pooler" only; otherwise
  `unused_names` lists it for the reader to drop by name.
  """
  d, e = c.hidden_size, prefix + "embeddings."
  out = [Entry(e + "word_embeddings.weight", (c.vocab_size, d),
               (ours + ("token_embedding",),), "copy"),
         Entry(e + "position_embeddings.weight", (c.max_length, d),
               (ours + ("position_embedding",),), "copy"),
         Entry(e + "token_type_embeddings.weight", (c.type_vocab_size, d),
               (ours + ("token_type_embedding",),), "copy")]
  out += names.norm(e + "LayerNorm", ours + ("embed_norm",), d)
  for i in range(c.num_layers):
    h, o = f"{prefix}encoder.layer.{i}.", ours + (f"layers_{i}",)
    for name in ("query", "key", "value"):
      out += names.linear(h + "attention.self." + name, o + ("attn", name),
                          d, d)
    out += names.linear(h + "attention.output.dense", o + ("attn", "out"),
                        d, d)
    out += names.norm(h + "attention.output.LayerNorm", o + ("attn_norm",),
                      d)
    out += names.linear(h + "intermediate.dense", o + ("mlp", "fc1"), d,
                        c.mlp_dim)
    out += names.linear(h + "output.dense", o + ("mlp", "fc2"), c.mlp_dim, d)
    out += names.norm(h + "output.LayerNorm", o + ("mlp_norm",), d)
  if c.pooling == "cls_pooler":
    out += names.linear(prefix + "pooler.dense", ours + ("pooler",), d, d)
  bias = c.projection_bias
  if c.projection == "mlp":
    out += names.linear(proj_prefix + "0", ours + ("proj_fc1",), d,
                        c.projection_hidden, bias=bias)
    out += names.linear(proj_prefix + "2", ours + ("proj_fc2",),
                        c.projection_hidden, c.projection_dim, bias=bias)
  elif c.projection == "linear":
    out += names.linear(proj_prefix.rstrip("."), ours + ("projection",), d,
                        c.projection_dim, bias=bias)
  return out


def unused_names(c: BertConfig, prefix: str) -> Tuple[str, ...]:
  """Tensors a BERT checkpoint may hold that the tower does not use.

  BertModel's pooler, unless the pooling is "cls_pooler" (open_clip builds
  the model without it then, but a state dict saved from a full BertModel
  has it), and the `token_type_ids` buffer of zeros older transformers
  saved. Readers drop exactly these names; any other tensor the entries
  lack stays an error in `names.to_params`.
  """
  out = (prefix + "embeddings.token_type_ids",)
  if c.pooling != "cls_pooler":
    out += (prefix + "pooler.dense.weight", prefix + "pooler.dense.bias")
  return out


def drop_unused(tensors: Mapping[str, np.ndarray], c: BertConfig,
                prefix: str) -> dict:
  """`tensors` without `unused_names(c, prefix)`."""
  skip = set(unused_names(c, prefix))
  return {k: v for k, v in tensors.items() if k not in skip}


def config_from_hf(raw: Mapping[str, Any], *, projection: str,
                   projection_dim: int, pooling: str = "cls",
                   projection_bias: bool = False,
                   projection_hidden: Optional[int] = None,
                   path: str = "config.json") -> BertConfig:
  """A BertConfig from a BERT config.json dict (transformers' BertConfig
  defaults for the keys it leaves out) and open_clip's pooling and
  projection; `path` names the file in messages."""
  model_type = raw.get("model_type", "bert")
  if model_type != "bert":
    raise UserError(f"model_type {model_type!r} in {path}: the BERT text "
                    f"tower reads 'bert' configs only")
  position_type = raw.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise UserError(f"position_embedding_type {position_type!r} in {path}: "
                    f"only 'absolute' positions are supported")
  with tokenizers.quiet_transformers() as transformers:
    try:
      cfg = transformers.BertConfig.from_dict(dict(raw))
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"invalid BERT config {path}: {e}") from None
  pad = cfg.pad_token_id
  return BertConfig(
      vocab_size=int(cfg.vocab_size), hidden_size=int(cfg.hidden_size),
      num_layers=int(cfg.num_hidden_layers),
      num_heads=int(cfg.num_attention_heads),
      mlp_dim=int(cfg.intermediate_size),
      max_length=int(cfg.max_position_embeddings),
      type_vocab_size=int(cfg.type_vocab_size), act=str(cfg.hidden_act),
      eps=float(cfg.layer_norm_eps),
      pad_token_id=int(pad if pad is not None else 0),
      projection=projection, projection_dim=int(projection_dim),
      projection_hidden=projection_hidden, projection_bias=projection_bias,
      pooling=pooling)


def _shape(tensors: Mapping[str, np.ndarray], name: str, ndim: int,
           where: Mapping[str, str]) -> Tuple[int, ...]:
  if name not in tensors:
    raise UserError(f"missing tensor {name!r} in the checkpoint: the BERT "
                    f"text tower's shape is read from it")
  shape = tuple(np.shape(tensors[name]))
  if len(shape) != ndim:
    raise UserError(f"tensor {name!r} in {where.get(name, 'the checkpoint')} "
                    f"has shape {shape}; expected {ndim} dimensions")
  return shape


def config_from_tensors(tensors: Mapping[str, np.ndarray], prefix: str,
                        proj_prefix: str, *, pooling: str = "cls",
                        num_heads: Optional[int] = None,
                        where: Optional[Mapping[str, str]] = None
                        ) -> BertConfig:
  """A BertConfig from the tensors alone, for folders without a BERT
  config.json (BiomedCLIP's hub folder has none).

  Read from shapes: vocab_size, hidden_size, the number of layers,
  intermediate_size, max_position_embeddings, type_vocab_size, and the
  projection under `proj_prefix` (MLP "0"/"2", Linear, or none; its width
  and biases). The shapes cannot tell the number of attention heads:
  `num_heads`, else BERT's convention of 64 channels a head
  (hidden_size // 64; 12 for PubMedBERT's 768), else a UserError. The rest
  (activation "gelu", LayerNorm epsilon 1e-12, pad token 0) are
  transformers' BertConfig defaults, which PubMedBERT keeps.
  """
  where = where or {}
  e = prefix + "embeddings."
  vocab, d = _shape(tensors, e + "word_embeddings.weight", 2, where)
  positions = _shape(tensors, e + "position_embeddings.weight", 2, where)[0]
  types = _shape(tensors, e + "token_type_embeddings.weight", 2, where)[0]
  pattern = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
  found = {int(m.group(1)) for m in map(pattern.match, tensors) if m}
  if not found:
    raise UserError(f"no tensors {prefix}encoder.layer.N.* in the "
                    f"checkpoint: no BERT layers")
  num_layers = max(found) + 1
  if found != set(range(num_layers)):
    missing = min(set(range(num_layers)) - found)
    raise UserError(f"missing tensors {prefix}encoder.layer.{missing}.* in "
                    f"the checkpoint (layers up to {num_layers - 1} exist)")
  mlp_dim = _shape(tensors, f"{prefix}encoder.layer.0.intermediate.dense."
                   f"weight", 2, where)[0]
  if num_heads is None:
    if d % HEAD_DIM:
      raise UserError(
          f"cannot tell the BERT text tower's attention heads: hidden size "
          f"{d} is not a multiple of {HEAD_DIM} (BERT's head width); give "
          f"num_attention_heads")
    num_heads = d // HEAD_DIM
  p = proj_prefix
  bias = p + "0.bias" in tensors or p + "bias" in tensors
  if p + "0.weight" in tensors:
    hidden = _shape(tensors, p + "0.weight", 2, where)[0]
    out = _shape(tensors, p + "2.weight", 2, where)[0]
    projection = dict(projection="mlp", projection_dim=out,
                      projection_hidden=hidden)
  elif p + "weight" in tensors:
    out = _shape(tensors, p + "weight", 2, where)[0]
    projection = dict(projection="linear", projection_dim=out)
  else:
    projection = dict(projection="none", projection_dim=d)
  shapes = dict(model_type="bert", vocab_size=vocab, hidden_size=d,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                intermediate_size=mlp_dim, max_position_embeddings=positions,
                type_vocab_size=types)
  return config_from_hf(shapes, pooling=pooling,
                        projection_bias=bias, path="the checkpoint's tensors",
                        **projection)
