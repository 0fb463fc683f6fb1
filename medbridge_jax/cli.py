"""What the command-line programs (main, ablate, predict) share.

Each prints a user's mistake as one line `PROGRAM: error: ...` with exit
status 2 (an unknown --config.<key> named with its nearest real key, a bad
value caught by `config_check` as soon as the config is loaded), hides
orbax's INFO chatter, and keeps compiled programs in the cache so that reruns
skip XLA compilation.
"""

import difflib
import importlib.util
import logging as std_logging
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging

from medbridge_jax import cache
from medbridge_jax import errors


def fail(program: str, message: str) -> None:
  """Prints `program: error: message` to stderr and exits with status 2."""
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_arg(argv: Sequence[str]) -> Optional[str]:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def unknown_override(argv: Sequence[str]) -> Optional[str]:
  """A one-line message for the first --config.<path> that names no key of
  the config file given by --config (None if all are known)."""
  spec = _config_arg(argv)
  if not spec:
    return None
  path, _, variant = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_cfg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None  # The config file itself is the problem; reported elsewhere.
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        near = difflib.get_close_matches(part, fields, n=1)
        fix = ".".join(parts[:depth] + near + parts[depth + 1:])
        hint = f" (did you mean {fix}?)" if near else ""
        return f"unknown config key {key!r} in {a}{hint}"
      node = node[part]
  return None


def parse_flags(program: str, argv: Sequence[str]):
  """absl's flag parsing, every failure one line with exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(program, unknown_override(argv) or errors.one_line(e))


def load_config(program: str, argv: Sequence[str], config_flag) -> Any:
  """The parsed --config, after refusing stray arguments and checking every
  value (`config_check.check`); one-line errors."""
  if len(argv) > 1:
    fail(program, f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = config_flag.value
    config.keys()  # A config file that failed to load raises only on use.
  except (OSError, ValueError, AttributeError) as e:
    fail(program, errors.one_line(e))
  # Here, not above: config_check imports the modules that name the valid
  # values (JAX among them), and predict answers its flags without them.
  from medbridge_jax import config_check  # pylint: disable=g-import-not-at-top
  try:
    config_check.check(config)
  except errors.UserError as e:
    fail(program, str(e))
  return config


def config_spec() -> str:
  """The parsed --config flag as given: "configs/x.py[:variant]"."""
  return flags.FLAGS["config"].serialize().split("=", 1)[1]


def config_name(spec: str) -> str:
  """"x[_variant]" for a --config value "path/x.py[:variant]"."""
  path, _, variant = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}_{variant}" if variant else name


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
  # Not above: predict answers its flags before JAX loads.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    cache.path("jax_compilation"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
