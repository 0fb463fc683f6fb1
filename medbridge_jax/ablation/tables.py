"""The results as files: JSON (everything) and markdown tables."""

import os
from typing import Optional, Sequence

import numpy as np

from medbridge_jax import jsonfile


def write_result(workdir: str, stem: str, result: dict) -> None:
  """workdir/<stem>.json (everything) and <stem>.md (its markdown)."""
  jsonfile.write(os.path.join(workdir, f"{stem}.json"), result, indent=1)
  with open(os.path.join(workdir, f"{stem}.md"), "w") as f:
    f.write(result["markdown"])


# ---------------------------------------------------------------------------
# Cells and lines.


def num(x, sign: bool = False) -> str:
  if x is None or not np.isfinite(x):
    return "n/a"
  return f"{x:+.3f}" if sign else f"{x:.3f}"


def pm(s: dict, sign: bool = False) -> str:
  """"mean ± sd" of a `spread` dict."""
  if s.get("mean") is None:
    return "n/a"
  if s.get("sd") is None:
    return num(s["mean"], sign)
  return f"{num(s['mean'], sign)} ± {s['sd']:.3f}"


def diff(d: Optional[dict], label: Optional[str] = None) -> str:
  """"+0.012 [-0.004, +0.030]" of a paired difference (mean or a label)."""
  if d is None:
    return "n/a"
  if label is None:
    value, (lo, hi) = d["mean_difference"], d["mean_interval"]
  else:
    value, (lo, hi) = (d["labels"][label]["difference"],
                       d["labels"][label]["interval"])
  if lo is None or hi is None:
    return num(value, True)
  return f"{num(value, True)} [{num(lo, True)}, {num(hi, True)}]"


def _seconds(values) -> str:
  v = [x for x in values if x]
  return f"{np.mean(v):.0f}" if v else ""


def row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def head(cells: Sequence[str]) -> list[str]:
  """A table's header line and its rule."""
  return [row(cells), "|" + "---|" * len(cells)]


def facts(c: dict, run_seeds: Sequence[int], test_set: str,
           selected_on: Optional[str]) -> str:
  return (f"Each run: {c['train']['steps']} steps of batch "
          f"{c['train']['batch_size']}, checkpoint selected on "
          f"{selected_on or 'validation'}; reported on the held-out test "
          f"split {test_set}. Seed{'s' if len(run_seeds) > 1 else ''} "
          f"{', '.join(map(str, run_seeds))} "
          f"(config.seed: initialisation, data order, crops; the frozen "
          f"experts and the data are the same for every seed).")


def stopped(result: dict) -> list[str]:
  if not result.get("stopped"):
    return []
  return ["", f"Stopped (SIGTERM) in {result['stopped']}; rerun the same "
          "command to resume."]


# ---------------------------------------------------------------------------
# The grid.


def markdown(result: dict) -> str:
  """The grid as markdown: means over seeds, paired differences per seed,
  per-label AUROC, zero-shot rows."""
  if not result["rows"]:
    return "No finished ablation runs.\n"
  out = (_grid_intro(result) + _grid_means(result)
         + _grid_differences(result) + _grid_labels(result)
         + stopped(result))
  return "\n".join(out) + "\n"


def _grid_intro(result: dict) -> list[str]:
  groups, run_seeds = result["groups"], result["seeds"]
  return [
      "# MedBridge ablation", "",
      facts(result["config"], run_seeds, result["test_set"],
             result["selected_on"]),
      f"Global findings: {', '.join(groups['global']) or 'none'}; focal "
      f"findings: {', '.join(groups['focal']) or 'none'}; a group's AUROC "
      f"is the mean of its labels' AUROCs."
      + (f" Values: mean ± SD over the {len(run_seeds)} seeds."
         if len(run_seeds) > 1 else ""), ""]


