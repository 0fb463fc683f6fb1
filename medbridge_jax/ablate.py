r"""The ablation grid: one MedBridge training run per variant, one table.

  python -m medbridge_jax.ablate --config=configs/in_domain.py \
      [--workdir=DIR] [--variants=full,global_only,...] \
      [--config.train.steps=100 ...]

Each variant is the task config with a few switches changed (`variants`),
trained and evaluated by `train.train_and_evaluate` in its own sub-workdir
DIR/<variant>; --config.* overrides apply to every variant. A variant whose
sub-workdir already holds a finished run of the same config is skipped, an
unfinished one resumes from its checkpoints. The table (DIR/ablation.md,
DIR/ablation.json, and printed) gives per variant the mean AUROC over all
labels, over the global findings and over the small focal findings (groups
from `data.synthetic.LABEL_GROUPS`), each group mean being the plain mean of
the run's per-label AUROCs in the group, plus the frozen experts' zero-shot
rows from the runs' reports.

Default workdir: ./workdir/ablate_<config name>[_<variant>].
"""

import copy
import csv
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

# TensorFlow (imported by clu's writers) would print C++ INFO lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from medbridge_jax import cli
from medbridge_jax import errors

PROGRAM = "medbridge_jax.ablate"
RESULT_FILE = "ablation_run.json"  # In each variant's sub-workdir.
GROUPS = ("global", "focal")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the grid: a name, what it changes, the config overrides."""
  name: str
  description: str
  overrides: tuple  # ((dotted config key, value), ...)


def variants(config: ml_collections.ConfigDict) -> dict[str, Variant]:
  """The grid for `config`, in table order: name -> Variant.

  `single_k` keeps only expert k. Random experts are generated per position
  (their seed is the index), so the single-expert run is pointed at the very
  folder the full model loads as expert k: the same frozen weights.
  """
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  out = [
      Variant("full", "MedBridge: focal views + queries + MoE", ()),
      Variant("global_only", "focal sampling off (global view only)",
              (("model.focal.enabled", False),)),
      Variant("no_queries", "queries off (linear probe on pooled features)",
              (("model.queries.enabled", False),)),
      Variant("no_moe", "MoE off (plain average of the experts)",
              (("model.moe.enabled", False),)),
  ]
  if config.experts:
    names = [os.path.basename(os.path.normpath(p)) for p in
             experts_setup.as_list(config.experts, "config.experts")]
  else:
    names = [s.split(":", 1)[0] + " (random)"
             for s in experts_setup.as_list(config.random_experts,
                                            "config.random_experts")]
  if len(names) > 1:
    for k, name in enumerate(names):
      out.append(Variant(f"single_{k}", f"expert {k} alone: {name}",
                         (("single_expert", k),)))
  return {v.name: v for v in out}


def variant_config(config: ml_collections.ConfigDict,
                   variant: Variant) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's overrides applied."""
  c = copy.deepcopy(config)
  for key, value in variant.overrides:
    if key == "single_expert":
      _keep_one_expert(c, value)
      continue
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _keep_one_expert(c: ml_collections.ConfigDict, k: int) -> None:
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  if c.experts:
    c.experts = (experts_setup.as_list(c.experts, "config.experts")[k],)
  else:
    spec = experts_setup.as_list(c.random_experts, "config.random_experts")[k]
    c.experts = (experts_setup.random_expert_folder(spec, k),)


def label_groups(label_names: Sequence[str]) -> dict[str, list[str]]:
  """"global"/"focal" -> the run's labels in that group (synthetic names)."""
  from medbridge_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return {g: [n for n in label_names if synthetic.LABEL_GROUPS.get(n) == g]
          for g in GROUPS}


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
  v = [float(x) for x in values if x is not None and np.isfinite(x)]
  return float(np.mean(v)) if v else None


def row(name: str, description: str, auroc: dict, mean_auroc: Optional[float],
        **extra) -> dict:
  """One table row from per-label AUROCs (label -> value or None)."""
  groups = label_groups(list(auroc))
  out = dict(variant=name, description=description,
             mean_auroc=mean_auroc,
             **{f"{g}_auroc": _mean([auroc[n] for n in groups[g]])
                for g in GROUPS},
             auroc=dict(auroc))
  out.update(extra)
  return out


