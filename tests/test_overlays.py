"""Overlays, boxes and peaks (`overlays`) against hand-computed pixels,
matplotlib's viridis, and brute-force loops."""

import collections

import numpy as np
from PIL import Image
import pytest

from medbridge_jax import overlays

ALPHA = 0.45


def _radiograph(h=6, w=5):
  return (np.arange(h * w).reshape(h, w) * 7 % 256).astype(np.uint8)


def _grey(image):
  return np.repeat(image[..., None].astype(np.float64), 3, axis=-1)


def test_constant_map_is_the_radiograph_or_one_colour():
  image = _radiograph()
  # Scaled by its own range, a constant map has nothing to show.
  out = overlays.overlay(image, np.full(image.shape, 0.7), alpha=ALPHA)
  assert out.dtype == np.uint8 and out.shape == image.shape + (3,)
  np.testing.assert_array_equal(out, _grey(image))
  # On a shared scale (0, 2) the value 1 is h = 0.5: viridis' middle,
  # (33, 145, 140) in matplotlib, at opacity alpha / 2 everywhere.
  out = overlays.overlay(image, np.ones(image.shape), alpha=ALPHA,
                         limits=(0.0, 2.0))
  a = ALPHA * 0.5
  want = np.rint((1 - a) * _grey(image) + a * np.array([33, 145, 140]))
  np.testing.assert_array_equal(out, want)


def test_low_heat_shows_the_radiograph_high_heat_the_top_colour():
  image = _radiograph()
  heat = np.zeros(image.shape, np.float32)
  heat[2, 3] = 5.0
  out = overlays.overlay(image, heat - 3.0, alpha=ALPHA)  # Any offset.
  want = _grey(image)
  want[2, 3] = (1 - ALPHA) * want[2, 3] + ALPHA * np.array([253, 231, 37])
  np.testing.assert_array_equal(out, np.rint(want))


def test_colormap_follows_matplotlib_viridis():
  colormaps = pytest.importorskip("matplotlib").colormaps
  x = np.linspace(0.0, 1.0, 1001)
  want = colormaps["viridis"](x)[:, :3] * 255
  got = overlays.colormap(x)
  assert np.abs(got - want).max() < 6.0
  # Monotone in lightness (a rough luma): low heat dark, high heat bright.
  luma = got @ np.array([0.299, 0.587, 0.114])
  assert np.all(np.diff(luma) > -1e-9)


def test_overlay_rejects_bad_shapes():
  image = _radiograph()
  with pytest.raises(ValueError, match="differ in shape"):
    overlays.overlay(image, np.zeros((3, 3)))
  with pytest.raises(ValueError, match="uint8"):
    overlays.overlay(image.astype(np.float32), np.zeros(image.shape))
  with pytest.raises(ValueError, match="NaN"):
    overlays.overlay(image, np.full(image.shape, np.nan))


def _outline_loop(h, w, boxes, width):
  """True where a pixel lies on an outline: inside a box and within
  `width` of one of its edges."""
  on = np.zeros((h, w), bool)
  for y in range(h):
    for x in range(w):
      for y0, x0, y1, x1 in boxes:
        inside = y0 <= y <= y1 and x0 <= x <= x1
        edge = (y - y0 < width or y1 - y < width or x - x0 < width
                or x1 - x < width)
        on[y, x] |= inside and edge
  return on


@pytest.mark.parametrize("width", [1, 2])
def test_draw_boxes_outlines_inclusive_boxes(width):
  rgb = np.stack([_radiograph(12, 15)] * 3, axis=-1)
  boxes = [(1, 2, 7, 9), (5, 10, 5, 14), (0, 0, 11, 14)]
  out = overlays.draw_boxes(rgb, boxes, (250, 10, 20), width=width)
  on = _outline_loop(12, 15, boxes, width)
  np.testing.assert_array_equal(out[on], np.tile([250, 10, 20],
                                                 (on.sum(), 1)))
  np.testing.assert_array_equal(out[~on], rgb[~on])
  assert not np.shares_memory(out, rgb)
  with pytest.raises(ValueError, match="not inside the 12 x 15"):
    overlays.draw_boxes(rgb, [(0, 0, 12, 3)], (0, 0, 0))


