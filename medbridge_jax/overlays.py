"""Pictures of evidence maps over radiographs: numpy and Pillow only.

  overlay(image, heat)          the radiograph in grey, the map blended on it
  draw_boxes(rgb, boxes, colour) outlines of (y0, x0, y1, x1) boxes
  save_png(rgb, path)           an RGB (or grey) uint8 picture as PNG
  top_regions(heat, k)          the k highest separated peaks and their boxes

Colours come from a 17-stop table of viridis (perceptually uniform, readable
in grey print), interpolated linearly, so nothing here imports matplotlib.
Boxes are (y0, x0, y1, x1) with both ends inclusive, in the picture's pixels,
as `localisation.PixelBox` holds them.
"""

import os
import tempfile
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# viridis at 0, 1/16, ..., 1 (matplotlib's values, rounded to 0..255).
VIRIDIS = np.array([
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139),
    (51, 99, 141), (44, 114, 142), (38, 130, 142), (33, 145, 140),
    (31, 160, 136), (40, 174, 128), (63, 188, 115), (94, 201, 98),
    (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37)],
                   np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
  """float64 (..., 3) colours in [0, 255] of `values` in [0, 1] (clipped)."""
  v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)
  stops = np.linspace(0.0, 1.0, len(VIRIDIS))
  return np.stack([np.interp(v, stops, VIRIDIS[:, c]) for c in range(3)],
                  axis=-1)


def normalise(heat: np.ndarray,
              limits: Optional[tuple[float, float]] = None) -> np.ndarray:
  """`heat` scaled to [0, 1]: by `limits` (lo, hi), clipped, or else by its
  own minimum and maximum; a map with no range is all 0 (nothing to show)."""
  heat = np.asarray(heat, np.float64)
  if not np.all(np.isfinite(heat)):
    raise ValueError("the map holds NaN or infinite values")
  lo, hi = (float(heat.min()), float(heat.max())) if limits is None else (
      float(limits[0]), float(limits[1]))
  if hi <= lo:
    if limits is not None:
      raise ValueError(f"limits {limits}: the high end must exceed the low")
    return np.zeros(heat.shape)
  return np.clip((heat - lo) / (hi - lo), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45,
            limits: Optional[tuple[float, float]] = None) -> np.ndarray:
  """The radiograph in grey with `heat` blended on it: uint8 (H, W, 3).

  Each pixel is (1 - a) * grey + a * colour(h), with h the map scaled to
  [0, 1] (`normalise`: its own min and max, or `limits` to put several
  maps on one scale) and a = alpha * h: where the map is low the radiograph
  shows through untouched, at the map's maximum it is covered by `alpha`.

  Args:
    image: uint8 (H, W) radiograph (the stored, letterboxed image).
    heat: (H, W) map of any float dtype, same shape.
    alpha: opacity of the colour at the map's maximum, in [0, 1].
    limits: optional (lo, hi) values drawn as 0 and 1.
  """
  image = np.asarray(image)
  if image.ndim != 2 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 (H, W); got {image.dtype} "
                     f"{image.shape}")
  if np.shape(heat) != image.shape:
    raise ValueError(f"map {np.shape(heat)} and image {image.shape} differ "
                     f"in shape")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha={alpha} is not in [0, 1]")
  h = normalise(heat, limits)
  a = (alpha * h)[..., None]
  grey = image.astype(np.float64)[..., None]
  out = (1.0 - a) * grey + a * colormap(h)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _check_box(box: Sequence[int], h: int, w: int) -> tuple[int, ...]:
  y0, x0, y1, x1 = (int(v) for v in box)
  if not (0 <= y0 <= y1 < h and 0 <= x0 <= x1 < w):
    raise ValueError(f"box {(y0, x0, y1, x1)} is not inside the {h} x {w} "
                     f"picture")
  return y0, x0, y1, x1


