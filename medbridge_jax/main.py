r"""Trains and evaluates MedBridge: the command-line entry point.

  python -m medbridge_jax.main --config=configs/in_domain.py --workdir=DIR \
      [--config.train.steps=100 ...]

Every config value can be overridden with --config.<path>=<value>; an unknown
path is an error naming it. Without --workdir the run writes to
./workdir/<config file name>[_<variant>]. Rerunning the same command resumes
from the workdir's checkpoints. All the work is in
`train.train_and_evaluate`.
"""

import difflib
import importlib.util
import os

# TensorFlow (imported by clu's writers, never used to compute) would print
# C++ INFO lines, among them a oneDNN notice that ignores the level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from medbridge_jax import cli
from medbridge_jax import errors

PROGRAM = "medbridge_jax.main"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Task config file, optionally with a variant: "
    "configs/in_domain.py[:runlocal].", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs, metrics and the report "
    "(default: ./workdir/<config name>[_<variant>]).")
flags.mark_flag_as_required("config")


def _fail(message: str) -> None:
  cli.fail(PROGRAM, message)


def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(argv) -> str | None:
  """A one-line message for the first --config.<path> that names no key."""
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


def _one_line(e: Exception) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  # absl wraps a config file's exception in a traceback: keep the head and
  # the exception itself.
  return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def parse_flags(argv):
  """absl's parsing, with every failure as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail(_unknown_override(argv) or _one_line(e))


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdir", f"{name}_{variant}" if variant else name)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
    config.keys()  # A config file that failed to load raises only on use.
  except (OSError, ValueError, AttributeError) as e:
    _fail(_one_line(e))
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize()
                                              .split("=", 1)[1])
  cli.quiet_libraries()
  with errors.exit_on_user_error(PROGRAM):
    # Before any other JAX call; a no-op unless launched on several hosts.
    from medbridge_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.maybe_initialize_distributed()
    cli.enable_compilation_cache()
    from medbridge_jax import train  # pylint: disable=g-import-not-at-top
    logging.info("Workdir: %s", os.path.abspath(workdir))
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
