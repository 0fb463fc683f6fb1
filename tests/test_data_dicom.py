"""DICOM decoding against hand-computed display values."""

import os

import numpy as np
import pydicom
import pytest

from medbridge_jax.data import dicom
from medbridge_jax.errors import UserError


def _write(tmp_path, stored, name="x.dcm", **kw):
  path = os.path.join(tmp_path, name)
  dicom.write_dicom(path, np.asarray(stored), **kw)
  return path


def _linear(x, center, width):
  """DICOM PS3.3 C.11.2.1.2.1 LINEAR window, as a fraction of the output."""
  x = np.asarray(x, np.float64)
  c, w = center - 0.5, width - 1
  out = (x - c) / w + 0.5
  out[x <= c - w / 2] = 0.0
  out[x > c + w / 2] = 1.0
  return out


def test_monochrome2_12_bit_no_window_uses_bits_stored_range(tmp_path):
  stored = np.array([[0, 1000], [2048, 4095]], np.uint16)
  out = dicom.read_dicom(_write(tmp_path, stored, bits_stored=12))
  assert out.dtype == np.float32 and out.shape == (2, 2)
  np.testing.assert_allclose(out, stored / 4095.0, rtol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
  stored = np.array([[0, 1000], [2048, 4095]], np.uint16)
  out = dicom.read_dicom(
      _write(tmp_path, stored, bits_stored=12, photometric="MONOCHROME1"))
  np.testing.assert_allclose(out, 1.0 - stored / 4095.0, rtol=1e-6, atol=1e-7)


def test_8_and_16_bit(tmp_path):
  s8 = np.array([[0, 51], [204, 255]], np.uint8)
  np.testing.assert_allclose(
      dicom.read_dicom(_write(tmp_path, s8, "a.dcm")), s8 / 255.0, rtol=1e-6)
  s16 = np.array([[0, 1], [32768, 65535]], np.uint16)
  np.testing.assert_allclose(
      dicom.read_dicom(_write(tmp_path, s16, "b.dcm")), s16 / 65535.0,
      rtol=1e-6)


def test_window_center_width(tmp_path):
  stored = np.array([[1000, 1536, 1537], [2000, 2048, 2560]], np.uint16)
  out = dicom.read_dicom(
      _write(tmp_path, stored, bits_stored=12, window=(2048, 1024)))
  # By hand: below 1536 -> 0; (2000 - 2047.5) / 1023 + 0.5 = 0.453567...
  assert out[0, 0] == 0.0 and out[0, 1] == 0.0 and out[1, 2] == 1.0
  np.testing.assert_allclose(out[1, 0], 0.4535679, rtol=1e-6)
  np.testing.assert_allclose(out, _linear(stored, 2048, 1024), rtol=1e-6)


def test_window_on_monochrome1(tmp_path):
  stored = np.array([[1000, 2000], [2048, 3000]], np.uint16)
  out = dicom.read_dicom(_write(tmp_path, stored, bits_stored=12,
                                window=(2048, 1024), photometric="MONOCHROME1"))
  np.testing.assert_allclose(out, 1.0 - _linear(stored, 2048, 1024),
                             rtol=1e-6, atol=1e-7)


def test_rescale_then_window(tmp_path):
  stored = np.array([[412, 512], [600, 4095]], np.uint16)
  out = dicom.read_dicom(_write(tmp_path, stored, bits_stored=12,
                                rescale=(2.0, -1024.0), window=(0, 401)))
  hu = stored * 2.0 - 1024.0  # -200, 0, 176, 7166
  np.testing.assert_allclose(out, _linear(hu, 0, 401), rtol=1e-6)
  np.testing.assert_allclose(out[0, 0], 0.00125, rtol=1e-5)
  np.testing.assert_allclose(out[0, 1], 0.50125, rtol=1e-5)


def test_rescale_without_window_uses_rescaled_range(tmp_path):
  stored = np.array([[0, 2000], [4095, 10]], np.uint16)
  out = dicom.read_dicom(
      _write(tmp_path, stored, "a.dcm", bits_stored=12, rescale=(0.5, 100.0)))
  # Range [100, 2147.5]; 2000 stored -> 1100 -> 1000 / 2047.5.
  np.testing.assert_allclose(out, stored / 4095.0, rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], 1000 / 2047.5, rtol=1e-6)
  # A negative slope turns the scale round.
  out = dicom.read_dicom(
      _write(tmp_path, stored, "b.dcm", bits_stored=12, rescale=(-1.0, 4095.0)))
  np.testing.assert_allclose(out, 1.0 - stored / 4095.0, rtol=1e-6, atol=1e-7)


