"""Throughput of the input pipeline's per-image work on the CPU cores.

What a grain worker does for each training image: `images.read_image`
(decode, then letterbox-resize to the stored side) and `pipeline.Augment`
(affine warp, contrast and brightness). The fixtures are synthetic
radiographs (`synthetic_draw.render`) at `input_size` px, half written as PNG
(as NIH ships them), half as JPEG (CheXpert, MIMIC-CXR-JPG), into a
temporary folder.

With workers, each is a spawned process (sharing nothing with the parent's
JAX runtime, seeing only the CPU) that warms up on every file, waits for
the others at a barrier, then runs its loop; the aggregate rate is all
their images over the span from the first start to the last finish.
"""

import multiprocessing
import os
import queue as queue_lib
import time
from typing import List

import numpy as np
from PIL import Image


def write_fixtures(folder: str, size: int, count: int = 8,
                   seed: int = 0) -> List[str]:
  """`count` synthetic radiographs of `size` px, alternately PNG and JPEG."""
  from medbridge_jax.data import synthetic_draw as draw  # pylint: disable=g-import-not-at-top
  paths = []
  for i in range(count):
    patient = draw.draw_patient(seed, i)
    image, _ = draw.render(patient, draw.draw_study(patient, seed, 0), size)
    pixels = Image.fromarray(draw.to_uint8(image), "L")
    if i % 2:
      path = os.path.join(folder, f"fixture_{i}.jpg")
      pixels.save(path, "JPEG", quality=95)
    else:
      path = os.path.join(folder, f"fixture_{i}.png")
      pixels.save(path, "PNG")
    paths.append(path)
  return paths


def _loop(paths: List[str], out_size: int, count: int, seed: int,
          barrier=None):
  """(start, end) wall times of `count` decode + resize + augment steps."""
  from medbridge_jax.data import images  # pylint: disable=g-import-not-at-top
  from medbridge_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  augment = pipeline.Augment()
  rng = np.random.default_rng(seed)
  for path in paths:  # Warm-up: imports, page cache, Pillow's plugins.
    augment(images.read_image(path, out_size), rng)
  if barrier is not None:
    barrier.wait()
  start = time.time()
  for i in range(count):
    augment(images.read_image(paths[i % len(paths)], out_size), rng)
  return start, time.time()


def _worker(paths, out_size, count, seed, barrier, queue):
  queue.put(_loop(paths, out_size, count, seed, barrier))


def measure(paths: List[str], out_size: int, workers: int,
            count: int) -> dict:
  """Images/s in all and per worker; workers=0 runs in this process."""
  if count < 1:
    raise ValueError(f"count must be >= 1, got {count}")
  if workers <= 0:
    start, end = _loop(paths, out_size, count, 0)
    rate = count / (end - start)
    return {"workers": 0, "images_per_s": rate,
            "images_per_s_per_worker": rate}
  ctx = multiprocessing.get_context("spawn")
  barrier, queue = ctx.Barrier(workers), ctx.Queue()
  procs = [ctx.Process(target=_worker,
                       args=(paths, out_size, count, i, barrier, queue))
           for i in range(workers)]
  # Workers import the data modules, hence JAX: keep them off the GPU.
  saved = os.environ.get("JAX_PLATFORMS")
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    for p in procs:
      p.start()
  finally:
    if saved is None:
      del os.environ["JAX_PLATFORMS"]
    else:
      os.environ["JAX_PLATFORMS"] = saved
  spans = []
  while len(spans) < workers:
    try:
      spans.append(queue.get(timeout=1.0))
    except queue_lib.Empty:
      if any(p.exitcode not in (None, 0) for p in procs):
        for p in procs:
          p.terminate()
        raise RuntimeError("an input pipeline worker failed (exit codes "
                           f"{[p.exitcode for p in procs]})") from None
  for p in procs:
    p.join()
  rate = workers * count / (max(e for _, e in spans) - min(s for s, _ in spans))
  return {"workers": workers, "images_per_s": rate,
          "images_per_s_per_worker": rate / workers}
