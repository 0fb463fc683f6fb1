"""Every ViT image tower we load, as one linen module.

The families differ in a few switches of `VisionConfig`, set by the format
readers from the checkpoint: CLIP (bias-free patch conv, class token,
pre-norm, post-norm of the class token, linear projection), SigLIP (patch
conv with bias, no class token, no pre-norm, post-norm of all tokens,
attention-pooling (MAP) head, or the token mean when saved without it),
DINOv2 (class token, optional register tokens, layer scale, post-norm of
the class token), open_clip's and timm's ViTs (fused qkv on disk, split at
load; a class token; with or without pre-norm and projection).

The tower runs in pieces so the Query-Encoder can stop after layer T and
resume with extra tokens:

  tokens = tower.apply(v, pixels, method="embed")
  tokens = tower.apply(v, tokens, 0, T, method="encode")
  tokens, extra = tower.apply(v, tokens, extra, T, L,
                              method="encode_with_extra")
  features = tower.apply(v, tokens, method="pool")
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts import positions

Array = jax.Array
MODES = ("non_destructive", "joint")


POOLINGS = ("class", "map", "mean")
INTERPOLATIONS = ("bicubic", "bicubic_antialias")

# What a family's tower looks like where its reader does not say otherwise.
FAMILY_DEFAULTS = {
    "clip": dict(class_token=True, pre_norm=True, patch_bias=False,
                 pooling="class"),
    "siglip": dict(class_token=False, pre_norm=False, patch_bias=True,
                   pooling="map"),
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shape and architecture of an image tower, read from the checkpoint.

  The switches left at None take the family's defaults (FAMILY_DEFAULTS);
  families without defaults set them all.
  """
  family: str  # "clip", "siglip", "dinov2", "open_clip", "timm_vit", ...
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int  # Side the position embeddings were trained for.
  act: str  # transformers' `hidden_act`.
  eps: float  # LayerNorm epsilon.
  num_channels: int = 3
  projection_dim: int = 0  # Width of a bias-free projection after pooling.
  use_head: bool = True  # SigLIP's MAP head (`vision_use_head`).
  class_token: Optional[bool] = None  # A learned [CLS] before the patches.
  pre_norm: Optional[bool] = None  # LayerNorm after the embeddings (CLIP).
  patch_bias: Optional[bool] = None  # The patch conv has a bias.
  # "class": post-norm of the class token; "map": SigLIP's attention
  # pooling of the post-normed tokens; "mean": mean of the post-normed
  # patch tokens (a SigLIP tower saved without its head).
  pooling: Optional[str] = None
  layer_scale: bool = False  # DINOv2's per-channel residual scales.
  num_registers: int = 0  # DINOv2 register tokens (after the class token).
  # How position tables are resized to another grid: PyTorch's bicubic, or
  # its antialiased bicubic (DINOv2 with registers, timm).
  position_interpolation: str = "bicubic"

  def __post_init__(self):
    defaults = dict(FAMILY_DEFAULTS.get(self.family, {}))
    if self.family == "siglip" and not self.use_head:
      defaults["pooling"] = "mean"
    for key, value in defaults.items():
      if getattr(self, key) is None:
        object.__setattr__(self, key, value)
    unset = [k for k in ("class_token", "pre_norm", "patch_bias", "pooling")
             if getattr(self, k) is None]
    if unset:
      raise ValueError(f"vision family {self.family!r} has no defaults; "
                       f"set {', '.join(unset)}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling {self.pooling!r} not in {POOLINGS}")
    if self.pooling == "class" and not self.class_token:
      raise ValueError("class-token pooling needs a class token")
    if self.position_interpolation not in INTERPOLATIONS:
      raise ValueError(f"position_interpolation "
                       f"{self.position_interpolation!r} not in "
                       f"{INTERPOLATIONS}")

  @property
  def grid(self) -> int:
    """Patches per side at `image_size` (a remainder is dropped, as the
    strided patch conv of every reference does)."""
    return self.image_size // self.patch_size

  @property
  def num_position_prefix(self) -> int:
    """Rows of the position table before the patches' (the class token's)."""
    return int(self.class_token)

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: class token, then registers."""
    return int(self.class_token) + self.num_registers


class MapHead(nn.Module):
  """SigLIP's multi-head attention pooling: one learned probe query."""
  config: VisionConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, differentiated: bool = False) -> Array:
    c = self.config
    d, n = c.hidden_size, c.num_heads
    b, s, _ = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.broadcast_to(probe, (b, 1, d)).astype(self.dtype)
    q = layers.dense(d, self.dtype, "query")(probe).reshape(b, 1, n, d // n)
    k = layers.dense(d, self.dtype, "key")(x).reshape(b, s, n, d // n)
    v = layers.dense(d, self.dtype, "value")(x).reshape(b, s, n, d // n)
    h = layers.attend(q, k, v, None, self.attention_impl,
                      differentiated).reshape(b, 1, d)
    h = layers.dense(d, self.dtype, "out")(h)
    y = layers.layer_norm(c.eps, self.dtype, "norm")(h)
    h = h + layers.Mlp(d, c.mlp_dim, c.act, self.dtype, name="mlp")(y)
    return h[:, 0]


class VisionTower(nn.Module):
  """A ViT image tower (see VisionConfig). Params float32, compute in
  `dtype`.

  Pixels are NHWC, normalised as the checkpoint's image processor does. Any
  side that is a multiple of the patch size works; position embeddings are
  resized bicubically when the patch grid differs from the checkpoint's.
  """
  config: VisionConfig
  dtype: Any = jnp.float32
  # None | "auto" | "xla" | "cudnn": see layers.choose_attention.
  attention_impl: Optional[str] = None

  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  @property
  def num_prefix_tokens(self) -> int:
    return self.config.num_prefix_tokens

  def setup(self):
    c = self.config
    p, d = c.patch_size, c.hidden_size
    self.patch_embed = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", use_bias=c.patch_bias,
        dtype=self.dtype, param_dtype=jnp.float32)
    num_pos = c.grid * c.grid + c.num_position_prefix
    self.position_embedding = self.param(
        "position_embedding", nn.initializers.normal(0.02), (num_pos, d))
    if c.class_token:
      self.class_embedding = self.param(
          "class_embedding", nn.initializers.normal(0.02), (d,))
    if c.num_registers:
      self.registers = self.param(
          "registers", nn.initializers.zeros, (c.num_registers, d))
    if c.pre_norm:
      self.pre_norm = layers.layer_norm(c.eps, self.dtype)
    self.layers = [
        layers.EncoderLayer(d, c.num_heads, c.mlp_dim, c.act, c.eps,
                            self.dtype, self.attention_impl, c.layer_scale)
        for _ in range(c.num_layers)]
    self.post_norm = layers.layer_norm(c.eps, self.dtype)
    if c.projection_dim:
      self.projection = layers.dense(c.projection_dim, self.dtype,
                                     use_bias=False)
    if c.pooling == "map":
      self.head = MapHead(c, self.dtype, self.attention_impl)

  def check_pixels(self, pixels: Array):
    c = self.config
    shape = tuple(pixels.shape)
    if len(shape) != 4:
      raise UserError(f"pixels must be NHWC (batch, height, width, "
                      f"{c.num_channels}); got shape {shape}")
    if shape[-1] != c.num_channels:
      hint = (" (looks like NCHW: put channels last)"
              if shape[1] == c.num_channels else "")
      raise UserError(f"pixels must have {c.num_channels} channels last "
                      f"(NHWC); got shape {shape}{hint}")
    if shape[1] < c.patch_size or shape[2] < c.patch_size:
      raise UserError(f"pixel height and width must be at least the patch "
                      f"size {c.patch_size}; got shape {shape}")

  def _check_range(self, start: int, end: Optional[int]) -> Tuple[int, int]:
    end = self.num_layers if end is None else end
    if not 0 <= start <= end <= self.num_layers:
      raise ValueError(f"layer range [{start}, {end}) outside "
                       f"[0, {self.num_layers}]")
    return start, end

  def embed(self, pixels: Array) -> Array:
    """Patches + class token + positions (+ registers, + pre-norm):
    (B, S, D). A side that is not a multiple of the patch size loses its
    remainder, as the references' strided patch conv does."""
    self.check_pixels(pixels)
    c = self.config
    x = self.patch_embed(jnp.asarray(pixels, self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    pos = self.position_embedding
    prefix = pos[:c.num_position_prefix]
    pos = positions.resize(pos[c.num_position_prefix:], (c.grid, c.grid),
                           (gh, gw), c.position_interpolation)
    pos = jnp.concatenate([prefix, pos], axis=0).astype(self.dtype)
    if c.class_token:
      cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype),
                             (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + pos[None]
    if c.num_registers:
      # Registers carry no position; they sit between the class token and
      # the patches (DINOv2 with registers).
      reg = jnp.broadcast_to(self.registers.astype(self.dtype),
                             (b, c.num_registers, d))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    if c.pre_norm:
      x = self.pre_norm(x)
    return x

  def encode(self, tokens: Array, start: int = 0,
             end: Optional[int] = None,
             differentiated: bool = False) -> Array:
    """Runs frozen layers [start, end) on (B, S, D) tokens.

    `differentiated`: a training step backpropagates through these layers
    (e.g. to prompts or adapters), so their attention needs a kernel with
    a backward (see layers.choose_attention).
    """
    start, end = self._check_range(start, end)
    x = jnp.asarray(tokens, self.dtype)
    for layer in self.layers[start:end]:
      x = layer(x, differentiated=differentiated)
    return x

  def encode_with_extra(self, tokens: Array, extra: Array, start: int = 0,
                        end: Optional[int] = None,
                        mode: str = "non_destructive") -> Tuple[Array, Array]:
    """Runs layers [start, end) on image tokens plus extra (B, Q, D) tokens.

    "non_destructive": the image tokens go through exactly the ops of
    `encode` (bit-identical result) and never see the extra tokens; the
    extra tokens attend to the image tokens and to each other, reusing each
    layer's image keys and values. "joint": one attention over the
    concatenation, so the image tokens change too.
    """
    start, end = self._check_range(start, end)
    if mode not in MODES:
      raise UserError(f"unknown query mode {mode!r}; expected one of {MODES}")
    x = jnp.asarray(tokens, self.dtype)
    e = jnp.asarray(extra, self.dtype)
    if e.ndim != 3 or e.shape[0] != x.shape[0] or e.shape[2] != x.shape[2]:
      raise ValueError(f"extra tokens {e.shape} do not match image tokens "
                       f"{x.shape} in batch and width")
    s = x.shape[1]
    for layer in self.layers[start:end]:
      if mode == "joint":
        y = layer(jnp.concatenate([x, e], axis=1), differentiated=True)
        x, e = y[:, :s], y[:, s:]
      else:
        x, e = layer.with_extra(x, e)
    return x, e

  def pool(self, tokens: Array, differentiated: bool = False) -> Array:
    """Image features (B, P), what transformers' get_image_features gives.

    `differentiated`: a training step backpropagates through this pooling
    (see layers.choose_attention).
    """
    return self._pool(tokens, differentiated, self.config.num_prefix_tokens)

  def pool_tokens(self, tokens: Array, differentiated: bool = False) -> Array:
    """(B, D) single tokens (e.g. query tokens) through the same post-norm,
    pooling and projection as the image features, each as a one-token
    sequence: with mean pooling, the token itself."""
    return self._pool(tokens[:, None], differentiated, 0)

  def _pool(self, tokens: Array, differentiated: bool, skip: int) -> Array:
    c = self.config
    x = jnp.asarray(tokens, self.dtype)
    if c.pooling == "class":
      x = self.post_norm(x[:, 0])
    else:
      x = self.post_norm(x)
      # Without a head transformers has no pooled output; the mean of the
      # patch tokens is the usual stand-in (big_vision's "gap").
      x = (self.head(x, differentiated) if c.pooling == "map"
           else x[:, skip:].mean(axis=1))
    return self.projection(x) if c.projection_dim else x

  def __call__(self, pixels: Array, output_hidden_states: bool = False,
               differentiated: bool = False):
    """(features, hidden_states): hidden states as transformers lists them
    (the embedding output, then every layer's output), or () if not asked.

    `differentiated`: a training step backpropagates through the whole
    tower (e.g. to LoRA adapters); see layers.choose_attention.
    """
    x = self.embed(pixels)
    hidden = [x]
    for layer in self.layers:
      x = layer(x, differentiated=differentiated)
      hidden.append(x)
    features = self.pool(x, differentiated)
    return features, (tuple(hidden) if output_hidden_states else ())
