"""Throughput of the input pipeline's per-image work on the CPU cores.

What a grain worker does for each training image, from one of two sources:
- "files": `images.read_image` (decode, then letterbox-resize to the
  stored side) of synthetic radiographs (`synthetic_draw.render`) at
  `input_size` px, half written as PNG (as NIH ships them), half as JPEG
  (CheXpert, MIMIC-CXR-JPG), into a temporary folder;
- "shards": a record of prepared ArrayRecord shards
  (`data.tfds_builders`, lossless PNG at the working side) read through the
  tfds data source the pipeline uses;
then `pipeline.Augment` (affine warp, contrast and brightness).

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


def write_shards(folder: str, size: int, patients: int = 12) -> str:
  """A synthetic data set of `patients` at `size` px, prepared as ArrayRecord
  shards at `size`: the shards' data_dir ("shards" measurements)."""
  from medbridge_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from medbridge_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  root = synthetic.ensure(os.path.join(folder, "generated"), patients, 0,
                          "chexpert", size)
  data_dir = os.path.join(folder, "tfds")
  tfds_builders.prepare("synthetic", root, data_dir, size)
  return data_dir


def _reader(source, out_size: int):
  """(count of items, read(i) -> uint8 (out_size, out_size) image)."""
  from medbridge_jax.data import images  # pylint: disable=g-import-not-at-top
  if isinstance(source, (list, tuple)):
    return len(source), lambda i: images.read_image(source[i], out_size)
  from medbridge_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  records = tfds_builders.data_source("synthetic", source, "train", out_size)

  def read(i):
    image = np.asarray(records[i]["image"], np.uint8)[..., 0]
    if image.shape != (out_size, out_size):
      image = images.letterbox(image, out_size)
    return image
  return len(records), read


def _loop(source, out_size: int, count: int, seed: int, barrier=None):
  """(start, end) wall times of `count` read + augment steps; `source` is
  a list of image files or a shards data_dir."""
  from medbridge_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  n, read = _reader(source, out_size)
  augment = pipeline.Augment()
  rng = np.random.default_rng(seed)
  for i in range(n):  # Warm-up: imports, page cache, decoders' plugins.
    augment(read(i), rng)
  if barrier is not None:
    barrier.wait()
  start = time.time()
  for i in range(count):
    augment(read(i % n), rng)
  return start, time.time()


def _worker(source, out_size, count, seed, barrier, queue):
  queue.put(_loop(source, out_size, count, seed, barrier))


def measure(source, out_size: int, workers: int, count: int) -> dict:
  """Images/s in all and per worker; workers=0 runs in this process.
  `source`: image files (`write_fixtures`) or a shards data_dir
  (`write_shards`)."""
  if count < 1:
    raise ValueError(f"count must be >= 1, got {count}")
  if workers <= 0:
    start, end = _loop(source, out_size, count, 0)
    rate = count / (end - start)
    return {"workers": 0, "images_per_s": rate,
            "images_per_s_per_worker": rate}
  ctx = multiprocessing.get_context("spawn")
  barrier, queue = ctx.Barrier(workers), ctx.Queue()
  procs = [ctx.Process(target=_worker,
                       args=(source, out_size, count, i, barrier, queue))
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
