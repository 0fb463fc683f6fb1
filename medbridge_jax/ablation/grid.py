"""The grid: each variant trained with every seed, read back on the test
split, compared with the reference variant on the same images."""

import csv
import os
from typing import Sequence

import ml_collections
import numpy as np

from medbridge_jax.ablation import numbers
from medbridge_jax.ablation import runs
from medbridge_jax.ablation import tables
from medbridge_jax.ablation import variants
from medbridge_jax import errors
from medbridge_jax import train


def run(config: ml_collections.ConfigDict, workdir: str,
        names: Sequence[str] = (), num_seeds: int = 3,
        reference: str = variants.REFERENCE) -> dict:
  """Runs the grid (all variants if `names` is empty) and writes the tables.

  Args:
    config: the task config.
    workdir: the grid's folder.
    names: variants to run, in table order.
    num_seeds: seeds per variant.
    reference: the variant every other is compared with on the same
      images; without its runs there are no differences.

  Returns:
    The results.json contents: {"rows": [...], "markdown": str, ...}.
  """
  grid = variants.for_config(config)
  names = check_names(grid, names)
  run_seeds = runs.seeds(config, num_seeds)
  workdir = train.prepare_workdir(workdir)
  jobs = [((n, s), variants.variant_config(config, grid[n], s),
           runs.run_folder(workdir, n, s)) for n in names for s in run_seeds]
  done, stopped = runs.train_all(jobs)
  result = table(config, workdir, grid, names, run_seeds, done, reference)
  result["stopped"] = stopped
  result["markdown"] = tables.markdown(result)
  if result["rows"]:
    tables.write_result(workdir, "results", result)
  return result


def check_names(grid: dict, names: Sequence[str]) -> list[str]:
  """The --variants names (all of the grid's if none), checked."""
  names = list(names) or list(grid)
  unknown = [n for n in names if n not in grid]
  if unknown:
    raise errors.UserError(
        f"unknown ablation variant {unknown[0]!r} (--variants); known: "
        f"{', '.join(grid)}")
  if len(set(names)) != len(names):
    raise errors.UserError(f"--variants names a variant twice: "
                           f"{','.join(names)}")
  return names


def table(config: ml_collections.ConfigDict, workdir: str, grid: dict,
          names: Sequence[str], run_seeds: Sequence[int], done: dict,
          reference: str = variants.REFERENCE) -> dict:
  """The grid's numbers from the finished runs' files.

  A variant is a row once all its seeds have finished. Its "vs_reference"
  holds per seed the paired difference from `reference`'s run of that seed
  over config.eval.mean_labels ("mean") and over the focal labels
  ("focal").
  """
  results = _finished(names, run_seeds, done)
  rows = []
  for name, results_of in results.items():
    row = _row(grid[name], results_of, run_seeds, workdir)
    if name != reference and reference in results:
      row["vs_reference"] = _vs_reference(config, results_of,
                                          results[reference], run_seeds)
    rows.append(row)
  out = dict(config=config.to_dict(), reference=reference,
             seeds=list(run_seeds), rows=rows, zero_shot=[], groups={},
             test_set=None, selected_on=None)
  if rows:
    first = (results.get(reference) or next(iter(results.values())))[0]
    out.update(test_set=first.record["set"],
               selected_on=first.record.get("selected_on"),
               groups=numbers.label_groups(first.label_names),
               zero_shot=zero_shot_rows(first.run_dir, first.record["set"],
                                        first.label_names))
  return out


def _finished(names: Sequence[str], run_seeds: Sequence[int],
              done: dict) -> dict[str, list[runs.RunResult]]:
  """name -> its runs read back, seed by seed, for the variants whose
  seeds have all finished."""
  results = {}
  for name in names:
    if not all((name, s) in done for s in run_seeds):
      continue
    results[name] = [runs.read_run(done[name, s]["run_dir"],
                                   done[name, s]["test_set"])
                     for s in run_seeds]
    for r, s in zip(results[name], run_seeds):
      r.wall_s = done[name, s].get("wall_s")
  return results


def _row(variant: variants.Variant, results_of: Sequence[runs.RunResult],
         run_seeds: Sequence[int], workdir: str) -> dict:
  """A variant's row: its numbers per seed and over the seeds."""
  per_seed = [numbers.seed_numbers(r) for r in results_of]
  return dict(variant=variant.name, description=variant.description,
              seeds=list(run_seeds), per_seed=per_seed,
              **numbers.over_seeds(per_seed),
              wall_s=[r.wall_s for r in results_of],
              run_dirs=[os.path.relpath(r.run_dir, workdir)
                        for r in results_of])


def _vs_reference(config: ml_collections.ConfigDict,
                  results_of: Sequence[runs.RunResult],
                  references: Sequence[runs.RunResult],
                  run_seeds: Sequence[int]) -> list[dict]:
  """Per seed the paired difference from the reference's run of that seed,
  over config.eval.mean_labels and over the focal labels."""
  bootstrap = int(config.eval.bootstrap)
  focal = numbers.label_groups(results_of[0].label_names)["focal"]
  return [
      dict(seed=s,
           mean=numbers.paired(r, ref, tuple(config.eval.mean_labels),
                               bootstrap, s),
           focal=(numbers.paired(r, ref, focal, bootstrap, s) if focal
                  else None))
      for s, r, ref in zip(run_seeds, results_of, references)]


def zero_shot_rows(run_dir: str, set_name: str,
                   label_names: Sequence[str]) -> list[dict]:
  """The frozen experts' zero-shot AUROC on `set_name`, from a finished
  run's report/metrics.csv (the same for every seed: no training)."""
  path = os.path.join(run_dir, "report", "metrics.csv")
  if not os.path.isfile(path):
    return []
  rows = []
  for method, values in _zero_shot_aurocs(path, set_name).items():
    mean = values.pop("MEAN", None)
    auroc = {n: values.get(n) for n in label_names}
    rows.append(dict(variant=method, description="frozen expert, label "
                     "prompts, no training", mean_auroc=mean,
                     **numbers.group_means(auroc, label_names),
                     auroc=auroc))
  return rows


def _zero_shot_aurocs(path: str, set_name: str) -> dict[str, dict]:
  """method -> {label (or "MEAN"): AUROC or None} of the zero-shot rows of
  `set_name` in the metrics.csv at `path`."""
  per = {}
  with open(path, newline="") as f:
    for r in csv.DictReader(f):
      if r["set"] != set_name or not r["method"].startswith("zero-shot "):
        continue
      v = float(r["auroc"])
      per.setdefault(r["method"], {})[r["label"]] = (
          v if np.isfinite(v) else None)
  return per