# ---------------------------------------------------------------------------
# Running the grid.


def _same_config(a: dict, b: dict) -> bool:
  return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def run_variant(config: ml_collections.ConfigDict, variant: Variant,
                workdir: str) -> dict:
  """Trains and evaluates one variant (or reuses its finished run).

  Returns:
    The variant's result file contents: config, final eval record, wall
    time, whether it was reused.
  """
  from medbridge_jax import train  # pylint: disable=g-import-not-at-top
  c = variant_config(config, variant)
  sub = os.path.join(workdir, variant.name)
  path = os.path.join(sub, RESULT_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      done = json.load(f)
    if _same_config(done.get("config"), c.to_dict()):
      logging.info("Ablation %s: finished before in %s; reused.",
                   variant.name, sub)
      return dict(done, reused=True)
  logging.info("Ablation %s (%s): training in %s.", variant.name,
               variant.description, sub)
  start = time.monotonic()
  record = train.train_and_evaluate(c, sub)
  wall = time.monotonic() - start
  if record.get("stopped"):
    return dict(variant=variant.name, stopped=record["stopped"])
  done = dict(variant=variant.name, config=c.to_dict(), record=record,
              wall_s=round(wall, 1))
  with open(path + ".tmp", "w") as f:
    json.dump(done, f, indent=1)  # Key order: the labels' order.
  os.replace(path + ".tmp", path)
  return dict(done, reused=False)


def zero_shot_rows(run_dir: str, set_name: str,
                   label_names: Sequence[str]) -> list[dict]:
  """The zero-shot rows of a finished run, from its report/metrics.csv."""
  path = os.path.join(run_dir, "report", "metrics.csv")
  if not os.path.isfile(path):
    return []
  per = {}
  with open(path, newline="") as f:
    for r in csv.DictReader(f):
      if r["set"] != set_name or not r["method"].startswith("zero-shot "):
        continue
      v = float(r["auroc"])
      per.setdefault(r["method"], {})[r["label"]] = (
          v if np.isfinite(v) else None)
  rows = []
  for method, values in per.items():
    mean = values.pop("MEAN", None)
    auroc = {n: values.get(n) for n in label_names}
    rows.append(row(method, "frozen expert, label prompts, no training",
                    auroc, mean))
  return rows


def run(config: ml_collections.ConfigDict, workdir: str,
        names: Sequence[str] = ()) -> dict:
  """Runs the grid (all variants if `names` is empty) and writes the table.

  Returns:
    The ablation.json contents: {"rows": [...], "markdown": str, ...}.
  """
  from medbridge_jax import train  # pylint: disable=g-import-not-at-top
  workdir = train.prepare_workdir(workdir)
  grid = variants(config)
  names = list(names) or list(grid)
  unknown = [n for n in names if n not in grid]
  if unknown:
    raise errors.UserError(
        f"unknown ablation variant {unknown[0]!r} (--variants); known: "
        f"{', '.join(grid)}")
  if len(set(names)) != len(names):
    raise errors.UserError(f"--variants names a variant twice: "
                           f"{','.join(names)}")
  rows, finished, stopped = [], [], None
  for name in names:
    done = run_variant(config, grid[name], workdir)
    if done.get("stopped"):
      stopped = name
      break
    rec = done["record"]
    rows.append(row(name, grid[name].description, rec["auroc"],
                    rec["mean_auroc"], mean_auroc_ci=rec["mean_auroc_ci"],
                    set=rec["set"], step=rec["step"], wall_s=done["wall_s"]))
    finished.append(name)
  # Zero-shot: the same frozen experts in every run with all of them; take
  # the first such run's report.
  zs = []
  for name in finished:
    if not any(k == "single_expert" for k, _ in grid[name].overrides):
      zs = zero_shot_rows(os.path.join(workdir, name), rows[0]["set"],
                          list(rows[0]["auroc"]))
      break
  result = dict(config=config.to_dict(), rows=rows, zero_shot=zs,
                groups=label_groups(list(rows[0]["auroc"])) if rows else {},
                stopped=stopped)
  result["markdown"] = markdown(result)
  if rows:
    with open(os.path.join(workdir, "ablation.json"), "w") as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
      f.write(result["markdown"])
  return result


# ---------------------------------------------------------------------------
# The table.


def _num(x) -> str:
  return f"{x:.3f}" if x is not None and np.isfinite(x) else "n/a"


def markdown(result: dict) -> str:
  """The ablation table as markdown: group means, then per-label AUROC."""
  rows, zs = result["rows"], result["zero_shot"]
  if not rows:
    return "No finished ablation runs.\n"
  groups = result["groups"]
  c = result["config"]
  base = {r["variant"]: r for r in rows}.get("global_only")
  out = [
      "# MedBridge ablation", "",
      f"Evaluated on {rows[0]['set']} after {c['train']['steps']} steps of "
      f"batch {c['train']['batch_size']}, seed {c['seed']}. Global findings: "
      f"{', '.join(groups['global']) or 'none'}; focal findings: "
      f"{', '.join(groups['focal']) or 'none'}. Each group's AUROC is the "
      f"mean of its labels' AUROCs.", ""]
  head = ["Variant", "What changes", "Mean AUROC", "Global findings",
          "Focal findings"]
  if base is not None:
    head.append("Focal vs global_only")
  head.append("Train+eval (s)")
  out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows + zs:
    cells = [r["variant"], r["description"], _num(r["mean_auroc"]),
             _num(r["global_auroc"]), _num(r["focal_auroc"])]
    if base is not None:
      f, b = r["focal_auroc"], base["focal_auroc"]
      cells.append(f"{f - b:+.3f}" if f is not None and b is not None
                   else "n/a")
    cells.append(f"{r['wall_s']:.0f}" if r.get("wall_s") else "")
    out.append("| " + " | ".join(cells) + " |")
  labels = list(rows[0]["auroc"])
  out += ["", "Per-label AUROC:", "",
          "| Variant | " + " | ".join(labels) + " |",
          "|" + "---|" * (len(labels) + 1)]
  for r in rows + zs:
    out.append(f"| {r['variant']} | "
               + " | ".join(_num(r["auroc"].get(n)) for n in labels) + " |")
  if result.get("stopped"):
    out += ["", f"Stopped (SIGTERM) during {result['stopped']}; rerun the "
            "same command to resume."]
  return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Command line.


def _define_flags():
  """The flags, defined only when run as a program (so that importing this
  module next to `medbridge_jax.main` defines no flag twice)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Task config file, optionally with a variant: "
      "configs/in_domain.py[:runlocal]; --config.<key>=... overrides apply "
      "to every ablation variant.", lock_config=True)
  flags.DEFINE_string(
      "workdir", None, "Directory of the grid: one sub-workdir per variant, "
      "ablation.md and ablation.json (default: ./workdir/ablate_<config>).")
  flags.DEFINE_list(
      "variants", [], "Variants to run, comma-separated (default: all of "
      "full, global_only, no_queries, no_moe, single_<k>).")
  flags.mark_flag_as_required("config")
  return config


def _parse_flags(argv):
  """absl's parsing, each failure as one line naming the flag; exit 2."""
  return cli.parse_flags(PROGRAM, argv)


def main(argv, config_flag) -> None:
  config = cli.load_config(PROGRAM, argv, config_flag)
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdir", "ablate_" + cli.config_name(cli.config_spec()))
  cli.quiet_libraries()
  with errors.exit_on_user_error(PROGRAM):
    from medbridge_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.maybe_initialize_distributed()
    cli.enable_compilation_cache()  # Later variants skip compilation.
    result = run(config, workdir, flags.FLAGS.variants)
    print(result["markdown"])
    logging.info("Ablation table: %s", os.path.join(
        os.path.abspath(workdir), "ablation.md"))
    if result["stopped"]:
      sys.exit(1)


if __name__ == "__main__":
  _config_flag = _define_flags()
  app.run(lambda argv: main(argv, _config_flag), flags_parser=_parse_flags)
