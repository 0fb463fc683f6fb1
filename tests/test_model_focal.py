"""Focal Sampling: exact crop coordinates, coverage, bounds, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax.errors import UserError
from medbridge_jax.model import focal_sampling as fs


def coordinate_image(batch, h, w):
  """Pixel value = row * w + col (+ image index * h * w): exact in float32."""
  base = np.arange(h * w, dtype=np.float32).reshape(h, w)
  return jnp.asarray(np.stack([base + i * h * w for i in range(batch)]))


def test_window_starts_exact_and_flush():
  np.testing.assert_array_equal(fs.window_starts(256, 64, 0.25),
                                [0, 48, 96, 144, 192])
  np.testing.assert_array_equal(fs.window_starts(100, 40, 0.0), [0, 40, 60])
  np.testing.assert_array_equal(fs.window_starts(64, 64, 0.5), [0])
  np.testing.assert_array_equal(fs.window_starts(10, 4, 0.5), [0, 2, 4, 6])


@pytest.mark.parametrize("h,w,crop,overlap", [
    (64, 64, 32, 0.25), (100, 70, 32, 0.0), (97, 61, 17, 0.5),
    (50, 50, 50, 0.1), (33, 90, 8, 0.9)])
def test_sliding_windows_cover_every_pixel(h, w, crop, overlap):
  corners = fs.sliding_windows(h, w, crop, overlap)
  hits = np.zeros((h, w), np.int32)
  for r, c in corners:
    assert 0 <= r <= h - crop and 0 <= c <= w - crop
    hits[r:r + crop, c:c + crop] += 1
  assert hits.min() >= 1
  # The last window of each axis is flush with the border.
  assert corners[:, 0].max() == h - crop and corners[:, 1].max() == w - crop


def test_extract_exact_on_coordinate_pattern():
  h, w, crop = 40, 56, 16
  images = coordinate_image(2, h, w)
  corners = jnp.asarray([[[0, 0], [24, 40], [7, 13]],
                         [[3, 5], [0, 40], [24, 0]]], jnp.int32)
  crops = np.asarray(jax.jit(fs.extract, static_argnums=2)(
      images, corners, crop))
  for b in range(2):
    for i, (r, c) in enumerate(np.asarray(corners[b])):
      rows, cols = np.meshgrid(np.arange(r, r + crop), np.arange(c, c + crop),
                               indexing="ij")
      want = rows * w + cols + b * h * w
      np.testing.assert_array_equal(crops[b, i], want.astype(np.float32))


def test_eval_views_are_the_windows_at_native_resolution():
  h, w, crop = 48, 48, 16
  images = coordinate_image(1, h, w)
  views = fs.views(images, side=16, crop=crop, num_local=3, train=False,
                   overlap=0.5)
  corners = fs.sliding_windows(h, w, crop, 0.5)
  assert views.shape == (1, 1 + len(corners), 16, 16)
  assert fs.num_views(h, w, crop=crop, num_local=3, train=False,
                      overlap=0.5) == views.shape[1]
  for i, (r, c) in enumerate(corners):
    assert views[0, 1 + i, 0, 0] == r * w + c
    assert views[0, 1 + i, -1, -1] == (r + crop - 1) * w + c + crop - 1


def test_random_windows_in_bounds_and_deterministic():
  key = jax.random.key(3)
  a = fs.random_windows(key, 16, 8, 70, 90, 32)
  b = fs.random_windows(key, 16, 8, 70, 90, 32)
  c = fs.random_windows(jax.random.key(4), 16, 8, 70, 90, 32)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  a = np.asarray(a)
  assert a.dtype == np.int32 and a.shape == (16, 8, 2)
  assert a.min() >= 0
  assert a[..., 0].max() <= 70 - 32 and a[..., 1].max() <= 90 - 32
  # Uniform draws reach both ends of the range over many samples.
  many = np.asarray(fs.random_windows(key, 64, 64, 40, 40, 32))
  assert set(np.unique(many)) == set(range(9))


def test_lung_bias_puts_crop_centres_in_the_lung_fields():
  h = w = 300
  crop = 30
  corners = np.asarray(fs.random_windows(jax.random.key(0), 32, 16, h, w,
                                         crop, lung_bias=1.0))
  centre = corners + crop / 2
  rows, cols = centre[..., 0] / h, centre[..., 1] / w
  assert rows.min() >= 0.10 - 0.01 and rows.max() <= 0.80 + 0.01
  in_left = (cols >= 0.10 - 0.01) & (cols <= 0.45 + 0.01)
  in_right = (cols >= 0.55 - 0.01) & (cols <= 0.90 + 0.01)
  assert np.all(in_left | in_right)
  assert 0.3 < in_left.mean() < 0.7  # both lungs
  # Half the crops biased: about half land in the mediastinum strip or
  # outside the boxes as often as uniform crops do.
  half = np.asarray(fs.random_windows(jax.random.key(1), 64, 16, h, w, crop,
                                      lung_bias=0.5)) + crop / 2
  mid = np.abs(half[..., 1] / w - 0.5) < 0.05
  full = corners + crop / 2
  assert 0 < mid.mean() < 0.1 * 0.75
  assert not np.any(np.abs(full[..., 1] / w - 0.5) < 0.045)  # rounding


def test_training_views_match_their_corners():
  h, w, crop = 64, 64, 16
  images = coordinate_image(3, h, w)
  key = jax.random.key(7)
  views = jax.jit(lambda x, k: fs.views(x, side=16, crop=crop, num_local=5,
                                        train=True, key=k))(images, key)
  corners = np.asarray(fs.random_windows(key, 3, 5, h, w, crop))
  assert views.shape == (3, 6, 16, 16)
  for b in range(3):
    for i, (r, c) in enumerate(corners[b]):
      assert views[b, 1 + i, 0, 0] == r * w + c + b * h * w


def test_global_view_is_antialiased():
  # A one-pixel checkerboard shrunk 4x: nearest sampling would keep one
  # phase (all 0 or all 1); a proper downsize averages it to 0.5.
  board = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
  small = np.asarray(fs.resize(jnp.asarray(board)[None], 16))[0]
  np.testing.assert_allclose(small[2:-2, 2:-2], 0.5, atol=1e-3)
  # A 4x4 bright finding keeps its mass (mean intensity) when shrunk 4x.
  spot = np.zeros((64, 64), np.float32)
  spot[30:34, 30:34] = 1.0
  small = np.asarray(fs.resize(jnp.asarray(spot)[None], 16))[0]
  np.testing.assert_allclose(small.sum() * 16, spot.sum(), rtol=1e-3)
  assert small.max() < 0.6  # ... at a fraction of its contrast.
  # Same size: exactly the input.
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16))
  np.testing.assert_array_equal(fs.resize(x, 16), x)


def test_sliding_windows_in_training_when_asked():
  images = coordinate_image(1, 48, 48)
  a = fs.views(images, side=16, crop=16, num_local=3, train=True,
               overlap=0.5, train_windows="sliding")
  b = fs.views(images, side=16, crop=16, num_local=3, train=False,
               overlap=0.5)
  np.testing.assert_array_equal(a, b)


def test_focal_off_gives_global_view_only():
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64))
  v = fs.views(x, side=32, crop=16, num_local=0, train=True)
  assert v.shape == (2, 1, 32, 32)


def test_bad_crop_is_a_user_error():
  with pytest.raises(UserError, match="crop_size"):
    fs.sliding_windows(32, 32, 48, 0.25)
  with pytest.raises(UserError, match="eval_overlap"):
    fs.window_starts(32, 8, 1.0)
