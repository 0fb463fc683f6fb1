"""Starts one run as several processes on this machine, as launch/ does.

`Launch(workdir, flags, cache)` runs `python -m medbridge_jax.main` (the
command launch/slurm_gpu.sbatch and launch/tpu_pod.sh run) once per process
with MEDBRIDGE_MULTIHOST=1, a coordinator on 127.0.0.1 at a free port, and
`devices` virtual CPU devices each. Every process logs to its own file;
`wait` has a deadline, and on any failure or timeout every child is killed
and the assertion carries the tail of each log. Use it as a context manager
so that no child outlives the test.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from tests import tiny_run

PROGRAM = [sys.executable, "-m", "medbridge_jax.main",
           "--config=configs/in_domain.py:runlocal"]


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, devices: int,
              cache: str) -> dict:
  """The environment of one process: the test process's own XLA_FLAGS (8
  devices) replaced, the coordinator named by hand."""
  env = dict(os.environ)
  env.update({
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
      "MEDBRIDGE_CACHE": cache,
      "MEDBRIDGE_MULTIHOST": "1",
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
  })
  return env


class Launch:
  """`num_processes` processes of one run in `workdir` (see module doc)."""

  def __init__(self, workdir: str, flags, cache: str, *,
               num_processes: int = 2, devices: int = 4):
    self.workdir = workdir
    os.makedirs(workdir, exist_ok=True)
    port = free_port()
    self.logs = [os.path.join(os.path.dirname(workdir),
                              f"{os.path.basename(workdir)}.process{i}.log")
                 for i in range(num_processes)]
    self.procs = []
    for i, log in enumerate(self.logs):
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(
            PROGRAM + [f"--workdir={workdir}"] + list(flags),
            cwd=tiny_run.REPO, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(i, num_processes, port, devices, cache)))

  def __enter__(self) -> "Launch":
    return self

  def __exit__(self, *exc) -> None:
    self.kill()

  def log(self, i: int) -> str:
    with open(self.logs[i], errors="replace") as f:
      return f.read()

  def tails(self, lines: int = 40) -> str:
    """The last `lines` lines of each log, without gloo's connection chatter
    and the extension-module list of a crash."""
    out = []
    for i, p in enumerate(self.procs):
      kept = [l[:300] for l in self.log(i).splitlines()
              if not l.startswith(("[Gloo]", "Extension modules:"))]
      out.append(f"--- process {i} (return code {p.poll()}), "
                 f"{self.logs[i]}:\n" + "\n".join(kept[-lines:]))
    return "\n".join(out)

  def kill(self) -> None:
    """Kills every child still running (only ours, by pid)."""
    for p in self.procs:
      if p.poll() is None:
        p.kill()
    for p in self.procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass

  def fail(self, why: str):
    self.kill()
    raise AssertionError(f"{why}\n{self.tails()}")

  def signal(self, i: int, signum: int = signal.SIGTERM) -> None:
    self.procs[i].send_signal(signum)

  def wait(self, timeout: float) -> list[int]:
    """Return codes once all have ended; kills all if one fails or time
    runs out (a peer left waiting in a collective would never end)."""
    deadline = time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in self.procs]
      if all(c == 0 for c in codes):
        return codes
      if any(c not in (None, 0) for c in codes):
        self.fail(f"a process failed: return codes {codes}")
      if time.monotonic() > deadline:
        self.fail(f"processes still running after {timeout} s: {codes}")
      time.sleep(0.1)

  def wait_until(self, condition, timeout: float, what: str) -> None:
    """Polls `condition()` while every process runs; fails on exit or
    timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
      codes = [p.poll() for p in self.procs]
      if any(c is not None for c in codes):
        self.fail(f"a process ended before {what}: return codes {codes}")
      if time.monotonic() > deadline:
        self.fail(f"no {what} after {timeout} s")
      time.sleep(0.05)
