r"""MedBridge against the VLM adaptation methods, on the same footing.

  python -m medbridge_jax.compare --config=configs/in_domain.py \
      [--methods=linear_probe,lora,...] [--workdir=DIR] [--seeds=3] \
      [--config.train.steps=150 --config.method.<setting>=... ...]

Each method of `medbridge_jax.methods.NAMES` named by --methods (default:
all; medbridge, the reference, always runs) is the task config with
config.method.name set, trained `--seeds` times (config.seed, config.seed +
1, ...: the same seeds for every method) by `train.train_and_evaluate` in
DIR/<method>/seed<s>, so every method goes through the same data, trainer,
model selection on the validation split and evaluation. Runs are cached as
the ablation's are (`ablation.runs`): a finished run is reused, an
unfinished one resumes from its checkpoints, and a sub-workdir asked to run
another config is an error. SIGTERM stops after the current run's
checkpoint; the same command resumes. Each run trains in a fresh process
(`comparison.isolated`; --noisolate: all in this one), since the peak
memory a process reports only ever grows.

The table (DIR/compare.md and DIR/compare.json, printed too), per test set
(the main test split, then each extra test set of the config): per method
and seed the mean AUROC with its patient-level 95% interval and the
difference from MedBridge's run of the same seed on the same images with a
patient-level paired bootstrap interval; on the main split also trainable
and frozen parameters, training images/s and peak memory (device memory, or
the host's RSS where the device reports none) from each run's
run_info.json; a zero-shot row per frozen expert; per-label AUROC. The
header names the machine (JAX devices, CPU), the date, the config, the
seeds and the steps.

Default workdir: ./workdir/compare_<config name>[_<variant>].
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from medbridge_jax import cli
from medbridge_jax import errors

PROGRAM = "medbridge_jax.compare"


def _define_flags():
  """The flags, defined only when run as a program (as ablate's)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Task config file, optionally with a variant: "
      "configs/in_domain.py[:runlocal]; --config.<key>=... overrides apply "
      "to every method's run.", lock_config=True)
  flags.DEFINE_string(
      "workdir", None, "Directory of the comparison: <method>/seed<s> per "
      "run, compare.md/json (default: ./workdir/compare_<config>).")
  flags.DEFINE_list(
      "methods", [], "Methods to compare, comma-separated (default: all of "
      "medbridge_jax.methods.NAMES; medbridge always runs).")
  flags.DEFINE_integer("seeds", 3, "Training seeds per method (config.seed "
                       "and the next ones).")
  flags.DEFINE_bool(
      "isolate", True, "Train each run in a fresh process, so that its peak "
      "memory and speed are its own (--noisolate: all in this process; a "
      "run's peak memory is then the largest of the runs so far).")
  flags.mark_flag_as_required("config")
  return config


def main(argv, config_flag) -> None:
  config = cli.load_config(PROGRAM, argv, config_flag)
  spec = cli.config_spec()
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdir", "compare_" + cli.config_name(spec))
  cli.quiet_libraries()
  with errors.exit_on_user_error(PROGRAM):
    # pylint: disable=g-import-not-at-top
    from medbridge_jax import sharding
    from medbridge_jax.comparison import experiment
    # pylint: enable=g-import-not-at-top
    fl = flags.FLAGS
    if not fl.isolate:  # Else each run's own process does this.
      sharding.maybe_initialize_distributed()
      cli.enable_compilation_cache()  # Later runs skip compilation.
    result = experiment.run(config, workdir, fl.methods, fl.seeds, spec,
                            isolate=fl.isolate)
    print(result["markdown"])
    logging.info("Table: %s", os.path.join(os.path.abspath(workdir),
                                           experiment.STEM + ".md"))
    if result["stopped"]:
      sys.exit(1)


if __name__ == "__main__":
  _config_flag = _define_flags()
  app.run(lambda argv: main(argv, _config_flag),
          flags_parser=lambda argv: cli.parse_flags(PROGRAM, argv))
