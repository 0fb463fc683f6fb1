"""Per-image cost of DICOM decoding and of preparing a shard record.

  python -m medbridge_jax.bench.decode_speed [--size=1024] [--repeat=5]

Writes one VinDr-like DICOM (2500 x 2048, 12 bits in 16, MONOCHROME1, with a
window) and one RSNA-like DICOM (1024 x 1024, 8 bits), then times, in this
process (one worker): `dicom.read_dicom`, `images.read_image` at --size
(decode + letterbox) and `tfds_builders._encode` (read_image + PNG, i.e. one
record of `prepare`).
"""

import argparse
import os
import tempfile
import time

import numpy as np

from medbridge_jax.data import dicom
from medbridge_jax.data import images
from medbridge_jax.data import tfds_builders


def _time(name, fn, repeat):
  fn()  # warm up
  start = time.perf_counter()
  for _ in range(repeat):
    fn()
  per = (time.perf_counter() - start) / repeat
  print(f"{name:46s} {per * 1e3:7.1f} ms  {1 / per:6.1f} images/s")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=1024)
  p.add_argument("--repeat", type=int, default=5)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    files = {
        "vindr-like 2500x2048 12-bit MONOCHROME1": (
            rng.integers(0, 4096, (2500, 2048)).astype(np.uint16),
            dict(bits_stored=12, photometric="MONOCHROME1",
                 window=(2048, 4000))),
        "rsna-like 1024x1024 8-bit": (
            rng.integers(0, 256, (1024, 1024)).astype(np.uint8), {}),
    }
    for name, (pixels, kw) in files.items():
      path = os.path.join(tmp, name.split()[0] + ".dcm")
      dicom.write_dicom(path, pixels, **kw)
      _time(f"{name}: read_dicom",
            lambda: dicom.read_dicom(path), args.repeat)
      _time(f"  read_image at {args.size}",
            lambda: images.read_image(path, args.size), args.repeat)
      _time(f"  shard record at {args.size} (+PNG)",
            lambda: tfds_builders._encode(tmp, path, args.size), args.repeat)


if __name__ == "__main__":
  main()
