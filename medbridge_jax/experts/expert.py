"""`Expert`: one frozen foundation model, ready to call.

Holds the linen image tower, the text tower where the model has one (and
the folder a tokenizer), their float32 params, the tokenizer and the image
normalisation. A vision-only expert (DINOv2, a VLM's vision tower, a folder
without tokenizer files) has `text` None: no zero-shot prompts. The towers and params are plain attributes so that
model code can use them inside its own jitted functions:

  expert.vision.apply({"params": expert.params["vision"]}, pixels,
                      method="embed")
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.experts.vit import VisionTower


def unit_range(images) -> jax.Array:
  """uint8 images (0..255) or float ones in [0, 1] -> float32 in [0, 1].

  Batches travel from the host as uint8 (a quarter of float32's bytes) and
  are scaled here, on the device: the one place that knows the 255.
  """
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def normalize_pixels(images, mean, std) -> jax.Array:
  """uint8 or [0, 1] channels-last images (..., 1 or 3) -> normalised
  3-channel float32 pixels, as the checkpoint's image processor makes them."""
  x = unit_range(images)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(eq=False)
class Expert:
  """A loaded expert; see the module docstring and docs/CONTRACTS.md."""
  name: str
  path: str
  family: str  # "clip", "siglip", "dinov2", ... (formats' Checkpoint).
  image_size: int  # The checkpoint's native input side.
  image_mean: Tuple[float, float, float]
  image_std: Tuple[float, float, float]
  vision: VisionTower
  text: Any  # The linen text tower, or None for a vision-only expert.
  # {"vision"[, "text", "logit_scale", "logit_bias"]}.
  params: dict
  max_length: int  # Token sequence length tokenize pads to (0: no text).
  make_tokenizer: Optional[Callable[[], Any]] = dataclasses.field(
      default=None, repr=False)
  format: str = "hf_clip"  # The reader that loaded it (formats.MODULES).
  disk_dtype: str = "float32"  # The dtype most weights are stored in.
  vision_only_reason: Optional[str] = None  # Why `text` is None.

  @property
  def has_text(self) -> bool:
    """Whether the expert can embed text (zero-shot prompts, CoOp)."""
    return self.text is not None

  def require_text(self, what: str):
    """Raises a UserError naming `what` needs text for a vision-only
    expert."""
    if not self.has_text:
      raise UserError(f"{what} needs a text tower, and expert {self.name} "
                      f"is vision-only ({self.vision_only_reason})")

  @property
  def dtype(self):
    return self.vision.dtype

  @functools.cached_property
  def tokenizer(self):
    """The checkpoint's transformers tokenizer (built on first use)."""
    self.require_text("tokenizing")
    return self.make_tokenizer()

  @property
  def logit_scale(self) -> jax.Array:
    """exp(logit_scale): the temperature the checkpoint was trained with."""
    self.require_text("a logit scale")
    return jnp.exp(jnp.reshape(self.params["logit_scale"], ()))

  @property
  def logit_bias(self) -> jax.Array:
    """SigLIP's learned bias; 0 for CLIP."""
    if "logit_bias" not in self.params:
      return jnp.zeros((), jnp.float32)
    return jnp.reshape(self.params["logit_bias"], ())

  @functools.cached_property
  def _image_fn(self):
    return jax.jit(lambda p, x: self.vision.apply({"params": p}, x)[0])

  @functools.cached_property
  def _text_fn(self):
    return jax.jit(lambda p, i, m: self.text.apply({"params": p}, i, m)[0])

  def image_features(self, pixel_values) -> jax.Array:
    """get_image_features for NHWC pixels already normalised (see normalize).

    Sides other than `image_size` use interpolated position embeddings, as
    transformers' `interpolate_pos_encoding=True` does.
    """
    pixel_values = jnp.asarray(pixel_values, jnp.float32)
    self.vision.check_pixels(pixel_values)
    return self._image_fn(self.params["vision"], pixel_values)

  def text_features(self, input_ids, attention_mask=None) -> jax.Array:
    """get_text_features for (B, T) token ids (and optional 0/1 mask)."""
    self.require_text("text features")
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
      raise UserError(f"input_ids must be (batch, length); got {ids.shape}")
    if ids.shape[1] > self.text.config.max_length:
      raise UserError(f"token sequence of length {ids.shape[1]} is longer "
                      f"than {self.name}'s {self.text.config.max_length}")
    mask = None if attention_mask is None else jnp.asarray(attention_mask)
    return self._text_fn(self.params["text"], ids, mask)

  def tokenize(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int32 (N, max_length), with the
    checkpoint's own tokenizer, padded to its max length and truncated."""
    if isinstance(texts, str):
      texts = [texts]
    # Right padding whatever the tokenizer's default (Gemma's, which SigLIP 2
    # ships, pads on the left): SigLIP pools the last position and was
    # trained with padding after the text.
    out = self.tokenizer(list(texts), padding="max_length", truncation=True,
                         max_length=self.max_length, padding_side="right",
                         return_tensors="np")
    ids = np.asarray(out["input_ids"], np.int32)
    mask = out.get("attention_mask")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    return ids, mask

  def encode_text(self, texts: Sequence[str]) -> jax.Array:
    """Text features of raw strings, used the way the family was trained.

    CLIP (and BERT) get their padding mask (pooling at the end token makes
    it irrelevant for CLIP anyway). SigLIP was trained on max-length padded
    text without a mask (big_vision, and transformers' pipelines before
    5.x), so the pad tokens are attended to, as its pooling at the last
    position expects.
    """
    ids, mask = self.tokenize(texts)
    return self.text_features(ids, self.text_mask(mask))

  def text_mask(self, mask):
    """The attention mask the text tower is run with: `mask`, or None for
    towers trained without one (SigLIP)."""
    return None if self.text.config.family == "siglip" else mask

  def normalize_pixels(self, images) -> jax.Array:
    """uint8 or [0, 1] images (..., H, W, 1 or 3) -> this expert's
    normalised 3-channel pixels."""
    x = unit_range(images)
    if x.ndim < 3 or x.shape[-1] not in (1, 3):
      raise UserError(f"images for {self.name} must be (..., H, W, 1) or "
                      f"(..., H, W, 3) with channels last; got {x.shape}")
    return normalize_pixels(x, self.image_mean, self.image_std)

  def with_dtype(self, dtype, attention_impl: Optional[str] = "keep"
                 ) -> "Expert":
    """The same expert computing in `dtype` (params unchanged)."""
    impl = (self.vision.attention_impl if attention_impl == "keep"
            else attention_impl)
    text = (None if self.text is None
            else self.text.clone(dtype=dtype, attention_impl=impl))
    return dataclasses.replace(
        self, vision=self.vision.clone(dtype=dtype, attention_impl=impl),
        text=text)
