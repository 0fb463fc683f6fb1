"""Image files to a fixed-size uint8 grayscale array.

Every reader's paths end up here: PNG and JPEG (8 or 16 bit, grayscale or
colour) through Pillow, DICOM (`.dcm`, `.dicom`) through `dicom.read_dicom`.

Intensity:
  * 8-bit images keep their values.
  * 16-bit (and 32-bit integer or float) images carry no standard display
    window, so each image's own minimum..maximum is stretched to 0..255 (a
    12-bit image stored in 16-bit words would otherwise be nearly black).
  * colour images become luma (ITU-R 601-2, Pillow's "L").
  * DICOM goes through the display pipeline of `dicom.py` ([0, 1], 1 white).

Geometry: letterbox. The longer side is scaled to `size` and the image is
centred on a black square (0 = air, as outside the patient), so nothing is cut
off and the aspect ratio stays true: a cardiothoracic ratio or the round shape
of a nodule is not distorted by a stretch. Shrinking averages areas (box
filter), enlarging is bilinear. JPEGs are decoded at a reduced scale when they
are at least twice the target size (libjpeg's draft mode), which is several
times faster for 2-3k pixel files.
"""

import os

import numpy as np
from PIL import Image

from medbridge_jax.errors import UserError

DICOM_SUFFIXES = (".dcm", ".dicom")

# Pillow's decompression-bomb guard rejects images over ~179 MP; radiographs
# are at most ~10 MP, so a larger file is corrupt or not an X-ray.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError,
                  Image.DecompressionBombError)


def read_image(path: str, size: int) -> np.ndarray:
  """Reads an image file into uint8 (size, size) grayscale (see module doc).

  Raises:
    UserError: naming the file, if it is missing or cannot be decoded.
  """
  if not os.path.isfile(path):
    raise UserError(f"{path}: image file not found")
  if path.lower().endswith(DICOM_SUFFIXES):
    # pydicom loads only when a DICOM file comes.
    from medbridge_jax.data import dicom  # pylint: disable=g-import-not-at-top
    try:
      pixels = dicom.read_dicom(path) * np.float32(255.0)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"{path}: cannot decode DICOM image ({e})") from e
    return letterbox(pixels, size)
  try:
    with Image.open(path) as img:
      if img.format == "JPEG":
        img.draft("L", (size, size))
      pixels = _grayscale(img)
  except _DECODE_ERRORS as e:
    raise UserError(f"{path}: cannot decode image ({e})") from e
  return letterbox(pixels, size)


def _grayscale(img: Image.Image) -> np.ndarray:
  """uint8 (H, W) for 8-bit images, float32 (H, W) in [0, 255] otherwise."""
  if img.mode == "L":
    return np.asarray(img, np.uint8)
  if img.mode in ("I", "F") or img.mode.startswith("I;"):
    return stretch(np.asarray(img))
  return np.asarray(img.convert("L"), np.uint8)


def stretch(values: np.ndarray) -> np.ndarray:
  """float32 values with the image's min..max mapped to 0..255."""
  values = np.asarray(values)
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return np.zeros(values.shape, np.float32)
  # float32 holds 16-bit values exactly; float64 would only be slower.
  out = values.astype(np.float32)
  out -= np.float32(lo)
  out *= np.float32(255.0 / (hi - lo))
  return out


def letterbox_geometry(hw: tuple[int, int], size: int
                       ) -> tuple[int, int, int, int]:
  """(top, left, height, width) of an (h, w) image inside the (size, size)
  square `letterbox` makes of it: the longer side scaled to `size`, both
  sides rounded, centred."""
  h, w = (int(v) for v in hw)
  scale = size / max(h, w)
  new_h = min(size, max(1, round(h * scale)))
  new_w = min(size, max(1, round(w * scale)))
  return (size - new_h) // 2, (size - new_w) // 2, new_h, new_w


def letterbox(pixels: np.ndarray, size: int) -> np.ndarray:
  """Fits a (H, W) image into uint8 (size, size), centred on black.

  Args:
    pixels: uint8, or float in [0, 255] (rounded at the end, once).
    size: side of the output square.
  """
  if pixels.ndim != 2 or min(pixels.shape) < 1:
    raise ValueError(f"expected a non-empty 2-D image, got {pixels.shape}")
  h, w = pixels.shape
  scale = size / max(h, w)
  top, left, new_h, new_w = letterbox_geometry((h, w), size)
  if (new_h, new_w) == (h, w):
    fitted = pixels
  else:
    # Resampled in float (Pillow's "F" mode is exact and as fast as its 8-bit
    # path), rounded once below.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    fitted = np.asarray(
        Image.fromarray(np.asarray(pixels, np.float32), "F").resize(
            (new_w, new_h), resample=resample))
  if fitted.dtype != np.uint8:
    fitted = np.clip(np.rint(fitted), 0, 255).astype(np.uint8)
  if (new_h, new_w) == (size, size):
    return np.ascontiguousarray(fitted)
  out = np.zeros((size, size), np.uint8)
  out[top:top + new_h, left:left + new_w] = fitted
  return out
