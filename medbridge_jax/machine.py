"""The machine a measurement was made on, and the date: comparisons name
where their costs were measured, the test-bed experts where they were made
(XLA's CPU code, and so the weights, depends on the CPU)."""

import datetime
import os
import platform


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo), else platform's guess."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def describe() -> dict:
  """{"platform", "device_kind", "device_count", "cpu", "cpu_count", "os",
  "line"} of this process's JAX devices and host."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  out = dict(platform=devices[0].platform, device_kind=", ".join(kinds),
             device_count=len(devices), cpu=cpu_model(),
             cpu_count=os.cpu_count(),
             os=f"{platform.system()} {platform.machine()}")
  out["line"] = (f"{out['device_count']} JAX {out['platform']} device"
                 f"{'s' if out['device_count'] > 1 else ''} "
                 f"({out['device_kind']}); host {out['cpu']}, "
                 f"{out['cpu_count']} CPU cores, {out['os']}")
  return out


def today() -> str:
  """The date and time, UTC, to the minute."""
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC")
