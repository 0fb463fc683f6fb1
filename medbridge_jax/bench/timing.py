"""Timed iterations on device, compile counting and facts about the machine.

`measure` warms a step up, then times each further call to
`jax.block_until_ready` under `jax.transfer_guard("disallow")`: inputs must
already live on the device, and any implicit host <-> device copy inside the
timed loop raises instead of silently costing time. Compilations are
counted with a `jax.monitoring` listener on XLA's backend-compile event, so
a step that recompiles for the same shapes (a changed sharding, a weak type
flipping between calls) shows up as compiles > 1.
"""

import dataclasses
import datetime
import os
import socket
import statistics
import time
from typing import Any, Callable, List, Optional

import jax
import numpy as np

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts XLA backend compilations while active (a context manager)."""

  def __init__(self):
    self.count = 0

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listen)


@dataclasses.dataclass
class Timing:
  """Seconds per call of the timed iterations, and compilations seen."""
  seconds: List[float]
  compiles: int

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)


def measure(call: Callable[[], Any], *, steps: int, warmup: int = 2,
            guard: str = "disallow") -> Timing:
  """Runs `call` `warmup` times, then times `steps` calls, one by one.

  The first warm-up call compiles; the timed calls run under
  `jax.transfer_guard(guard)` and each is blocked on before the clock stops.
  `call` carries its own state (e.g. a train state it reassigns).
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  seconds = []
  with CompileCounter() as compiles:
    for _ in range(max(1, warmup)):
      jax.block_until_ready(call())
    with jax.transfer_guard(guard):
      for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - start)
  return Timing(seconds, compiles.count)


def peak_memory_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """The device's peak bytes in use so far, where the platform reports it.

  A process-wide high-water mark (it never goes down): the harness measures
  in increasing order of memory (forward, train, eval). None on CPU.
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def random_array(shape, dtype, sharding, seed: int = 0) -> jax.Array:
  """Random values placed on the device(s) with `sharding`, before timing."""
  rng = np.random.default_rng(seed)
  if np.issubdtype(np.dtype(dtype), np.integer):
    host = rng.integers(0, 256, size=shape).astype(dtype)
  else:
    host = rng.standard_normal(shape, np.float32).astype(dtype)
  return jax.block_until_ready(jax.device_put(host, sharding))


def machine() -> dict:
  """Where and when: the fields every JSON line of the harness carries."""
  device = jax.local_devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": socket.gethostname(),
      "cpu_count": os.cpu_count(),
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
  }