def _grid_means(result: dict) -> list[str]:
  out = head(["Variant", "What changes", "Mean AUROC", "Global findings",
               "Focal findings", "Train+eval (s)"])
  for r in result["rows"]:
    out.append(row([r["variant"], r["description"], pm(r["mean_auroc"]),
                     pm(r["global_auroc"]), pm(r["focal_auroc"]),
                     _seconds(r["wall_s"])]))
  for r in result["zero_shot"]:
    out.append(row([r["variant"], r["description"], num(r["mean_auroc"]),
                     num(r["global_auroc"]), num(r["focal_auroc"]), ""]))
  return out


def _grid_differences(result: dict) -> list[str]:
  compared = [r for r in result["rows"] if "vs_reference" in r]
  if not compared:
    return []
  c = result["config"]
  out = ["", f"Test AUROC minus {result['reference']}'s on the same images, "
         f"per seed, with a 95% patient-level paired bootstrap interval "
         f"({c['eval']['bootstrap']} resamples); mean over "
         f"{', '.join(c['eval']['mean_labels']) or 'all labels'}, and "
         f"over the focal findings:", ""]
  out += head(["Variant", "Δ"] + [f"seed {s}" for s in result["seeds"]])
  for r in compared:
    for what in ("mean", "focal"):
      out.append(row([r["variant"], what] + [
          diff(v[what]) for v in r["vs_reference"]]))
  return out


def _grid_labels(result: dict) -> list[str]:
  rows = result["rows"]
  labels = list(rows[0]["auroc"])
  out = ["", "Per-label test AUROC (mean ± SD over seeds):", ""]
  out += head(["Variant"] + labels)
  for r in rows:
    out.append(row([r["variant"]] + [pm(r["auroc"][n]) for n in labels]))
  for r in result["zero_shot"]:
    out.append(row([r["variant"]]
                    + [num(r["auroc"].get(n)) for n in labels]))
  return out


# ---------------------------------------------------------------------------
# The dose-response.


def dose_markdown(result: dict) -> str:
  """The dose-response table as markdown."""
  if not result["levels"]:
    return "No finished dose-response runs.\n"
  out = (_dose_intro(result) + _dose_means(result) + _dose_per_seed(result)
         + stopped(result))
  return "\n".join(out) + "\n"


def _dose_intro(result: dict) -> list[str]:
  c = result["config"]
  focal = result["levels"][0]["focal_labels"]
  return [
      "# Focal gain against the findings' size and contrast", "",
      # Every level's runs report on the config's test split (resolve names
      # it dataset/split).
      facts(c, result["seeds"],
            f"{c['data']['dataset']}/{c['data']['test_split']}", None),
      "Each level draws the focal findings (" + ", ".join(focal) + ") with "
      "data.synthetic.focal_scale times their size (nodule radius, pleural "
      "line width) and focal_contrast times their contrast. Gain: full's "
      "test AUROC minus global_only's on the same images, mean ± SD over "
      "seeds; per seed with a 95% patient-level paired bootstrap interval "
      f"({c['eval']['bootstrap']} resamples).", ""]


def _level(lv: dict) -> list[str]:
  return [f"{lv['focal_scale']:g}", f"{lv['focal_contrast']:g}"]


def _dose_means(result: dict) -> list[str]:
  levels = result["levels"]
  focal = levels[0]["focal_labels"]
  out = head(["focal_scale", "focal_contrast", "Focal gain"]
              + [f"{n} gain" for n in focal]
              + ["full focal AUROC", "global_only focal AUROC"])
  for lv in levels:
    out.append(row(_level(lv) + [pm(lv["gain"], True)]
                    + [pm(lv["label_gain"][n], True) for n in focal]
                    + [pm(lv["full_focal"]), pm(lv["global_only_focal"])]))
  return out


def _dose_per_seed(result: dict) -> list[str]:
  levels = result["levels"]
  focal = levels[0]["focal_labels"]
  out = ["", "Per seed:", ""]
  out += head(["focal_scale", "focal_contrast", "seed", "Focal gain"]
               + [f"{n} gain" for n in focal])
  for lv in levels:
    for p in lv["per_seed"]:
      out.append(row(_level(lv) + [str(p["seed"]), diff(p["gain"])]
                      + [diff(p["gain"], n) for n in focal]))
  return out
