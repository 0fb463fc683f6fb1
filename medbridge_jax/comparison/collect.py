"""The finished runs read back: each test set's numbers, each run's costs.

Every method's run of a seed is compared with the reference's run of the
same seed on the same images (`ablation.numbers.paired`: a patient-level
paired bootstrap seeded with the run seed).
"""

import dataclasses
import os
from typing import Optional, Sequence

import ml_collections

from medbridge_jax.ablation import grid
from medbridge_jax.ablation import numbers
from medbridge_jax.ablation import runs
from medbridge_jax import report
from medbridge_jax import run_info

COSTS = ("trainable_params", "frozen_params", "train_images_per_s",
         "peak_memory_bytes", "peak_memory_kind")


@dataclasses.dataclass
class MethodRun:
  """One method's finished run of one seed, read from its sub-workdir."""
  name: str
  seed: int
  run_dir: str
  sets: dict  # Test set name -> `runs.RunResult`, the main test split first.
  info: dict  # run_info.json, {} when the run wrote none.
  wall_s: Optional[float] = None
  reused: bool = False


def finished(names: Sequence[str], run_seeds: Sequence[int],
             done: dict) -> dict[str, list[MethodRun]]:
  """name -> its runs, seed by seed, for the methods whose seeds have all
  finished (`done` as `runs.train_all` returns it)."""
  out = {}
  for name in names:
    if not all((name, s) in done for s in run_seeds):
      continue
    out[name] = []
    for s in run_seeds:
      d = done[name, s]
      has_info = os.path.isfile(os.path.join(d["run_dir"], run_info.FILE))
      out[name].append(MethodRun(
          name, s, d["run_dir"], read_sets(d["run_dir"], d["test_set"]),
          run_info.read(d["run_dir"]) if has_info else {},
          d.get("wall_s"), bool(d.get("reused"))))
  return out


def read_sets(run_dir: str, test_set: str) -> dict[str, runs.RunResult]:
  """The run's main test split and every extra test set of its final
  records (metrics.jsonl), each with its predictions file."""
  out = {test_set: runs.read_run(run_dir, test_set)}
  for r in report.read_jsonl(run_dir):
    if r.get("final") and r.get("set") not in out:
      out[r["set"]] = runs.read_run(
          run_dir, r["set"], f"predictions_{report.slug(r['set'])}.npz")
  return out


def set_numbers(config: ml_collections.ConfigDict, set_name: str,
                results: dict[str, list[MethodRun]],
                reference: str, workdir: str) -> dict:
  """One test set's numbers: a row per method and seed (mean AUROC, its
  interval, the paired difference from the reference's run of that seed,
  per-label AUROC), the spread over seeds per method, the zero-shot rows."""
  refs = {m.seed: m.sets.get(set_name) for m in results.get(reference, [])}
  rows, spreads = [], []
  for name, method_runs in results.items():
    mine = [m for m in method_runs if set_name in m.sets]
    if not mine:
      continue
    method_rows = [_row(config, m, set_name, refs.get(m.seed), workdir,
                        name != reference) for m in mine]
    rows += method_rows
    per_seed = [numbers.seed_numbers(m.sets[set_name]) for m in mine]
    spreads.append(dict(
        method=name, **numbers.over_seeds(per_seed),
        difference=numbers.spread(
            [r["vs_reference"]["mean_difference"] for r in method_rows
             if r["vs_reference"]])))
  first = (results.get(reference) or next(iter(results.values())))[0]
  r = first.sets[set_name]
  return dict(set=set_name, label_names=list(r.label_names),
              selected_on=r.record.get("selected_on"), rows=rows,
              over_seeds=spreads,
              zero_shot=grid.zero_shot_rows(r.run_dir, set_name,
                                            r.label_names))


def _row(config: ml_collections.ConfigDict, m: MethodRun, set_name: str,
         ref: Optional[runs.RunResult], workdir: str, compare: bool) -> dict:
  r = m.sets[set_name]
  return dict(
      method=m.name, seed=m.seed, mean_auroc=r.record["mean_auroc"],
      mean_auroc_ci=r.record.get("mean_auroc_ci"),
      ci_unit=r.record.get("ci_unit"),
      auroc={n: r.record["auroc"][n] for n in r.label_names},
      vs_reference=(numbers.paired(r, ref, tuple(config.eval.mean_labels),
                                   int(config.eval.bootstrap), m.seed)
                    if compare and ref is not None else None),
      run_dir=os.path.relpath(m.run_dir, workdir))


def costs(results: dict[str, list[MethodRun]]) -> list[dict]:
  """Per method and seed: run_info.json's numbers (None where missing),
  the wall time of this command's training and whether it was reused."""
  return [dict(method=m.name, seed=m.seed,
               **{k: m.info.get(k) for k in COSTS},
               wall_s=m.wall_s, reused=m.reused)
          for method_runs in results.values() for m in method_runs]
