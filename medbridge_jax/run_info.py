"""run_info.json: what a training run cost, for comparing methods.

Written by the lead process when training ends:

  {"method": config.method.name,
   "trainable_params": n, "frozen_params": n,
   "train_images_per_s": global images per wall second over the training
       steps after the first (which compiles), evaluations and checkpoint
       saves left out; null when fewer than two steps ran in the process,
   "peak_memory_bytes": n,
   "peak_memory_kind": "device" (the devices' peak_bytes_in_use, the
       largest of this process's devices) | "host_rss" (the process's
       maximum resident set, where the backend reports no device memory)}
"""

import os
import resource
import sys
import time
from typing import Optional, Tuple

import jax

from medbridge_jax import jsonfile

FILE = "run_info.json"


class Speed:
  """Training throughput: wall time from the end of the first step to the
  end of the last, less the pauses (evaluations, checkpoint saves)."""

  def __init__(self, global_batch: int):
    self.global_batch = int(global_batch)
    self._start: Optional[float] = None
    self._end: Optional[float] = None
    self._steps = 0  # Steps timed (after the first).
    self._paused = 0.0
    self._pause_from: Optional[float] = None

  def stepped(self, state) -> None:
    """Called after each step is dispatched; the first one is waited for
    (it compiles) and starts the clock."""
    if self._start is None:
      jax.block_until_ready(state)
      self._start = time.monotonic()
    else:
      self._steps += 1

  def pause(self) -> None:
    """Time from here to `resume` is not training (the caller has waited
    for the step, e.g. by reading its metrics)."""
    self._pause_from = time.monotonic()

  def resume(self) -> None:
    if self._pause_from is not None:
      self._paused += time.monotonic() - self._pause_from
      self._pause_from = None

  def stop(self, state) -> None:
    """Waits for the last step and stops the clock."""
    jax.block_until_ready(state)
    self.resume()
    self._end = time.monotonic()

  def images_per_s(self) -> Optional[float]:
    if self._start is None or self._end is None or self._steps < 1:
      return None
    seconds = self._end - self._start - self._paused
    if seconds <= 0:
      return None
    return self._steps * self.global_batch / seconds


def peak_memory() -> Tuple[int, str]:
  """(bytes, "device" | "host_rss"): the devices' peak memory in use where
  the backend reports it, else this process's maximum resident set."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None  # Backends without memory statistics raise or say None.
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # Linux reports KiB, macOS bytes.
  return int(rss if sys.platform == "darwin" else rss * 1024), "host_rss"


def write(workdir: str, method: str, counts: dict,
          images_per_s: Optional[float]) -> str:
  """Writes workdir/run_info.json (see the module docstring); its path."""
  peak, kind = peak_memory()
  body = {"method": method, "trainable_params": int(counts["train"]),
          "frozen_params": int(counts["frozen"]),
          "train_images_per_s": (None if images_per_s is None
                                 else float(images_per_s)),
          "peak_memory_bytes": peak, "peak_memory_kind": kind}
  path = os.path.join(workdir, FILE)
  jsonfile.write(path, body)
  return path


def read(workdir: str) -> dict:
  """The run's run_info.json; UserError naming it if missing or broken."""
  return jsonfile.read(os.path.join(workdir, FILE), "run info")
