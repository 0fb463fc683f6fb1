"""The CLIP and SigLIP image towers (ViT) as one linen module.

CLIP: bias-free patch conv, class token, pre-norm, post-norm of the class
token, linear projection. SigLIP: patch conv with bias, no class token, no
pre-norm, post-norm of all tokens, attention-pooling (MAP) head.

The tower runs in pieces so the Query-Encoder can stop after layer T and
resume with extra tokens:

  tokens = tower.apply(v, pixels, method="embed")
  tokens = tower.apply(v, tokens, 0, T, method="encode")
  tokens, extra = tower.apply(v, tokens, extra, T, L,
                              method="encode_with_extra")
  features = tower.apply(v, tokens, method="pool")
"""

import dataclasses
import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers

Array = jax.Array
MODES = ("non_destructive", "joint")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shape of an image tower, read from the checkpoint's `vision_config`."""
  family: str  # "clip" | "siglip".
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  image_size: int  # Side the position embeddings were trained for.
  act: str  # transformers' `hidden_act`.
  eps: float  # LayerNorm epsilon.
  num_channels: int = 3
  projection_dim: int = 0  # CLIP `visual_projection` width.
  use_head: bool = True  # SigLIP MAP head (`vision_use_head`).

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    return 1 if self.family == "clip" else 0


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of PyTorch's bicubic resize, align_corners=False.

  Same sampling points (no clamping of the source coordinate), the same
  Keys kernel with a = -0.75, and the same border clamping of taps as
  `torch.nn.functional.interpolate(mode="bicubic")`, which transformers
  uses for `interpolate_pos_encoding=True`.
  """
  a = -0.75
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    x0 = int(np.floor(src))
    t = src - x0
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for j, c in enumerate(taps):
      w[i, min(max(x0 - 1 + j, 0), in_size - 1)] += c
  return w.astype(np.float32)


def resize_positions(pos: Array, grid: Tuple[int, int],
                     new_grid: Tuple[int, int]) -> Array:
  """Bicubic resize of a (gh*gw, D) position table to `new_grid`."""
  if tuple(grid) == tuple(new_grid):
    return pos
  d = pos.shape[-1]
  table = pos.reshape(grid[0], grid[1], d)
  wh = jnp.asarray(bicubic_matrix(grid[0], new_grid[0]))
  ww = jnp.asarray(bicubic_matrix(grid[1], new_grid[1]))
  hi = jax.lax.Precision.HIGHEST
  table = jnp.einsum("ih,hwd->iwd", wh, table, precision=hi)
  table = jnp.einsum("jw,iwd->ijd", ww, table, precision=hi)
  return table.reshape(new_grid[0] * new_grid[1], d)


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
  """A CLIP or SigLIP image tower. Params float32, compute in `dtype`.

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
    if c.family not in ("clip", "siglip"):
      raise UserError(f"unknown vision family {c.family!r}")
    p, d = c.patch_size, c.hidden_size
    self.patch_embed = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID",
        use_bias=c.family == "siglip", dtype=self.dtype,
        param_dtype=jnp.float32)
    num_pos = c.grid * c.grid + c.num_prefix_tokens
    self.position_embedding = self.param(
        "position_embedding", nn.initializers.normal(0.02), (num_pos, d))
    if c.family == "clip":
      self.class_embedding = self.param(
          "class_embedding", nn.initializers.normal(0.02), (d,))
      self.pre_norm = layers.layer_norm(c.eps, self.dtype)
    self.layers = [
        layers.EncoderLayer(d, c.num_heads, c.mlp_dim, c.act, c.eps,
                            self.dtype, self.attention_impl)
        for _ in range(c.num_layers)]
    self.post_norm = layers.layer_norm(c.eps, self.dtype)
    if c.family == "clip" and c.projection_dim:
      self.projection = layers.dense(c.projection_dim, self.dtype,
                                     use_bias=False)
    if c.family == "siglip" and c.use_head:
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
    if shape[1] % c.patch_size or shape[2] % c.patch_size:
      raise UserError(f"pixel height and width must be multiples of the "
                      f"patch size {c.patch_size}; got shape {shape}")

  def _check_range(self, start: int, end: Optional[int]) -> Tuple[int, int]:
    end = self.num_layers if end is None else end
    if not 0 <= start <= end <= self.num_layers:
      raise ValueError(f"layer range [{start}, {end}) outside "
                       f"[0, {self.num_layers}]")
    return start, end

  def embed(self, pixels: Array) -> Array:
    """Patches + class token + positions (+ CLIP pre-norm): (B, S, D)."""
    self.check_pixels(pixels)
    c = self.config
    x = self.patch_embed(jnp.asarray(pixels, self.dtype))
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    pos = self.position_embedding
    prefix = pos[:c.num_prefix_tokens]
    pos = resize_positions(pos[c.num_prefix_tokens:], (c.grid, c.grid),
                           (gh, gw))
    pos = jnp.concatenate([prefix, pos], axis=0).astype(self.dtype)
    if c.family == "clip":
      cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype),
                             (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + pos[None]
    if c.family == "clip":
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
    c = self.config
    x = jnp.asarray(tokens, self.dtype)
    if c.family == "clip":
      x = self.post_norm(x[:, 0])
      return self.projection(x) if c.projection_dim else x
    x = self.post_norm(x)
    # Without a head transformers has no pooled output; the token mean is
    # the usual stand-in (big_vision's "gap").
    return self.head(x, differentiated) if c.use_head else x.mean(axis=1)

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
