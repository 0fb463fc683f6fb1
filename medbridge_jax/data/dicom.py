"""DICOM chest X-rays to float32 grayscale in [0, 1], as a viewer shows them.

The DICOM grayscale display pipeline, in the standard's order:

1. stored values (8, 12 or 16 bits, signed or unsigned) from pydicom;
2. the modality LUT: Modality LUT Sequence, or Rescale Slope / Intercept;
3. the VOI transform: VOI LUT Sequence (preferred when both are present, as
   pydicom does) or Window Center / Width with its VOI LUT Function;
4. scaled to [0, 1] by the transform's *nominal* output range, not by the
   image's own minimum and maximum: a window maps to the full range, a VOI LUT
   to [0, 2**bits - 1] (its descriptor's bits per entry), and an image with
   neither to the range its Bits Stored allows after the modality LUT;
5. MONOCHROME1 (minimum is white) inverted, so 1.0 is always white (bone).
   Presentation LUT Shape is not applied on top: for DX images it must agree
   with the photometric interpretation, so applying both would invert twice.

`contrast="minmax"` stretches each image's own minimum..maximum after steps
1-3 instead of step 4, for files whose Bits Stored or LUT depth overstates the
range actually used.
"""

import os

import numpy as np
import pydicom
import pydicom.errors
from pydicom import pixels

from medbridge_jax.errors import UserError

CONTRASTS = ("dicom", "minmax")


def read_dicom(path: str, contrast: str = "dicom") -> np.ndarray:
  """Reads one single-frame grayscale DICOM file.

  Args:
    path: the `.dcm` / `.dicom` file.
    contrast: "dicom" (scale by the display pipeline's nominal output range)
      or "minmax" (stretch the image's own range); see the module docstring.

  Returns:
    float32 array (rows, columns) in [0, 1], 1.0 white.

  Raises:
    UserError: the file is missing, not DICOM, has no or undecodable pixel
      data, is not single-frame MONOCHROME1/2, or `contrast` is unknown.
  """
  if contrast not in CONTRASTS:
    raise UserError(f"DICOM contrast {contrast!r} is not one of {CONTRASTS}")
  if not os.path.isfile(path):
    raise UserError(f"{path}: DICOM file not found")
  try:
    ds = pydicom.dcmread(path)
  except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError,
          KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a readable DICOM file ({_short(e)})") from e
  if "PixelData" not in ds:
    raise UserError(f"{path}: DICOM file has no pixel data")
  photometric = str(ds.get("PhotometricInterpretation", "")).strip()
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise UserError(
        f"{path}: photometric interpretation {photometric!r}; expected "
        "MONOCHROME1 or MONOCHROME2")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames != 1:
    raise UserError(f"{path}: DICOM file has {frames} frames; expected one")
  try:
    stored = ds.pixel_array
  except Exception as e:  # pylint: disable=broad-except
    # pydicom raises many types here (missing decoder plugins, truncated
    # data, bad lengths); for the user all mean "this file cannot be read".
    raise UserError(
        f"{path}: cannot decode DICOM pixel data ({_short(e)})") from e
  if stored.ndim != 2:
    raise UserError(
        f"{path}: DICOM pixel data has shape {stored.shape}; expected 2-D")
  try:
    values, lo, hi = _display_values(stored, ds)
  except (ValueError, NotImplementedError, AttributeError, TypeError,
          KeyError) as e:
    raise UserError(f"{path}: bad DICOM display attributes ({_short(e)})"
                    ) from e
  if contrast == "minmax":
    lo, hi = float(values.min()), float(values.max())
  # A negative rescale slope makes lo > hi; the ratio is right either way.
  scaled = (values - lo) / (hi - lo) if hi != lo else np.zeros_like(values)
  scaled = np.clip(scaled, 0.0, 1.0)
  if photometric == "MONOCHROME1":
    scaled = 1.0 - scaled
  return scaled.astype(np.float32)


