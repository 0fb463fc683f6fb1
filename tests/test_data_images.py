"""Decoding and letterboxing, against hand-computed pixels."""

import os

import numpy as np
import pytest
from PIL import Image

from medbridge_jax.data import images
from medbridge_jax.errors import UserError


def _save(tmp_path, array, name, mode=None, **kw):
  path = os.path.join(tmp_path, name)
  Image.fromarray(array, mode).save(path, **kw) if mode else (
      Image.fromarray(array).save(path, **kw))
  return path


def test_8bit_png_square_is_unchanged(tmp_path):
  a = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
  out = images.read_image(_save(tmp_path, a, "a.png"), 4)
  assert out.dtype == np.uint8 and out.shape == (4, 4)
  np.testing.assert_array_equal(out, a)


def test_wide_image_is_letterboxed_centred_on_black(tmp_path):
  a = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], np.uint8)
  out = images.read_image(_save(tmp_path, a, "w.png"), 4)
  want = np.zeros((4, 4), np.uint8)
  want[1:3] = a
  np.testing.assert_array_equal(out, want)


def test_tall_image_is_letterboxed(tmp_path):
  a = np.full((4, 2), 9, np.uint8)
  out = images.read_image(_save(tmp_path, a, "t.png"), 4)
  want = np.zeros((4, 4), np.uint8)
  want[:, 1:3] = 9
  np.testing.assert_array_equal(out, want)


def test_shrinking_averages_areas(tmp_path):
  a = np.array([[0, 40, 100, 100],
                [80, 120, 100, 100],
                [7, 7, 0, 255],
                [9, 9, 1, 0]], np.uint8)
  out = images.read_image(_save(tmp_path, a, "s.png"), 2)
  np.testing.assert_array_equal(out, [[60, 100], [8, 64]])


def test_enlarging_keeps_a_flat_image_flat(tmp_path):
  out = images.read_image(
      _save(tmp_path, np.full((1, 2), 200, np.uint8), "e.png"), 4)
  want = np.zeros((4, 4), np.uint8)
  want[1:3] = 200
  np.testing.assert_array_equal(out, want)


def test_16bit_png_stretches_its_own_range(tmp_path):
  a = np.array([[1000, 2000], [3000, 5000]], np.uint16)
  path = _save(tmp_path, a, "h.png")
  with Image.open(path) as img:
    assert img.mode.startswith("I")  # really stored as 16 bit
  out = images.read_image(path, 2)
  # (v - 1000) * 255 / 4000 = 0, 63.75, 127.5, 255, rounded half to even.
  np.testing.assert_array_equal(out, [[0, 64], [128, 255]])


def test_16bit_constant_image_is_black(tmp_path):
  out = images.read_image(
      _save(tmp_path, np.full((2, 2), 700, np.uint16), "c.png"), 2)
  np.testing.assert_array_equal(out, 0)


def test_rgb_becomes_luma(tmp_path):
  a = np.zeros((2, 2, 3), np.uint8)
  a[...] = (100, 150, 200)
  out = images.read_image(_save(tmp_path, a, "rgb.png"), 2)
  # 0.299 * 100 + 0.587 * 150 + 0.114 * 200 = 140.75
  np.testing.assert_array_equal(out, 141)


def test_jpeg_8bit(tmp_path):
  y, x = np.mgrid[0:64, 0:64]
  a = (x * 2 + y).astype(np.uint8)
  out = images.read_image(_save(tmp_path, a, "g.jpg", quality=95), 64)
  assert np.abs(out.astype(int) - a).max() <= 3


def test_large_jpeg_uses_draft_and_letterboxes(tmp_path):
  a = np.full((512, 1024), 128, np.uint8)
  out = images.read_image(_save(tmp_path, a, "big.jpg", quality=90), 256)
  assert out.shape == (256, 256)
  assert np.abs(out[64:192].astype(int) - 128).max() <= 2
  np.testing.assert_array_equal(out[:64], 0)
  np.testing.assert_array_equal(out[192:], 0)


def test_missing_file_names_it(tmp_path):
  path = os.path.join(tmp_path, "nope.png")
  with pytest.raises(UserError, match="nope.png: image file not found"):
    images.read_image(path, 8)


@pytest.mark.parametrize("name", ["bad.png", "bad.jpg"])
def test_corrupt_file_names_it(tmp_path, name):
  path = os.path.join(tmp_path, name)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n garbage" if name.endswith("png")
            else b"\xff\xd8\xff\xe0 garbage")
  with pytest.raises(UserError, match=f"{name}: cannot decode"):
    images.read_image(path, 8)


def test_truncated_png_names_it(tmp_path):
  path = _save(tmp_path, np.random.default_rng(0).integers(
      0, 255, (64, 64), dtype=np.uint8), "trunc.png")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(UserError, match="trunc.png"):
    images.read_image(path, 8)


def test_dicom_is_dispatched_to_the_dicom_reader(tmp_path):
  from medbridge_jax.data import dicom  # pylint: disable=g-import-not-at-top
  path = os.path.join(tmp_path, "x.dcm")
  dicom.write_dicom(path, np.array([[0, 4095]], np.uint16), bits_stored=12)
  out = images.read_image(path, 2)
  np.testing.assert_array_equal(out, [[0, 255], [0, 0]])
  path1 = os.path.join(tmp_path, "y.dicom")
  dicom.write_dicom(path1, np.array([[0, 4095]], np.uint16), bits_stored=12,
                    photometric="MONOCHROME1")
  np.testing.assert_array_equal(images.read_image(path1, 2),
                                [[255, 0], [0, 0]])


def test_corrupt_dicom_names_it(tmp_path):
  path = os.path.join(tmp_path, "z.dcm")
  with open(path, "wb") as f:
    f.write(b"not dicom at all")
  with pytest.raises(UserError, match="z.dcm"):
    images.read_image(path, 4)
