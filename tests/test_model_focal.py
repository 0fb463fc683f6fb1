"""Focal Sampling: exact crop coordinates, coverage, bounds, determinism,
shared crop centres and the per-expert view description."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax.errors import UserError
from medbridge_jax.model import focal_sampling as fs


def _random_corners(key, batch, num, height, width, crop):
  """Top-left corners of random crops, as MedBridge places them."""
  centres = fs.random_centres(key, batch, num, height, width, crop=crop)
  return fs.corners_from_centres(centres, crop, height, width)


def coordinate_image(batch, h, w):
  """Pixel value = row * w + col (+ image index * h * w): exact in float32."""
  base = np.arange(h * w, dtype=np.float32).reshape(h, w)
  return jnp.asarray(np.stack([base + i * h * w for i in range(batch)]))


def focal(**changes):
  """`config.model.focal` of the default config with `changes`."""
  f = default_config.get_default().model.focal
  for key, value in changes.items():
    f[key] = value
  return f


def reference_starts(length, stride, crop):
  """Window starts by walking: step `stride` while a window fits, then one
  more flush with the border if the walk stopped short of it."""
  starts, s = [], 0
  while s + crop <= length:
    starts.append(s)
    s += stride
  if starts[-1] + crop < length:
    starts.append(length - crop)
  return starts


def reference_crops(image, crop, stride):
  """Every evaluation window of a 2-D numpy image, row-major, by slicing."""
  h, w = image.shape
  return np.stack([image[r:r + crop, c:c + crop]
                   for r in reference_starts(h, stride, crop)
                   for c in reference_starts(w, stride, crop)])


def test_window_starts_exact_and_flush():
  np.testing.assert_array_equal(fs.window_starts(256, 64, 0.25),
                                [0, 48, 96, 144, 192])
  np.testing.assert_array_equal(fs.window_starts(100, 40, 0.0), [0, 40, 60])
  np.testing.assert_array_equal(fs.window_starts(64, 64, 0.5), [0])
  np.testing.assert_array_equal(fs.window_starts(10, 4, 0.5), [0, 2, 4, 6])
  # README's real-data command: 1024 px stored, 224 px experts, overlap
  # 0.25: stride 168, and the sixth window flush at 1024 - 224 = 800.
  np.testing.assert_array_equal(fs.window_starts(1024, 224, 0.25),
                                [0, 168, 336, 504, 672, 800])
  # The 48 px test-bed expert on 256 px: stride 36, last at 208.
  np.testing.assert_array_equal(fs.window_starts(256, 48, 0.25),
                                [0, 36, 72, 108, 144, 180, 208])


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


def test_describe_native_crops_hand_computed():
  # README's real-data command: two 224 px experts on 1024 px images.
  rows = fs.describe(1024, [224, 224], focal())
  for k, r in enumerate(rows):
    assert r == {"expert": k, "image": 1024, "side": 224, "crop": 224,
                 "scale": 1.0, "global_side": 224, "train_views": 1 + 4,
                 "eval_grid": (6, 6), "eval_views": 1 + 36}
  # The embedded default: 64 and 48 px experts on 256 px images.
  rows = fs.describe(256, [64, 48], focal())
  assert [(r["crop"], r["eval_grid"], r["eval_views"]) for r in rows] == [
      (64, (5, 5), 26), (48, (7, 7), 50)]
  line = fs.summary(rows)
  assert "\n" not in line and "1 + 7x7 = 50" in line and "native" in line


def test_describe_other_settings_hand_computed():
  # A fixed 64 px crop for a 224 px expert on 1024 px: upsampled 3.5x,
  # stride 48, starts 0, 48, ..., 912 (20) and the flush 960: 21 x 21.
  r = fs.describe(1024, [224], focal(crop_size=64))[0]
  assert (r["crop"], r["scale"], r["eval_grid"], r["eval_views"]) == (
      64, 3.5, (21, 21), 442)
  # Local views only: N - 1 in both modes.
  r = fs.describe(256, [64], focal(global_view=False))[0]
  assert (r["global_side"], r["train_views"], r["eval_views"]) == (0, 4, 25)
  # Training on the evaluation windows.
  r = fs.describe(256, [48], focal(train_windows="sliding"))[0]
  assert r["train_views"] == r["eval_views"] == 1 + 49
  # Focal off: one global view, here of 128 px.
  r = fs.describe(256, [64], focal(enabled=False, global_side=128))[0]
  assert (r["crop"], r["global_side"], r["train_views"],
          r["eval_views"]) == (0, 128, 1, 1)
  assert "view only" in fs.summary([r])


@pytest.mark.parametrize("changes,sides,key", [
    ({"crop_size": 300}, [64], "crop_size=300"),
    ({}, [64, 512], "crop_size=0 gives expert 1"),
    ({"crop_size": -1}, [64], "crop_size"),
    ({"num_local": 0}, [64], "num_local"),
    ({"eval_overlap": 1.0}, [64], "eval_overlap"),
    ({"lung_bias": 1.5}, [64], "lung_bias"),
    ({"train_windows": "grid"}, [64], "train_windows"),
    ({"resize": "nearest"}, [64], "resize"),
    ({"global_side": 512}, [64], "global_side"),
    ({"global_side": -8}, [64], "global_side"),
    ({"enabled": False, "global_view": False}, [64], "global_view"),
])
def test_bad_focal_config_is_a_user_error_naming_the_key(changes, sides, key):
  with pytest.raises(UserError, match="model.focal." + key):
    fs.describe(256, sides, focal(**changes))


def test_crops_equal_numpy_slicing():
  h, w, crop = 40, 56, 16
  images = np.asarray(jax.random.uniform(jax.random.key(2), (2, h, w)))
  corners = np.asarray([[[0, 0], [24, 40], [7, 13]],
                        [[3, 5], [0, 40], [24, 0]]], np.int32)
  crops = np.asarray(jax.jit(fs.extract, static_argnums=2)(
      jnp.asarray(images), jnp.asarray(corners), crop))
  for b in range(2):
    for i, (r, c) in enumerate(corners[b]):
      np.testing.assert_array_equal(crops[b, i],
                                    images[b, r:r + crop, c:c + crop])


def test_shared_centres_clamped_per_expert_by_hand():
  # Centres on a 256 px image; a 48 px and a 64 px expert place their own
  # crops around them: corner = centre - crop // 2, clamped to
  # [0, 256 - crop] (208 and 192).
  centres = jnp.asarray([[[10, 128], [250, 3], [128, 128], [100, 230]]])
  want48 = [[0, 104], [208, 0], [104, 104], [76, 206]]
  want64 = [[0, 96], [192, 0], [96, 96], [68, 192]]
  np.testing.assert_array_equal(
      fs.corners_from_centres(centres, 48, 256, 256)[0], want48)
  np.testing.assert_array_equal(
      fs.corners_from_centres(centres, 64, 256, 256)[0], want64)
  # The views themselves: each expert's crops at those corners, at its own
  # side (native: no resize), the same centres for both.
  image = np.asarray(jax.random.uniform(jax.random.key(0), (1, 256, 256)))
  for crop, want in ((48, want48), (64, want64)):
    v = np.asarray(fs.views(jnp.asarray(image), side=crop, crop=crop,
                            num_local=4, train=True, centres=centres))
    assert v.shape == (1, 5, crop, crop)
    for i, (r, c) in enumerate(want):
      np.testing.assert_array_equal(v[0, 1 + i],
                                    image[0, r:r + crop, c:c + crop])


@pytest.mark.parametrize("size,crop,overlap,stride", [
    (256, 64, 0.25, 48), (256, 48, 0.25, 36), (96, 32, 0.5, 16)])
def test_sliding_training_views_are_the_numpy_windows(size, crop, overlap,
                                                      stride):
  image = np.asarray(jax.random.uniform(jax.random.key(1), (2, size, size)))
  v = np.asarray(fs.views(jnp.asarray(image), side=crop, crop=crop,
                          num_local=3, train=True, overlap=overlap,
                          train_windows="sliding"))
  for b in range(2):
    want = reference_crops(image[b], crop, stride)
    assert v.shape[1] == 1 + len(want)
    np.testing.assert_array_equal(v[b, 1:], want)
    np.testing.assert_allclose(
        v[b, 0], jax.image.resize(image[b], (crop, crop), "linear",
                                  antialias=True), atol=1e-6)
  # ... and evaluation gives the same views.
  e = fs.views(jnp.asarray(image), side=crop, crop=crop, num_local=3,
               train=False, overlap=overlap)
  np.testing.assert_array_equal(v, e)
  assert fs.num_views(size, size, crop=crop, num_local=3, train=True,
                      overlap=overlap, train_windows="sliding") == v.shape[1]


def test_eval_views_resized_when_crop_is_not_native():
  h, w, crop = 48, 48, 16
  images = jax.random.uniform(jax.random.key(4), (1, h, w))
  v = fs.views(images, side=8, crop=crop, num_local=3, train=False,
               overlap=0.5)
  want = reference_crops(np.asarray(images[0]), crop, 8)
  assert v.shape == (1, 1 + len(want), 8, 8)
  assert fs.num_views(h, w, crop=crop, num_local=3, train=False,
                      overlap=0.5) == v.shape[1]
  np.testing.assert_allclose(v[0, 1:], jax.image.resize(
      jnp.asarray(want), (len(want), 8, 8), "linear", antialias=True),
                             atol=1e-6)


def test_global_view_off_gives_the_local_views_only():
  images = jax.random.uniform(jax.random.key(5), (2, 64, 64))
  centres = fs.random_centres(jax.random.key(6), 2, 3, 64, 64)
  for train in (True, False):
    both = fs.views(images, side=16, crop=16, num_local=3, train=train,
                    centres=centres)
    local = fs.views(images, side=16, crop=16, num_local=3, train=train,
                     centres=centres, global_view=False)
    assert local.shape[1] == both.shape[1] - 1
    np.testing.assert_array_equal(local, both[:, 1:])
    assert fs.num_views(64, 64, crop=16, num_local=3, train=train,
                        overlap=0.25, global_view=False) == local.shape[1]
  with pytest.raises(UserError, match="global_view"):
    fs.views(images, side=16, crop=16, num_local=0, train=False,
             global_view=False)


def test_global_side_is_a_group_of_its_own():
  images = jax.random.uniform(jax.random.key(7), (2, 64, 64))
  groups = fs.view_groups(images, side=16, crop=16, num_local=3, train=False,
                          overlap=0.0, global_side=32)
  assert [g.shape for g in groups] == [(2, 1, 32, 32), (2, 16, 16, 16)]
  np.testing.assert_allclose(groups[0][:, 0], jax.image.resize(
      images, (2, 32, 32), "linear", antialias=True), atol=1e-6)
  with pytest.raises(ValueError, match="view_groups"):
    fs.views(images, side=16, crop=16, num_local=3, train=False,
             global_side=32)


def test_random_centres_uniform_in_bounds_and_deterministic():
  key = jax.random.key(3)
  a = fs.random_centres(key, 16, 8, 70, 90)
  b = fs.random_centres(key, 16, 8, 70, 90)
  c = fs.random_centres(jax.random.key(4), 16, 8, 70, 90)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  a = np.asarray(a)
  assert a.dtype == np.int32 and a.shape == (16, 8, 2)
  assert a.min() >= 0 and a[..., 0].max() <= 69 and a[..., 1].max() <= 89
  # Uniform over the image: every row and column, about equally often.
  many = np.asarray(fs.random_centres(key, 64, 64, 16, 16)).reshape(-1, 2)
  for axis in range(2):
    counts = np.bincount(many[:, axis], minlength=16)
    assert len(counts) == 16 and counts.min() > 0.7 * len(many) / 16
  # Corners from them: in bounds, reaching both ends.
  corners = np.asarray(_random_corners(key, 64, 64, 40, 40, 32))
  assert set(np.unique(corners)) == set(range(9))


def test_centres_leave_room_for_the_largest_crop():
  """Drawn for a crop side, centres place that crop anywhere inside the
  image with equal chance, never pinned to a border; a smaller crop around
  the same centre fits too (hand-computed: 40 px image, 32 px crop: corners
  0..8, centres 16..24; a 16 px crop's corners 8..16)."""
  many = np.asarray(fs.random_centres(jax.random.key(5), 64, 64, 40, 40,
                                      crop=32)).reshape(-1, 2)
  assert set(np.unique(many)) == set(range(16, 25))
  for axis in range(2):
    counts = np.bincount(many[:, axis] - 16, minlength=9)
    assert counts.min() > 0.8 * len(many) / 9
  small = np.asarray(fs.corners_from_centres(many, 16, 40, 40))
  np.testing.assert_array_equal(small, many - 8)  # No clamping needed.
  # Without room for the crop, a quarter of 32 px crops on a 64 px image
  # would sit at each border; with it, none more than 1/33 of them.
  pinned = np.asarray(_random_corners(jax.random.key(6), 64, 64, 64, 64, 32))
  assert (pinned == 0).mean() < 0.05 and (pinned == 32).mean() < 0.05
  lung = np.asarray(fs.random_centres(jax.random.key(7), 64, 16, 40, 40,
                                      lung_bias=1.0, crop=32))
  assert lung.min() >= 16 and lung.max() <= 24


def test_lung_bias_puts_crop_centres_in_the_lung_fields():
  h = w = 300
  centres = np.asarray(fs.random_centres(jax.random.key(0), 32, 16, h, w,
                                         lung_bias=1.0))
  rows, cols = centres[..., 0], centres[..., 1]
  # Boxes in pixels: rows [30, 240), cols [30, 135) or [165, 270).
  assert rows.min() >= 30 and rows.max() < 240
  in_left = (cols >= 30) & (cols < 135)
  in_right = (cols >= 165) & (cols < 270)
  assert np.all(in_left | in_right)
  assert 0.3 < in_left.mean() < 0.7  # both lungs
  # Half the crops biased: the mediastinum strip (a tenth of the width)
  # gets about half the uniform share.
  half = np.asarray(fs.random_centres(jax.random.key(1), 64, 16, h, w,
                                      lung_bias=0.5))
  mid = np.abs(half[..., 1] - 150) < 15
  assert 0 < mid.mean() < 0.1 * 0.75


def test_training_views_match_their_centres():
  h, w, crop = 64, 64, 16
  images = coordinate_image(3, h, w)
  centres = fs.random_centres(jax.random.key(7), 3, 5, h, w)
  views = jax.jit(lambda x, c: fs.views(x, side=16, crop=crop, num_local=5,
                                        train=True, centres=c))(images,
                                                                centres)
  assert views.shape == (3, 6, 16, 16)
  corners = np.clip(np.asarray(centres) - crop // 2, 0, h - crop)
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


def test_focal_off_gives_global_view_only():
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64))
  v = fs.views(x, side=32, crop=16, num_local=0, train=True)
  assert v.shape == (2, 1, 32, 32)


def test_bad_crop_is_a_user_error():
  with pytest.raises(UserError, match="crop_size"):
    fs.sliding_windows(32, 32, 48, 0.25)
  with pytest.raises(UserError, match="eval_overlap"):
    fs.window_starts(32, 8, 1.0)
