"""Human- and machine-readable results of a run.

Written into the workdir:
  metrics.jsonl        one JSON object per evaluation (appended as they run).
  report/report.md     per-label AUROC with 95% CI, AUPRC, ECE, mean AUROC,
                       the zero-shot baseline beside MedBridge.
  report/metrics.csv   the same numbers, one row per (set, method, label).
  report/roc_*.png     ROC curves, one figure per evaluated set.
  report.md            the same report at the top of the workdir (its image
                       links point into report/).
  thresholds.json      per-label decision thresholds chosen on the evaluation
                       split (Youden's J), for prediction.
  config.json          the run's full config.
"""

import csv
import dataclasses
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

from medbridge_jax import metrics


@dataclasses.dataclass
class Result:
  """One method evaluated on one set: its metrics and what they came from."""
  summary: metrics.Summary
  probs: np.ndarray  # (N, L)
  targets: np.ndarray  # (N, L)
  mask: np.ndarray  # (N, L)


def append_jsonl(workdir: str, record: Mapping) -> None:
  """Appends one evaluation record to workdir/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")


def read_jsonl(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(workdir: str, after_step: int) -> None:
  """Drops records a resumed run will write again.

  Those of steps beyond `after_step`, and final records (a rerun of a
  finished run evaluates again).
  """
  records = read_jsonl(workdir)
  kept = [r for r in records
          if r.get("step", -1) <= after_step and not r.get("final")]
  if len(kept) != len(records):
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for r in kept:
        f.write(json.dumps(r, sort_keys=True, allow_nan=False) + "\n")


def write_thresholds(workdir: str, set_name: str, label_names: Sequence[str],
                     thresholds: np.ndarray) -> str:
  """Writes workdir/thresholds.json: {label: threshold or null, ...}."""
  path = os.path.join(workdir, "thresholds.json")
  body = {"chosen_on": set_name, "rule": "max sensitivity + specificity - 1",
          "thresholds": {n: float(t) if np.isfinite(t) else None
                         for n, t in zip(label_names, thresholds)}}
  with open(path, "w") as f:
    json.dump(body, f, indent=2)
  return path


def write_config(workdir: str, config) -> str:
  """Writes workdir/config.json, the run's config (to_json of ConfigDict)."""
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(config.to_json(indent=2))
  return path


def _num(x, digits=3) -> str:
  x = float(x)
  return f"{x:.{digits}f}" if np.isfinite(x) else "n/a"


def _ci(ci) -> str:
  lo, hi = (float(v) for v in ci)
  return f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _plot_roc(path: str, set_name: str, results: Mapping[str, Result]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  names = next(iter(results.values())).summary.label_names
  cols = min(4, len(names))
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows),
                           squeeze=False)
  for j, label in enumerate(names):
    ax = axes[j // cols][j % cols]
    for method, r in results.items():
      col = slice(j, j + 1)
      if not np.isfinite(r.summary.auroc[j]):
        continue
      fpr, tpr = metrics.roc_curve(r.probs[:, col], r.targets[:, col],
                                   r.mask[:, col])
      ax.plot(fpr, tpr, label=f"{method} {r.summary.auroc[j]:.3f}", lw=1.2)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
    ax.set_title(label, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6, loc="lower right")
  for j in range(len(names), rows * cols):
    axes[j // cols][j % cols].axis("off")
  fig.suptitle(f"ROC curves: {set_name}")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def _markdown(sets: Mapping[str, Mapping[str, Result]], header: Sequence[str],
              images: Mapping[str, str], main: str) -> str:
  out = ["# MedBridge results", ""] + list(header) + [""]
  for set_name, results in sets.items():
    ours = results[main]
    others = [m for m in results if m != main]
    s = ours.summary
    out += [f"## {set_name}", ""]
    mean_of = ("all labels" if len(s.mean_labels) == len(s.label_names)
               else ", ".join(s.mean_labels))
    out.append(f"**Mean AUROC ({mean_of}): {main} {_num(s.mean_auroc)}"
               f"{_ci(s.mean_auroc_ci)}" + "".join(
                   f"; {m} {_num(results[m].summary.mean_auroc)}"
                   for m in others) + "**")
    out.append("")
    out.append(f"Mean AUPRC {_num(s.mean_auprc)}, mean ECE {_num(s.mean_ece)}.")
    if s.undefined:
      out.append(f"No AUROC (one class only in this set, left out of means): "
                 f"{', '.join(s.undefined)}.")
    out.append("")
    head = (["Label", "Pos", "Neg", f"{main} AUROC [95% CI]", "AUPRC", "ECE"]
            + [f"{m} AUROC" for m in others])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for j, label in enumerate(s.label_names):
      row = [label, str(int(s.positives[j])), str(int(s.negatives[j])),
             _num(s.auroc[j]) + _ci(s.auroc_ci[j]), _num(s.auprc[j]),
             _num(s.ece[j])]
      row += [_num(results[m].summary.auroc[j]) for m in others]
      out.append("| " + " | ".join(row) + " |")
    out += ["", f"![ROC curves]({images[set_name]})", ""]
  return "\n".join(out)


def write(workdir: str, sets: Mapping[str, Mapping[str, Result]],
          header: Sequence[str] = (), main: str = "MedBridge") -> str:
  """Writes report/report.md, report/metrics.csv, ROC PNGs and report.md.

  Args:
    workdir: the run's workdir.
    sets: evaluated set name -> method name -> `Result`; every set has `main`.
    header: lines printed under the title (run facts: config, steps, ...).
    main: the method the table is about; the others are extra columns.

  Returns:
    The path of workdir/report.md.
  """
  report_dir = os.path.join(workdir, "report")
  os.makedirs(report_dir, exist_ok=True)
  images = {}
  for set_name, results in sets.items():
    png = f"roc_{_slug(set_name)}.png"
    _plot_roc(os.path.join(report_dir, png), set_name, results)
    images[set_name] = png
  with open(os.path.join(report_dir, "metrics.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["set", "method", "label", "auroc", "auroc_ci_low",
                "auroc_ci_high", "auprc", "ece", "positives", "negatives"])
    for set_name, results in sets.items():
      for method, r in results.items():
        s = r.summary
        for j, label in enumerate(s.label_names):
          w.writerow([set_name, method, label, f"{s.auroc[j]:.6f}",
                      f"{s.auroc_ci[j, 0]:.6f}", f"{s.auroc_ci[j, 1]:.6f}",
                      f"{s.auprc[j]:.6f}", f"{s.ece[j]:.6f}",
                      int(s.positives[j]), int(s.negatives[j])])
        w.writerow([set_name, method, "MEAN", f"{s.mean_auroc:.6f}",
                    f"{s.mean_auroc_ci[0]:.6f}", f"{s.mean_auroc_ci[1]:.6f}",
                    f"{s.mean_auprc:.6f}", f"{s.mean_ece:.6f}", "", ""])
  with open(os.path.join(report_dir, "report.md"), "w") as f:
    f.write(_markdown(sets, header, images, main))
  top = os.path.join(workdir, "report.md")
  with open(top, "w") as f:
    f.write(_markdown(sets, header,
                      {k: f"report/{v}" for k, v in images.items()}, main))
  return top
