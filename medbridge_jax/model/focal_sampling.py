"""Focal Sampling: a global view plus local crops, per expert input size.

From each stored high-resolution image (B, H, W) in [0, 1] we make views for
one expert whose input side is `side`:

  global view  the whole image, downsized with an antialiased filter to
              `side` (or to `global_side`, a larger whole-image view the
              tower reads with interpolated position embeddings). A plain
              nearest/strided sample would alias: a finding a few pixels
              wide is kept or dropped by chance. Antialiasing keeps it, but
              at a fraction of its contrast, which is why local views exist.
  local views  square crops of `crop` stored pixels, resized to `side`. By
              default `crop == side` (config `focal.crop_size = 0`): native
              resolution, no resize at all.

Crop positions are shared between experts by their centres:
  training    one set of centres per image (`random_centres`): uniform
              over the centres where the largest expert crop fits, or with
              probability `lung_bias` in the lung fields (`LUNG_BOXES`).
              Each expert's corner is its centre minus half its own crop
              (`corners_from_centres`), so experts of different sides look
              at the same places and no crop is pinned to the border;
  evaluation  each expert's own sliding windows with the same overlap,
              covering every pixel; the last window of each row and column
              is flush with the border.

Everything is pure JAX on device arrays: one jit, no host round-trips, and
deterministic given the PRNG key. The window layout is a pure function of
static sizes (`sliding_windows`) so tests can check it exactly, and
`describe` says which views each expert gets under a config.
"""

from typing import Any, List, Optional, Sequence

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


def crop_side(crop_size: int, side: int) -> int:
  """Crop side in stored pixels for an expert of input side `side`:
  `crop_size`, or the expert's own side (native resolution) when 0."""
  return int(crop_size) if crop_size > 0 else int(side)


def check_crop(height: int, width: int, crop: int) -> None:
  """Raises UserError when a crop of `crop` pixels does not fit the image."""
  if crop < 1 or crop > min(height, width):
    raise UserError(
        f"model.focal.crop_size: a {crop} px crop must be between 1 and the "
        f"stored image side ({height}x{width})")


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