def _display_values(stored: np.ndarray, ds: pydicom.Dataset
                    ) -> tuple[np.ndarray, float, float]:
  """Steps 2-3 of the pipeline; returns float64 values and their nominal range.
  """
  modality = pixels.apply_modality_lut(stored, ds)
  m_lo, m_hi = _modality_range(ds)
  has_lut = bool(ds.get("VOILUTSequence")) and all(
      ds.VOILUTSequence[0].get(k) is not None
      for k in ("LUTDescriptor", "LUTData"))
  has_window = (ds.get("WindowCenter") is not None
                and ds.get("WindowWidth") is not None)
  if has_lut:
    # pydicom indexes the LUT with the values, which must then be integers.
    if np.issubdtype(modality.dtype, np.floating):
      modality = np.rint(modality)
    # Values outside the LUT take its first or last entry (PS3.3 C.11.2.1.1).
    # Clipping here, in int64, also avoids pydicom 3.0 wrapping indices
    # around in an 8-bit LUT's own dtype.
    entries, first, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
    entries = entries or 2**16
    modality = np.clip(modality, first, first + entries - 1).astype(np.int64)
    out = pixels.apply_voi_lut(modality, ds, prefer_lut=True)
    return out.astype(np.float64), 0.0, float(2**bits - 1)
  if has_window:
    out = pixels.apply_voi_lut(modality, ds, prefer_lut=False)
    # The window maps onto a fixed output range that pydicom derives from
    # Bits Stored and the modality LUT; windowing two far-out probes reads
    # that range back without restating pydicom's rules.
    probe = np.array([m_lo - 1e9 * (m_hi - m_lo + 1),
                      m_hi + 1e9 * (m_hi - m_lo + 1)])
    with np.errstate(over="ignore"):
      lo, hi = pixels.apply_voi_lut(probe, ds, prefer_lut=False)
    return np.asarray(out, np.float64), float(lo), float(hi)
  return np.asarray(modality, np.float64), m_lo, m_hi


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
  """The range of the modality LUT's output for any stored value."""
  bits = int(ds.BitsStored)
  if int(ds.get("PixelRepresentation", 0)) == 0:
    lo, hi = 0, 2**bits - 1
  else:
    lo, hi = -(2**(bits - 1)), 2**(bits - 1) - 1
  if ds.get("ModalityLUTSequence"):
    item = ds.ModalityLUTSequence[0]
    return 0.0, float(2**int(item.LUTDescriptor[2]) - 1)
  slope = ds.get("RescaleSlope")
  intercept = ds.get("RescaleIntercept")
  if slope is not None and intercept is not None:
    a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(
        intercept)
    return min(a, b), max(a, b)
  return float(lo), float(hi)


def _short(e: Exception) -> str:
  """The first line of an exception's message, for one-line errors."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def write_dicom(path: str, stored: np.ndarray, *,
                photometric: str = "MONOCHROME2",
                bits_stored: int | None = None,
                window: tuple[float, float] | None = None,
                voi_function: str | None = None,
                rescale: tuple[float, float] | None = None,
                voi_lut: tuple[int, int, np.ndarray] | None = None,
                patient_id: str = "anonymous") -> None:
  """Writes a minimal uncompressed DX DICOM file (fixtures, synthetic data).

  Args:
    path: where to write.
    stored: (rows, columns) uint8, uint16, int8 or int16 stored values.
    photometric: "MONOCHROME1" or "MONOCHROME2".
    bits_stored: Bits Stored (default: all bits of the dtype).
    window: (center, width) written as Window Center / Width.
    voi_function: VOI LUT Function ("LINEAR", "LINEAR_EXACT", "SIGMOID").
    rescale: (slope, intercept) written as Rescale Slope / Intercept.
    voi_lut: (first_mapped_value, bits_per_entry, uint16 entries) written as a
      one-item VOI LUT Sequence.
    patient_id: Patient ID.
  """
  file_meta = pydicom.dataset.FileMetaDataset()
  file_meta.MediaStorageSOPClassUID = (
      "1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image, for presentation
  file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds = pydicom.Dataset()
  ds.file_meta = file_meta
  ds.SOPClassUID = file_meta.MediaStorageSOPClassUID
  ds.Modality = "DX"
  ds.PatientID = patient_id
  ds.set_pixel_data(np.asarray(stored), photometric,
                    bits_stored or np.asarray(stored).dtype.itemsize * 8,
                    generate_instance_uid=False)
  ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
  if rescale is not None:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  if voi_function is not None:
    ds.VOILUTFunction = voi_function
  if voi_lut is not None:
    first, bits, entries = voi_lut
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(entries), int(first), int(bits)]
    # LUT Data may be US or OW; US keeps the entries a plain list.
    item.add_new(0x00283006, "US", [int(v) for v in entries])
    ds.VOILUTSequence = [item]
  ds.save_as(path, enforce_file_format=True)