def test_signed_sigmoid_window(tmp_path):
  stored = np.array([[-2000, -25], [0, 25]], np.int16)
  out = dicom.read_dicom(_write(tmp_path, stored, bits_stored=16,
                                window=(0, 100), voi_function="SIGMOID"))
  want = 1.0 / (1.0 + np.exp(-4.0 * stored / 100.0))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_voi_lut_sequence_preferred_over_window(tmp_path):
  stored = np.array([[0, 100], [200, 4095]], np.uint16)
  lut = np.arange(256)  # 8-bit LUT starting at stored value 50
  out = dicom.read_dicom(_write(tmp_path, stored, bits_stored=12,
                                voi_lut=(50, 8, lut), window=(10, 2)))
  # 0 is below the first mapped value -> entry 0; 4095 past the end -> 255.
  np.testing.assert_allclose(out, [[0, 50 / 255], [150 / 255, 1.0]],
                             rtol=1e-6)


def test_voi_lut_16_bit_entries(tmp_path):
  stored = np.array([[10, 11], [12, 13]], np.uint16)
  lut = np.array([0, 1000, 30000, 65535])
  out = dicom.read_dicom(
      _write(tmp_path, stored, bits_stored=12, voi_lut=(10, 16, lut)))
  np.testing.assert_allclose(out, lut.reshape(2, 2) / 65535.0, rtol=1e-6)


def test_minmax_contrast(tmp_path):
  stored = np.array([[100, 200], [300, 500]], np.uint16)
  path = _write(tmp_path, stored, bits_stored=16, photometric="MONOCHROME1")
  out = dicom.read_dicom(path, contrast="minmax")
  np.testing.assert_allclose(out, 1.0 - (stored - 100) / 400.0, rtol=1e-6,
                             atol=1e-7)


def test_errors_name_the_file(tmp_path):
  missing = os.path.join(tmp_path, "missing.dcm")
  with pytest.raises(UserError, match="missing.dcm: DICOM file not found"):
    dicom.read_dicom(missing)
  junk = os.path.join(tmp_path, "junk.dcm")
  with open(junk, "wb") as f:
    f.write(b"not a dicom" * 50)
  with pytest.raises(UserError, match="junk.dcm: not a readable DICOM"):
    dicom.read_dicom(junk)
  path = _write(tmp_path, np.zeros((4, 4), np.uint16), "x.dcm")
  with pytest.raises(UserError, match="contrast"):
    dicom.read_dicom(path, contrast="auto")


def test_truncated_pixel_data(tmp_path):
  path = _write(tmp_path, np.zeros((64, 64), np.uint16), "cut.dcm")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-3000])
  with pytest.raises(UserError, match="cut.dcm: "):
    dicom.read_dicom(path)


def test_no_pixels_colour_and_multiframe_are_refused(tmp_path):
  path = _write(tmp_path, np.zeros((4, 4), np.uint8), "nopix.dcm")
  ds = pydicom.dcmread(path)
  del ds.PixelData
  ds.save_as(path)
  with pytest.raises(UserError, match="nopix.dcm: DICOM file has no pixel"):
    dicom.read_dicom(path)
  rgb = os.path.join(tmp_path, "rgb.dcm")
  dicom.write_dicom(rgb, np.zeros((4, 4, 3), np.uint8), photometric="RGB")
  with pytest.raises(UserError, match="rgb.dcm: photometric .*'RGB'"):
    dicom.read_dicom(rgb)
  multi = _write(tmp_path, np.zeros((2, 4, 4), np.uint8), "multi.dcm")
  with pytest.raises(UserError, match="multi.dcm: DICOM file has 2 frames"):
    dicom.read_dicom(multi)