def random_centres(key: Array, batch: int, num: int, height: int, width: int,
                   lung_bias: float = 0.0, crop: int = 1) -> Array:
  """(batch, num, 2) int32 random crop centres (row, col), in pixels.

  Uniform over the centres at which a `crop`-pixel crop lies inside the
  image (corner + crop // 2 for every valid corner), so that a crop of that
  side is never pinned to the border: pass the largest crop side of the
  experts that share the centres, and every smaller crop, cut around the
  same centre, fits as well. (Centres uniform over the whole image would pin
  crop/side of the crops to each border, where the lungs are not.) With
  probability `lung_bias` per crop the centre is instead uniform in one of
  the two `LUNG_BOXES` (left or right at random), kept in the same range.
  """
  if not 0.0 <= lung_bias <= 1.0:
    raise UserError(f"model.focal.lung_bias={lung_bias} must be in [0, 1]")
  check_crop(height, width, crop)
  k_uni, k_lung, k_side, k_use = jax.random.split(key, 4)
  size = jnp.asarray([height, width], jnp.float32)
  limit = jnp.asarray([height - crop, width - crop], jnp.int32)
  u = jax.random.uniform(k_uni, (batch, num, 2))
  corners = jnp.minimum(jnp.floor(u * (limit + 1)).astype(jnp.int32), limit)
  centres = corners + crop // 2
  if lung_bias > 0.0:
    boxes = jnp.asarray(LUNG_BOXES, jnp.float32)  # (2, 4)
    side = jax.random.bernoulli(k_side, 0.5, (batch, num)).astype(jnp.int32)
    box = boxes[side]  # (batch, num, 4)
    v = jax.random.uniform(k_lung, (batch, num, 2))
    lo, hi = box[..., 0::2], box[..., 1::2]  # (row0, col0), (row1, col1)
    lung = jnp.floor((lo + v * (hi - lo)) * size).astype(jnp.int32)
    lung = jnp.clip(lung, crop // 2, limit + crop // 2)
    use = jax.random.bernoulli(k_use, lung_bias, (batch, num))
    centres = jnp.where(use[..., None], lung, centres)
  return centres


def corners_from_centres(centres: Array, crop: int, height: int,
                         width: int) -> Array:
  """Top-left corners (…, 2) of `crop`-pixel crops around `centres` (…, 2):
  centre - crop // 2, clamped so the crop lies inside the image."""
  check_crop(height, width, crop)
  limit = jnp.asarray([height - crop, width - crop], jnp.int32)
  return jnp.clip(jnp.asarray(centres, jnp.int32) - crop // 2, 0, limit)


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


def local_views(images: Array, *, side: int, crop: int, train: bool,
                centres: Optional[Array] = None, overlap: float = 0.25,
                method: str = "linear",
                train_windows: str = "random") -> Array:
  """Local views (B, n, side, side) of images (B, H, W).

  Training with random windows: one crop around each of `centres` (B, n,
  2), shared by all experts (`random_centres`). Otherwise (evaluation, or
  `train_windows="sliding"`): every sliding window of `crop` pixels.
  """
  if train_windows not in TRAIN_WINDOWS:
    raise UserError(f"model.focal.train_windows={train_windows!r}; expected "
                    f"one of {TRAIN_WINDOWS}")
  b, h, w = images.shape
  if train and train_windows == "random":
    if centres is None:
      raise ValueError("random training views need crop centres "
                       "(random_centres, rng stream 'focal')")
    if centres.shape[:1] != (b,) or centres.shape[-1:] != (2,):
      raise ValueError(f"centres {centres.shape} do not match a batch of "
                       f"{b} images")
    corners = corners_from_centres(centres, crop, h, w)
  else:
    fixed = jnp.asarray(sliding_windows(h, w, crop, overlap))
    corners = jnp.broadcast_to(fixed[None], (b,) + fixed.shape)
  return resize(extract(images, corners, crop), side, method)


def view_groups(images: Array, *, side: int, crop: int, num_local: int,
                train: bool, centres: Optional[Array] = None,
                overlap: float = 0.25, method: str = "linear",
                train_windows: str = "random", global_view: bool = True,
                global_side: int = 0) -> List[Array]:
  """An expert's views of images (B, H, W), in groups of one side each.

  In view order: the global view (B, 1, G, G) with G = `global_side` or
  `side` when 0, then the local views (B, n, side, side) when `num_local`
  > 0 (see `local_views`). Groups of the same side are stacked into one,
  so by default there is a single (B, N, side, side) group; a different
  `global_side` gives two, which the tower runs as separate batches.
  """
  if images.ndim != 3:
    raise ValueError(f"images must be (B, H, W); got {images.shape}")
  if not global_view and num_local <= 0:
    raise UserError("model.focal.global_view=False needs focal sampling "
                    "(model.focal.enabled=True): no views are left")
  groups = []
  if global_view:
    groups.append(resize(images, global_side or side, method)[:, None])
  if num_local > 0:
    if train and train_windows == "random" and centres is not None and (
        centres.shape[1] != num_local):
      raise ValueError(f"{centres.shape[1]} crop centres for "
                       f"num_local={num_local}")
    local = local_views(images, side=side, crop=crop, train=train,
                        centres=centres, overlap=overlap, method=method,
                        train_windows=train_windows)
    if groups and groups[0].shape[-1] == side:
      groups[0] = jnp.concatenate([groups[0], local], axis=1)
    else:
      groups.append(local)
  return groups


def views(images: Array, **kwargs) -> Array:
  """All views (B, N, side, side) of one expert: `view_groups` stacked.
  A `global_side` other than `side` has no single stack: an error."""
  groups = view_groups(images, **kwargs)
  if len(groups) > 1:
    raise ValueError("views of different sides (global_side != side): use "
                     "view_groups")
  return groups[0]


def num_views(height: int, width: int, *, crop: int, num_local: int,
              train: bool, overlap: float, train_windows: str = "random",
              global_view: bool = True) -> int:
  """N, the number of views `views` returns for these settings."""
  first = 1 if global_view else 0
  if num_local <= 0:
    return first
  if train and train_windows == "random":
    return first + num_local
  return first + len(sliding_windows(height, width, crop, overlap))


def check_config(image_size: int, expert_sides: Sequence[int],
                 focal: Any) -> None:
  """Raises UserError naming the `model.focal` key that cannot work for
  stored images of side `image_size` and experts of input sides
  `expert_sides`. `focal` is `config.model.focal`."""
  if focal.resize not in RESIZE_METHODS:
    raise UserError(f"model.focal.resize={focal.resize!r}; expected one of "
                    f"{RESIZE_METHODS}")
  if focal.global_side < 0:
    raise UserError(f"model.focal.global_side={focal.global_side} must be "
                    f"0 (each expert's input side) or a side in pixels")
  if focal.global_side > image_size:
    raise UserError(f"model.focal.global_side={focal.global_side} is larger "
                    f"than the stored image (data.image_size={image_size})")
  if not focal.enabled:
    if not focal.global_view:
      raise UserError("model.focal.global_view=False needs "
                      "model.focal.enabled=True: no views would be left")
    return
  if focal.num_local < 1:
    raise UserError(f"model.focal.num_local={focal.num_local} must be >= 1 "
                    f"(model.focal.enabled=False turns local views off)")
  if focal.crop_size < 0:
    raise UserError(f"model.focal.crop_size={focal.crop_size} must be 0 "
                    f"(each expert's input side) or a side in pixels")
  if focal.train_windows not in TRAIN_WINDOWS:
    raise UserError(f"model.focal.train_windows={focal.train_windows!r}; "
                    f"expected one of {TRAIN_WINDOWS}")
  if not 0.0 <= focal.lung_bias <= 1.0:
    raise UserError(f"model.focal.lung_bias={focal.lung_bias} must be in "
                    f"[0, 1]")
  if not 0.0 <= focal.eval_overlap < 1.0:
    raise UserError(f"model.focal.eval_overlap={focal.eval_overlap} must be "
                    f"in [0, 1)")
  for k, side in enumerate(expert_sides):
    crop = crop_side(focal.crop_size, side)
    if crop > image_size:
      what = (f"={focal.crop_size}" if focal.crop_size else
              f"=0 gives expert {k} its input side {side} px, which")
      raise UserError(f"model.focal.crop_size{what} is larger than the "
                      f"stored image (data.image_size={image_size})")


def describe(image_size: int, expert_sides: Sequence[int],
             focal: Any) -> List[dict]:
  """The views each expert gets under `focal` (`config.model.focal`).

  Per expert, a dict: "expert" (index), "image" (stored side), "side"
  (input side), "crop" (crop side in stored pixels; 0 with focal off),
  "scale" (side / crop: 1.0 is native resolution, > 1 upsampled),
  "global_side" (0 without a global view), "train_views" (N in a training
  step), "eval_grid" ((rows, cols) of sliding windows), "eval_views" (N at
  evaluation). Checks the config first (`check_config`).
  """
  check_config(image_size, expert_sides, focal)
  first = 1 if focal.global_view else 0
  rows = []
  for k, side in enumerate(expert_sides):
    row = {"expert": k, "image": int(image_size), "side": int(side),
           "crop": 0, "scale": 0.0,
           "global_side": int(focal.global_side or side) if first else 0,
           "train_views": first, "eval_grid": (0, 0), "eval_views": first}
    if focal.enabled:
      crop = crop_side(focal.crop_size, side)
      n = len(window_starts(image_size, crop, focal.eval_overlap))
      train_local = (focal.num_local if focal.train_windows == "random"
                     else n * n)
      row.update(crop=crop, scale=side / crop, eval_grid=(n, n),
                 train_views=first + train_local, eval_views=first + n * n)
    rows.append(row)
  return rows


def summary(rows: Sequence[dict]) -> str:
  """One line of text from `describe`'s rows."""
  parts = []
  for r in rows:
    g = f"global {r['global_side']} px" if r["global_side"] else "no global"
    first = 1 if r["global_side"] else 0
    if not r["crop"]:
      parts.append(f"expert {r['expert']} ({r['side']} px): {g} view only")
      continue
    scale = ("native" if r["scale"] == 1.0 else
             f"x{r['scale']:.2f} " + ("up" if r["scale"] > 1 else "down"))
    rows_, cols = r["eval_grid"]
    lead = f"{first} + " if first else ""
    parts.append(
        f"expert {r['expert']} ({r['side']} px): {g}, crop {r['crop']} px "
        f"({scale}); train {lead}{r['train_views'] - first}, eval "
        f"{lead}{rows_}x{cols} = {r['eval_views']} views")
  return f"focal views on {rows[0]['image'] if rows else '?'} px images: " + (
      "; ".join(parts))
