"""What the command-line programs (main, ablate, predict) share.

Each prints a user's mistake as one line `PROGRAM: error: ...` with exit
status 2, hides orbax's INFO chatter, and keeps compiled programs in the
cache so that reruns skip XLA compilation.
"""

import logging as std_logging
import os
import sys

from absl import logging


def fail(program: str, message: str) -> None:
  """Prints `program: error: message` to stderr and exits with status 2."""
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(2)


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's INFO lines (dozens per save or restore); keeps warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or "/orbax/" not in record.pathname.replace(os.sep, "/"))


def quiet_libraries() -> None:
  """Installs the orbax filter on absl's log handler."""
  logging.get_absl_handler().addFilter(_QuietOrbax())


def enable_compilation_cache() -> None:
  """Keeps compiled programs in the cache so reruns skip XLA compilation.

  MEDBRIDGE_COMPILATION_CACHE=0 turns it off.
  """
  if os.environ.get("MEDBRIDGE_COMPILATION_CACHE", "1") == "0":
    return
  import jax  # pylint: disable=g-import-not-at-top
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(experts_setup.cache_dir(), "jax_compilation"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
