"""Each run trained in a fresh process, so that what run_info.json measures
(peak device memory or the host's maximum RSS, which only ever grow within
a process; images/s) is that run's alone, not the largest of every run
before it in the same process."""

import multiprocessing
import os
import signal
from typing import Callable, Optional, Sequence

from absl import flags
from absl import logging

from medbridge_jax.ablation import runs
from medbridge_jax import cli
from medbridge_jax import errors


class Interrupted(Exception):
  """A SIGTERM ended the child before it could answer (it was not
  training: setting up or evaluating); its run resumes next time."""


def train_all(jobs: Sequence[tuple]) -> tuple[dict, Optional[str]]:
  """`runs.train_all`, each job not finished before in its own child
  process (a finished one is only read back, here)."""
  done = {}
  for job in jobs:
    finished = os.path.isfile(os.path.join(job[2], runs.RESULT_FILE))
    try:
      one, stopped = (runs.train_all([job]) if finished
                      else in_child(runs.train_all, [job]))
    except Interrupted:
      return done, job[2]
    done.update(one)
    if stopped:
      return done, stopped
  return done, None


def in_child(fn: Callable, *args):
  """fn(*args) in a spawned process: its return value, or its UserError
  raised here. A SIGTERM to this process is passed on to the child, whose
  trainer stops after its checkpoint and returns (`Interrupted` if the
  child ends without an answer after one).

  Raises:
    errors.UserError: fn's.
    Interrupted: a SIGTERM ended the child.
    RuntimeError: the child died of anything else (its traceback is on
      stderr).
  """
  ctx = multiprocessing.get_context("spawn")
  receive, send = ctx.Pipe(duplex=False)
  child = ctx.Process(target=_child, args=(fn, args, send,
                                           logging.get_verbosity()))
  child.start()
  send.close()
  terms = []

  def forward(signum, frame):
    del frame
    terms.append(signum)
    os.kill(child.pid, signal.SIGTERM)

  previous = signal.signal(signal.SIGTERM, forward)
  try:
    try:
      kind, value = receive.recv()
    except EOFError:  # Died without an answer; it printed its traceback.
      kind, value = None, None
    child.join()
  finally:
    signal.signal(signal.SIGTERM, previous)
  if kind == "user_error":
    raise errors.UserError(value)
  if kind is None and terms:
    raise Interrupted()
  if kind != "ok":
    raise RuntimeError(f"the child process running {fn.__name__} ended "
                       f"with exit code {child.exitcode} and no result")
  return value


def _child(fn: Callable, args: tuple, send, verbosity: int) -> None:
  flags.FLAGS.mark_as_parsed()  # Nothing to parse: the parent did.
  logging.use_absl_handler()  # The parent's log format (app.run's).
  logging.set_verbosity(verbosity)
  cli.quiet_libraries()
  # pylint: disable=g-import-not-at-top
  from medbridge_jax import sharding
  sharding.maybe_initialize_distributed()
  cli.enable_compilation_cache()
  try:
    send.send(("ok", fn(*args)))
  except errors.UserError as e:
    send.send(("user_error", str(e)))