def draw_boxes(rgb: np.ndarray, boxes: Sequence[Sequence[int]],
               colour: Sequence[int] = (255, 64, 64), *,
               width: int = 1) -> np.ndarray:
  """A copy of uint8 (H, W, 3) `rgb` with each box's outline in `colour`.

  Boxes are (y0, x0, y1, x1), ends inclusive, inside the picture; the
  outline is `width` pixels thick, drawn inwards (it never leaves the box).
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
    raise ValueError(f"expected uint8 (H, W, 3); got {rgb.dtype} "
                     f"{rgb.shape}")
  if width < 1:
    raise ValueError(f"width={width} must be >= 1")
  out = rgb.copy()
  c = np.asarray(colour, np.uint8)
  h, w = rgb.shape[:2]
  for box in boxes:
    y0, x0, y1, x1 = _check_box(box, h, w)
    t = width - 1
    out[y0:min(y0 + t, y1) + 1, x0:x1 + 1] = c
    out[max(y1 - t, y0):y1 + 1, x0:x1 + 1] = c
    out[y0:y1 + 1, x0:min(x0 + t, x1) + 1] = c
    out[y0:y1 + 1, max(x1 - t, x0):x1 + 1] = c
  return out


def save_png(rgb: np.ndarray, path: str) -> None:
  """uint8 (H, W, 3) or (H, W) as a PNG at `path`, replaced whole (written
  to a temporary file in the same folder, then renamed)."""
  rgb = np.asarray(rgb)
  if rgb.dtype != np.uint8 or not (
      rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[-1] == 3)):
    raise ValueError(f"expected uint8 (H, W, 3) or (H, W); got {rgb.dtype} "
                     f"{rgb.shape}")
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".overlay-", suffix=".png", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(rgb, "RGB" if rgb.ndim == 3 else "L").save(f, "PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _local_maxima(heat: np.ndarray, radius: int) -> np.ndarray:
  """Pixels equal to the maximum of the (2r+1)^2 square around them (a
  separable running maximum, edges padded with -inf)."""
  h, w = heat.shape
  pad = np.pad(heat, radius, constant_values=-np.inf)
  rows = pad[:, radius:radius + w].copy()
  for d in range(-radius, radius + 1):
    np.maximum(rows, pad[:, radius + d:radius + d + w], out=rows)
  peak = rows[radius:radius + h].copy()
  for d in range(-radius, radius + 1):
    np.maximum(peak, rows[radius + d:radius + d + h], out=peak)
  return heat >= peak


def _region_box(above: np.ndarray, y: int, x: int) -> tuple[int, ...]:
  """Bounding box of the 4-connected component of `above` holding (y, x),
  grown by repeated dilation inside `above`."""
  region = np.zeros_like(above)
  region[y, x] = True
  while True:
    grown = region.copy()
    grown[1:] |= region[:-1]
    grown[:-1] |= region[1:]
    grown[:, 1:] |= region[:, :-1]
    grown[:, :-1] |= region[:, 1:]
    grown &= above
    if np.array_equal(grown, region):
      break
    region = grown
  ys, xs = np.nonzero(region)
  return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def top_regions(heat: np.ndarray, k: int = 3,
                min_distance: Optional[int] = None) -> list[dict]:
  """The k highest peaks of a map, at least `min_distance` pixels apart.

  Greedy non-maximum suppression: the candidates are the pixels above the
  map's minimum that equal the maximum of the square of side
  2 * min_distance + 1 around them (a flat floor holds no peak); they
  are taken by value, highest first (ties in row-major order), each kept
  only if its Euclidean distance to every peak kept before is at least
  `min_distance`. Fewer than k come back when the map has fewer peaks,
  none when it is constant.

  Each peak's box bounds the 4-connected region around it of pixels at or
  above half-way between the map's minimum and the peak (half the peak
  for a map whose floor is 0): a map never reaches 0 when every window
  sees something, and half the peak would then cover the whole image.

  Args:
    heat: (H, W) float map.
    k: at most this many peaks.
    min_distance: separation in pixels; default max(1, min(H, W) // 8).

  Returns:
    [dict(y, x, score, box=(y0, x0, y1, x1)), ...], highest first; y, x
    index the map's pixels, score is the map's value there, the box's ends
    are inclusive.
  """
  heat = np.asarray(heat, np.float64)
  if heat.ndim != 2 or heat.size == 0:
    raise ValueError(f"expected a non-empty (H, W) map; got {heat.shape}")
  if not np.all(np.isfinite(heat)):
    raise ValueError("the map holds NaN or infinite values")
  if k < 1:
    raise ValueError(f"k={k} must be >= 1")
  if min_distance is None:
    min_distance = max(1, min(heat.shape) // 8)
  if min_distance < 1:
    raise ValueError(f"min_distance={min_distance} must be >= 1")
  floor = float(heat.min())
  if float(heat.max()) <= floor:
    return []
  ys, xs = np.nonzero(_local_maxima(heat, min_distance) & (heat > floor))
  values = heat[ys, xs]
  # np.nonzero is row-major; a stable sort keeps that order among ties.
  order = np.argsort(-values, kind="stable")
  kept = []
  for i in order:
    y, x = int(ys[i]), int(xs[i])
    if any((y - p["y"]) ** 2 + (x - p["x"]) ** 2 < min_distance ** 2
           for p in kept):
      continue
    score = float(heat[y, x])
    above = heat >= floor + 0.5 * (score - floor)
    kept.append(dict(y=y, x=x, score=score, box=_region_box(above, y, x)))
    if len(kept) == k:
      break
  return kept
