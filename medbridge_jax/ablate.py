r"""The ablation experiment: variants x seeds, reported on the test split.

  python -m medbridge_jax.ablate --config=configs/in_domain.py \
      [--workdir=DIR] [--variants=full,global_only,...] [--seeds=3] \
      [--config.train.steps=150 ...]
  python -m medbridge_jax.ablate --config=configs/in_domain.py \
      --dose=0.5,1,2,4 [--dose_contrast=0.5,2] [--seeds=3] [...]

Grid. Each variant (`ablation.variants`) is the task config with a few
switches changed, trained `--seeds` times (config.seed, config.seed + 1, ...) by
`train.train_and_evaluate` in DIR/<variant>/seed<s>: the checkpoint is
selected on the validation split and everything here is read back from the
held-out test split, from each run's own files (the test set's final record
in metrics.jsonl, the selected model's test probabilities in
predictions_test.npz). Per variant: mean and SD over seeds of the test mean
AUROC, of the global and focal findings' AUROC (plain means of their labels'
AUROCs, groups from `data.synthetic.LABEL_GROUPS`) and of every label; per
seed, the variant's test AUROC minus full's on the same images (same seed),
with a patient-level paired bootstrap interval (`metrics.
paired_auroc_difference`, config.eval.bootstrap resamples, seeded with the
run seed), over all mean labels and over the focal ones. Written to
DIR/results.md and DIR/results.json.

Dose-response (--dose on data.synthetic.focal_scale, --dose_contrast on
focal_contrast, the other knob at 1): full and global_only at every level,
and per seed the focal findings' paired AUROC gain of full over global_only.
As findings grow visible at the experts' global view the gain should
shrink. Level (1, 1) is the default data, so its runs are the grid's own
DIR/full and DIR/global_only runs; other levels train in DIR/dose-fs<x> or
DIR/dose-fc<y> on data generated at that dose, whose folder the runs name in
data.root. Written to DIR/dose.md and DIR/dose.json.

Runs are cached: a sub-workdir keeps the config it was asked to run
(ablation_request.json); when it holds a finished run (ablation_run.json) it
is reused, otherwise it trains, resuming from its checkpoints. Asking the
same sub-workdir to run another config is an error (use another --workdir).
SIGTERM stops after the current run's checkpoint; the same command resumes.

Cost, measured on 2 CPU cores shared with other work (default data and
experts): a full-model run takes about 35 s of set-up and compilation,
0.7 s per training step, 36 s per validation pass and 20 s for the test
split (the sliding windows dominate every evaluation); a global-view run
about a third of that. Evaluations, not steps, set the grid's time, so the
ablation trains 100 steps and validates once, at the end:
--config.train.steps=100 --config.train.warmup_steps=10
--config.train.eval_every=0 (about 65-75 minutes for 11 variants x 3
seeds at that load; idle cores should roughly halve it).

Default workdir: ./workdir/ablate_<config name>[_<variant>].
"""

import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from medbridge_jax import cli
from medbridge_jax import errors
from medbridge_jax.ablation import dose
from medbridge_jax.ablation import grid

PROGRAM = "medbridge_jax.ablate"


def _define_flags():
  """The flags, defined only when run as a program (so that importing this
  module next to `medbridge_jax.main` defines no flag twice)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Task config file, optionally with a variant: "
      "configs/in_domain.py[:runlocal]; --config.<key>=... overrides apply "
      "to every ablation run.", lock_config=True)
  flags.DEFINE_string(
      "workdir", None, "Directory of the experiment: one sub-workdir per "
      "run, results.md/json (grid), dose.md/json (dose-response) (default: "
      "./workdir/ablate_<config>).")
  flags.DEFINE_list(
      "variants", [], "Grid variants to run, comma-separated (default: all "
      "of them; see the module docstring).")
  flags.DEFINE_integer("seeds", 3, "Training seeds per variant (config.seed "
                       "and the next ones).")
  flags.DEFINE_list(
      "dose", [], "Dose-response instead of the grid: focal_scale levels, "
      "e.g. 0.5,1,2,4 (full and global_only at each).")
  flags.DEFINE_list(
      "dose_contrast", [], "Dose-response: focal_contrast levels, e.g. "
      "0.5,2 (with --dose or alone).")
  flags.mark_flag_as_required("config")
  return config


def _parse_flags(argv):
  """absl's parsing, each failure as one line naming the flag; exit 2."""
  return cli.parse_flags(PROGRAM, argv)


def _floats(values: Sequence[str], flag: str) -> list[float]:
  try:
    return [float(v) for v in values]
  except ValueError:
    raise errors.UserError(f"--{flag}={','.join(values)}: not numbers"
                           ) from None


def main(argv, config_flag) -> None:
  config = cli.load_config(PROGRAM, argv, config_flag)
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdir", "ablate_" + cli.config_name(cli.config_spec()))
  cli.quiet_libraries()
  with errors.exit_on_user_error(PROGRAM):
    from medbridge_jax import sharding  # pylint: disable=g-import-not-at-top
    fl = flags.FLAGS
    is_dose = fl.dose or fl.dose_contrast
    if is_dose and fl.variants:
      raise errors.UserError("--variants is for the grid; --dose runs full "
                             "and global_only")
    scales = _floats(fl.dose, "dose")
    contrasts = _floats(fl.dose_contrast, "dose_contrast")
    sharding.maybe_initialize_distributed()
    cli.enable_compilation_cache()  # Later runs skip compilation.
    if is_dose:
      result = dose.run_dose(config, workdir, scales, contrasts, fl.seeds)
      name = "dose.md"
    else:
      result = grid.run(config, workdir, fl.variants, fl.seeds)
      name = "results.md"
    print(result["markdown"])
    logging.info("Table: %s", os.path.join(os.path.abspath(workdir), name))
    if result["stopped"]:
      sys.exit(1)


if __name__ == "__main__":
  _config_flag = _define_flags()
  app.run(lambda argv: main(argv, _config_flag), flags_parser=_parse_flags)
