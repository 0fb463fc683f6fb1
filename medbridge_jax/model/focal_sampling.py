"""Focal Sampling: a global view plus local crops, per expert input size.

From each stored high-resolution image (B, H, W) in [0, 1] we make views for
one expert, each `side` x `side` (the expert's input side):

  view 0      the whole image, downsized with an antialiased filter. A plain
              nearest/strided sample would alias: a finding a few pixels wide
              is kept or dropped by chance. Antialiasing keeps it, but at
              a fraction of its contrast, which is why the local views exist.
  views 1..   square crops of `crop` stored pixels, resized to `side` (no
              resize at all when `crop == side`: native resolution).

Crop positions are top-left (row, col) corners in stored pixels:
  training    random, uniform over all valid corners, or with probability
              `lung_bias` centred in the lung fields (`LUNG_BOXES`);
  evaluation  sliding windows with a given overlap that cover every pixel;
              the last window of each row and column is flush with the border.

Everything is pure JAX on device arrays: one jit, no host round-trips, and
deterministic given the PRNG key. The window layout is a pure function of
static sizes (`sliding_windows`) so tests can check it exactly.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.errors import UserError

Array = jax.Array

# Lung fields of a frontal chest X-ray as (row0, row1, col0, col1) fractions
# of the image: apices near 10% of the height, diaphragm domes near 75-80%;
# each lung from the chest wall (~10% from the side) to the mediastinum and
# spine (~45% from the side). Generous on purpose: a crop centred anywhere in
# a box still sees lung.
LUNG_BOXES = ((0.10, 0.80, 0.10, 0.45), (0.10, 0.80, 0.55, 0.90))
TRAIN_WINDOWS = ("random", "sliding")

RESIZE_METHODS = ("linear", "cubic", "lanczos3")


def check_crop(height: int, width: int, crop: int) -> None:
  """Raises UserError when a crop of `crop` pixels does not fit the image."""
  if crop < 1 or crop > min(height, width):
    raise UserError(
        f"model.focal.crop_size={crop} must be between 1 and the stored "
        f"image side ({height}x{width})")


def window_starts(length: int, crop: int, overlap: float) -> np.ndarray:
  """Start offsets of sliding windows along one axis.

  Stride `round(crop * (1 - overlap))` (at least 1); the last window ends
  exactly at `length`, so consecutive windows never leave a gap.
  """
  if not 0.0 <= overlap < 1.0:
    raise UserError(f"model.focal.eval_overlap={overlap} must be in [0, 1)")
  if crop >= length:
    return np.zeros((1,), np.int32)
  stride = max(1, int(round(crop * (1.0 - overlap))))
  starts = list(range(0, length - crop, stride)) + [length - crop]
  return np.asarray(starts, np.int32)


def sliding_windows(height: int, width: int, crop: int,
                    overlap: float) -> np.ndarray:
  """(n, 2) int32 top-left corners (row, col) of the evaluation windows.

  Row-major order; together the windows cover every pixel of the image.
  """
  check_crop(height, width, crop)
  rows = window_starts(height, crop, overlap)
  cols = window_starts(width, crop, overlap)
  grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
  return grid.reshape(-1, 2).astype(np.int32)


def random_windows(key: Array, batch: int, num: int, height: int, width: int,
                   crop: int, lung_bias: float = 0.0) -> Array:
  """(batch, num, 2) int32 random top-left corners (row, col) of crops.

  Uniform over all corners in [0, H - crop] x [0, W - crop]; with
  probability `lung_bias` per crop, the crop centre is instead drawn
  uniformly in one of the two `LUNG_BOXES` (left or right at random) and the
  corner clamped into the image. The draws depend on the key only, not on
  `crop`, so experts with different crop sides get matching positions.
  """
  check_crop(height, width, crop)
  if not 0.0 <= lung_bias <= 1.0:
    raise UserError(f"model.focal.lung_bias={lung_bias} must be in [0, 1]")
  k_uni, k_lung, k_side, k_use = jax.random.split(key, 4)
  limit = jnp.asarray([height - crop, width - crop], jnp.int32)
  u = jax.random.uniform(k_uni, (batch, num, 2))
  corners = jnp.minimum(jnp.floor(u * (limit + 1)).astype(jnp.int32), limit)
  if lung_bias > 0.0:
    boxes = jnp.asarray(LUNG_BOXES, jnp.float32)  # (2, 4)
    side = jax.random.bernoulli(k_side, 0.5, (batch, num)).astype(jnp.int32)
    box = boxes[side]  # (batch, num, 4)
    v = jax.random.uniform(k_lung, (batch, num, 2))
    lo, hi = box[..., 0::2], box[..., 1::2]  # (row0, col0), (row1, col1)
    size = jnp.asarray([height, width], jnp.float32)
    centre = (lo + v * (hi - lo)) * size
    lung = jnp.clip(jnp.round(centre - crop / 2).astype(jnp.int32), 0, limit)
    use = jax.random.bernoulli(k_use, lung_bias, (batch, num))
    corners = jnp.where(use[..., None], lung, corners)
  return corners


def resize(images: Array, side: int, method: str = "linear") -> Array:
  """Resizes the last two axes of `images` to `side` x `side`.

  Antialiased when shrinking (jax.image.resize scales the kernel with the
  factor, like PIL); exact identity when the size already matches.
  """
  if method not in RESIZE_METHODS:
    raise UserError(f"model.focal.resize={method!r}; expected one of "
                    f"{RESIZE_METHODS}")
  if images.shape[-2:] == (side, side):
    return images
  shape = images.shape[:-2] + (side, side)
  out = jax.image.resize(images.astype(jnp.float32), shape, method=method,
                         antialias=True)
  return out.astype(images.dtype)


def extract(images: Array, corners: Array, crop: int) -> Array:
  """Crops (B, n, crop, crop) at `corners` (B, n, 2) from images (B, H, W)."""
  def one(image, corner):
    return jax.lax.dynamic_slice(image, (corner[0], corner[1]), (crop, crop))
  return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(images, corners)


def views(images: Array, *, side: int, crop: int, num_local: int,
          train: bool, key: Optional[Array] = None, overlap: float = 0.25,
          lung_bias: float = 0.0, method: str = "linear",
          train_windows: str = "random") -> Array:
  """All views of `images` (B, H, W) for one expert: (B, N, side, side).

  View 0 is the global view. Then `num_local` random crops when training
  (needs `key`; `train_windows="sliding"` uses the evaluation windows in
  training too) or every sliding window when evaluating. `num_local=0`
  gives the global view only (focal sampling off).
  """
  if images.ndim != 3:
    raise ValueError(f"images must be (B, H, W); got {images.shape}")
  if train_windows not in TRAIN_WINDOWS:
    raise UserError(f"model.focal.train_windows={train_windows!r}; expected "
                    f"one of {TRAIN_WINDOWS}")
  b, h, w = images.shape
  out = [resize(images, side, method)[:, None]]
  if num_local > 0:
    if train and train_windows == "random":
      if key is None:
        raise ValueError("training views need a PRNG key (rng stream 'focal')")
      corners = random_windows(key, b, num_local, h, w, crop, lung_bias)
    else:
      fixed = jnp.asarray(sliding_windows(h, w, crop, overlap))
      corners = jnp.broadcast_to(fixed[None], (b,) + fixed.shape)
    out.append(resize(extract(images, corners, crop), side, method))
  return jnp.concatenate(out, axis=1)


def num_views(height: int, width: int, *, crop: int, num_local: int,
              train: bool, overlap: float,
              train_windows: str = "random") -> int:
  """N, the number of views `views` returns for these settings."""
  if num_local <= 0:
    return 1
  if train and train_windows == "random":
    return 1 + num_local
  return 1 + len(sliding_windows(height, width, crop, overlap))
