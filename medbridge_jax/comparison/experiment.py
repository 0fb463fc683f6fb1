"""The comparison: every method trained with every seed, read back on the
test sets, compared with MedBridge on the same images, written out."""

from typing import Sequence

import ml_collections

from medbridge_jax.ablation import runs
from medbridge_jax.ablation import tables as ablation_tables
from medbridge_jax.comparison import collect
from medbridge_jax.comparison import isolated
from medbridge_jax.comparison import plan
from medbridge_jax.comparison import tables
from medbridge_jax import machine
from medbridge_jax import train

STEM = "compare"  # workdir/compare.md and compare.json.


def run(config: ml_collections.ConfigDict, workdir: str,
        names: Sequence[str] = (), num_seeds: int = 3,
        config_spec: str = "", isolate: bool = True) -> dict:
  """Trains what is missing and writes the comparison.

  Args:
    config: the task config (its config.method.* settings apply to every
      method they concern; config.method.name is set per method).
    workdir: the comparison's folder: <method>/seed<s> per run.
    names: methods to run (all of `methods.NAMES` if empty); the reference
      (MedBridge) always runs, first.
    num_seeds: seeds per method: config.seed, config.seed + 1, ...
    config_spec: the --config given, for the header.
    isolate: train each run in a fresh process (`isolated`), so that its
      peak memory is its own; False: all in this process.

  Returns:
    The compare.json contents: {"sets": [...], "costs": [...], "markdown":
    str, "stopped": the sub-workdir a SIGTERM stopped or None, ...}.
  """
  names = plan.check_names(names)
  run_seeds = runs.seeds(config, num_seeds)
  workdir = train.prepare_workdir(workdir)
  jobs = plan.jobs(config, workdir, names, run_seeds)
  done, stopped = (isolated.train_all(jobs) if isolate
                   else runs.train_all(jobs))
  result = table(config, workdir, names, run_seeds, done, config_spec)
  result["stopped"] = stopped
  result["markdown"] = tables.markdown(result)
  if result["sets"]:
    ablation_tables.write_result(workdir, STEM, result)
  return result


def table(config: ml_collections.ConfigDict, workdir: str,
          names: Sequence[str], run_seeds: Sequence[int], done: dict,
          config_spec: str = "") -> dict:
  """The comparison's numbers from the finished runs' files: one entry of
  "sets" per test set (the main split first, then the extra ones the
  first finished method reported), the methods' costs, the header facts."""
  results = collect.finished(names, run_seeds, done)
  sets = []
  if results:
    first = (results.get(plan.REFERENCE) or next(iter(results.values())))[0]
    sets = [collect.set_numbers(config, s, results, plan.REFERENCE, workdir)
            for s in first.sets]
  return dict(config=config.to_dict(),
              config_spec=config_spec or f"{config.data.dataset} task",
              machine=machine.describe(), date=machine.today(),
              reference=plan.REFERENCE, seeds=list(run_seeds),
              methods=plan.descriptions(config, names), sets=sets,
              costs=collect.costs(results))
