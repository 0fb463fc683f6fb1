r"""Trains and evaluates MedBridge: the command-line entry point.

  python -m medbridge_jax.main --config=configs/in_domain.py --workdir=DIR \
      [--config.train.steps=100 ...]

Every config value can be overridden with --config.<path>=<value>; an unknown
path, or a value `config_check` refuses (a mistyped name, a number out of
range, two fields that cannot go together), is a one-line error naming it
before any data is generated or expert loaded. Without --workdir the run
writes to ./workdir/<config file name>[_<variant>]. Rerunning the same
command resumes from the workdir's checkpoints. All the work is in
`train.train_and_evaluate`.
"""

import os

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


def parse_flags(argv):
  """absl's parsing, with every failure as one line and exit status 2."""
  return cli.parse_flags(PROGRAM, argv)


def default_workdir(config_arg: str) -> str:
  return os.path.join("workdir", cli.config_name(config_arg))


def main(argv):
  config = cli.load_config(PROGRAM, argv, _CONFIG)
  workdir = _WORKDIR.value or default_workdir(cli.config_spec())
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