def test_save_png_round_trip(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), np.uint8)
  path = str(tmp_path / "a.png")
  overlays.save_png(rgb, path)
  with Image.open(path) as img:
    assert img.format == "PNG"
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), rgb)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_top_regions_two_peaks_hand_made():
  heat = np.zeros((64, 64))
  heat[8:14, 9:16] = 3.0   # A's shoulder: at or above half of 5.
  heat[10, 12] = 5.0       # Peak A.
  heat[10, 15] = 4.5       # 3 px from A: suppressed, inside A's box.
  heat[28:34, 37:45] = 2.5  # B's shoulder: above half of 4.
  heat[30, 40] = 4.0       # Peak B.
  heat[34, 37:45] = 1.5    # Below half of B: outside its box.
  heat[34, 45] = 3.0       # Touches B's shoulder only at a corner.
  heat[50, 10] = 1.0       # A lone small peak C.
  got = overlays.top_regions(heat, k=3, min_distance=8)
  assert got == [
      dict(y=10, x=12, score=5.0, box=(8, 9, 13, 15)),
      dict(y=30, x=40, score=4.0, box=(28, 37, 33, 44)),
      dict(y=50, x=10, score=1.0, box=(50, 10, 50, 10)),
  ]
  assert overlays.top_regions(heat, k=2, min_distance=8) == got[:2]
  # Half-way above the map's floor, not half the peak: shift everything.
  shifted = overlays.top_regions(heat + 10.0, k=2, min_distance=8)
  assert [(r["y"], r["x"], r["box"]) for r in shifted] == [
      (r["y"], r["x"], r["box"]) for r in got[:2]]
  assert overlays.top_regions(np.full((5, 5), 2.0)) == []


def test_top_regions_ties_are_kept_exactly_min_distance_apart():
  """Equal peaks are all local maxima: only the distance rule separates
  them, and exactly min_distance apart is far enough."""
  heat = np.zeros((20, 20))
  heat[5, 5] = heat[5, 9] = 1.0    # 4 apart: both kept.
  heat[15, 5] = heat[15, 8] = 1.0  # 3 apart: the second (row-major) goes.
  got = overlays.top_regions(heat, k=4, min_distance=4)
  assert [(r["y"], r["x"], r["box"]) for r in got] == [
      (5, 5, (5, 5, 5, 5)), (5, 9, (5, 9, 5, 9)), (15, 5, (15, 5, 15, 5))]


def _top_regions_loop(heat, k, d):
  """Brute force: candidates (above the floor) by a window loop, greedy
  by value then row-major order, regions by breadth-first search."""
  h, w = heat.shape
  cands = []
  for y in range(h):
    for x in range(w):
      win = heat[max(0, y - d):y + d + 1, max(0, x - d):x + d + 1]
      if heat[y, x] > heat.min() and heat[y, x] >= win.max():
        cands.append((-heat[y, x], y, x))
  cands.sort()
  floor, kept = heat.min(), []
  for v, y, x in cands:
    if any((y - p[0]) ** 2 + (x - p[1]) ** 2 < d * d for p in kept):
      continue
    level = floor + 0.5 * (-v - floor)
    seen, queue = {(y, x)}, collections.deque([(y, x)])
    while queue:
      cy, cx = queue.popleft()
      for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
        if (0 <= ny < h and 0 <= nx < w and (ny, nx) not in seen
            and heat[ny, nx] >= level):
          seen.add((ny, nx))
          queue.append((ny, nx))
    ys, xs = zip(*seen)
    kept.append((y, x, (min(ys), min(xs), max(ys), max(xs))))
    if len(kept) == k:
      break
  return kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_regions_equal_a_brute_force_loop(seed):
  rng = np.random.default_rng(seed)
  noise = rng.random((24, 30))
  # Smoothed a little, so peaks have shoulders and regions.
  heat = sum(np.roll(np.roll(noise, dy, 0), dx, 1)
             for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  got = overlays.top_regions(heat, k=5, min_distance=3)
  want = _top_regions_loop(heat, 5, 3)
  assert [(r["y"], r["x"], r["box"]) for r in got] == want
  assert [r["score"] for r in got] == [heat[y, x] for y, x, _ in want]
