"""Human- and machine-readable results of a run.

Written into the workdir:
  metrics.jsonl        one JSON object per evaluation (appended as they run).
  report/report.md     per-label AUROC with patient-level 95% CI, AUPRC,
                       ECE, mean AUROC, the zero-shot baseline beside
                       MedBridge with a paired interval of the difference.
  report/metrics.csv   the same numbers, one row per (set, method, label).
  report/roc_*.png     ROC curves, one figure per evaluated set.
  report.md            the same report at the top of the workdir (its image
                       links point into report/).
  thresholds.json      the selected checkpoint's per-label decision
                       thresholds, chosen on the validation split (Youden's
                       J), for prediction (written by train.py).
  config.json          the run's full config.
"""

import csv
import dataclasses
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medbridge_jax import errors
from medbridge_jax import metrics


@dataclasses.dataclass
class Result:
  """One method evaluated on one set: its metrics and what they came from."""
  summary: metrics.Summary
  probs: np.ndarray  # (N, L)
  targets: np.ndarray  # (N, L)
  mask: np.ndarray  # (N, L)
  groups: Optional[np.ndarray] = None  # (N,) patient ids; None: unknown.


def paired_difference(a: Result, b: Result, bootstrap: int, seed: int = 0,
                      mean_labels: Optional[Sequence[str]] = None
                      ) -> metrics.PairedDifference:
  """Mean and per-label AUROC of `a` minus `b`, with paired intervals.

  Both Results must come from the same rows of one split (equal targets and
  masks); patients are resampled when either carries `groups`.

  Args:
    a, b: two methods evaluated on the same rows.
    bootstrap: number of resamples (0: point differences only).
    seed: the bootstrap's seed.
    mean_labels: labels in the mean; `a.summary.mean_labels` if None.
  """
  names = a.summary.label_names
  if b.summary.label_names != names:
    raise ValueError(f"labels differ: {names} and {b.summary.label_names}")
  for what in ("targets", "mask"):
    x, y = np.asarray(getattr(a, what)), np.asarray(getattr(b, what))
    if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
      raise ValueError(f"the two results' {what} differ: not the same rows "
                       "of one split, no paired difference")
  groups = a.groups if a.groups is not None else b.groups
  if (a.groups is not None and b.groups is not None
      and list(np.asarray(a.groups)) != list(np.asarray(b.groups))):
    raise ValueError("the two results' patients (groups) differ")
  return metrics.paired_auroc_difference(
      a.probs, b.probs, a.targets, a.mask, groups=groups, label_names=names,
      subset=a.summary.mean_labels if mean_labels is None else mean_labels,
      num_resamples=bootstrap, seed=seed)


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


def write_config(workdir: str, config) -> str:
  """Writes workdir/config.json, the run's config (to_json of ConfigDict)."""
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(config.to_json(indent=2))
  return path


def num(x, digits=3) -> str:
  """A metric for people: `digits` decimals, "n/a" for None or NaN."""
  if x is None or not np.isfinite(float(x)):
    return "n/a"
  return f"{float(x):.{digits}f}"


def _ci(ci) -> str:
  lo, hi = (float(v) for v in ci)
  return f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def slug(text: str) -> str:
  """A file-name part for a set name ("synthetic:nih/test" ->
  "synthetic_nih_test")."""
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


def _ci_note(s: metrics.Summary, num_images: int) -> str:
  """One line: what the intervals resampled, and how often."""
  if s.num_resamples <= 0:
    return "No confidence intervals (no bootstrap resamples)."
  if s.ci_unit == "patients":
    return (f"95% CI, {s.num_resamples} patient-level bootstrap resamples "
            f"over {s.num_groups} patients ({num_images} images).")
  return (f"95% CI, {s.num_resamples} image-level bootstrap resamples over "
          f"{s.num_groups} images (patients unknown).")


def _delta(d: metrics.PairedDifference) -> tuple[str, str]:
  """(other - main [CI], share of resamples with other >= main) of `d`,
  which holds main - other."""
  lo, hi = (-float(v) for v in d.mean_interval[::-1])
  ci = (f" [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) and np.isfinite(hi)
        else "")
  delta = -float(d.mean_difference)
  text = f"{delta:+.3f}{ci}" if np.isfinite(delta) else "n/a"
  return text, num(d.p_value)


def _markdown(sets: Mapping[str, Mapping[str, Result]], header: Sequence[str],
              images: Mapping[str, str], main: str,
              diffs: Mapping[str, Mapping[str, metrics.PairedDifference]],
              sections: Mapping[str, Sequence[str]]) -> str:
  out = ["# MedBridge results", ""] + list(header) + [""]
  for set_name, results in sets.items():
    ours = results[main]
    others = [m for m in results if m != main]
    s = ours.summary
    out += [f"## {set_name}", ""]
    mean_of = ("all labels" if len(s.mean_labels) == len(s.label_names)
               else ", ".join(s.mean_labels))
    out.append(f"**Mean AUROC ({mean_of}): {main} {num(s.mean_auroc)}"
               f"{_ci(s.mean_auroc_ci)}" + "".join(
                   f"; {m} {num(results[m].summary.mean_auroc)}"
                   for m in others) + "**")
    out.append("")
    out.append(_ci_note(s, len(ours.targets)))
    out.append("")
    out.append(f"Mean AUPRC {num(s.mean_auprc)}, mean ECE {num(s.mean_ece)}.")
    if s.undefined:
      out.append(f"No AUROC (one class only in this set, left out of means): "
                 f"{', '.join(s.undefined)}.")
    out.append("")
    if others:
      # The share of resamples where the other method is at least as good
      # is the one-sided bootstrap p-value of "main is better".
      head = ["Method", "Mean AUROC",
              f"Δ mean AUROC vs {main} [paired 95% CI]",
              "One-sided p (share of resamples with Δ ≥ 0)"]
      out.append("| " + " | ".join(head) + " |")
      out.append("|" + "---|" * len(head))
      for m in others:
        delta, p = _delta(diffs[set_name][m])
        out.append(f"| {m} | {num(results[m].summary.mean_auroc)} | {delta} "
                   f"| {p} |")
      out.append("")
    head = (["Label", "Pos", "Neg", f"{main} AUROC [95% CI]", "AUPRC", "ECE"]
            + [f"{m} AUROC" for m in others])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for j, label in enumerate(s.label_names):
      row = [label, str(int(s.positives[j])), str(int(s.negatives[j])),
             num(s.auroc[j]) + _ci(s.auroc_ci[j]), num(s.auprc[j]),
             num(s.ece[j])]
      row += [num(results[m].summary.auroc[j]) for m in others]
      out.append("| " + " | ".join(row) + " |")
    out += ["", f"![ROC curves]({images[set_name]})", ""]
    out += list(sections.get(set_name, ()))
  return "\n".join(out)


def _write_metrics_csv(path: str,
                       sets: Mapping[str, Mapping[str, Result]]) -> None:
  """One row per set, method and label (and its mean), full precision."""
  with open(path, "w", newline="") as f:
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


def write(workdir: str, sets: Mapping[str, Mapping[str, Result]],
          header: Sequence[str] = (), main: str = "MedBridge", *,
          bootstrap: Optional[int] = None, seed: Optional[int] = None,
          sections: Optional[Mapping[str, Sequence[str]]] = None) -> str:
  """Writes report/report.md, report/metrics.csv, ROC PNGs and report.md.

  Args:
    workdir: the run's workdir.
    sets: evaluated set name -> method name -> `Result`; every set has `main`,
      and the Results of one set come from the same rows of one split.
    header: lines printed under the title (run facts: config, steps, ...).
    main: the method the table is about; the others are extra columns, each
      with a paired interval of its mean AUROC minus `main`'s.
    bootstrap: resamples of the paired intervals; None: as many as `main`'s
      own intervals used in that set.
    seed: their seed; None: the seed of `main`'s own intervals.
    sections: set name -> markdown lines appended to that set's section
      (e.g. its localisation table).

  Returns:
    The path of workdir/report.md.

  Raises:
    ValueError: two Results of one set have different targets.
  """
  diffs = {
      set_name: {
          m: paired_difference(
              results[main], r,
              results[main].summary.num_resamples if bootstrap is None
              else bootstrap,
              results[main].summary.ci_seed if seed is None else seed)
          for m, r in results.items() if m != main}
      for set_name, results in sets.items()}
  report_dir = os.path.join(workdir, "report")
  os.makedirs(report_dir, exist_ok=True)
  images = {}
  for set_name, results in sets.items():
    png = f"roc_{slug(set_name)}.png"
    _plot_roc(os.path.join(report_dir, png), set_name, results)
    images[set_name] = png
  _write_metrics_csv(os.path.join(report_dir, "metrics.csv"), sets)
  # Δ and ≥ in the tables: UTF-8 whatever the locale.
  with open(os.path.join(report_dir, "report.md"), "w",
            encoding="utf-8") as f:
    # Inside report/, links into report/ lose that prefix.
    inner = {k: [line.replace("](report/", "](") for line in v]
             for k, v in (sections or {}).items()}
    f.write(_markdown(sets, header, images, main, diffs, inner))
  top = os.path.join(workdir, "report.md")
  with open(top, "w", encoding="utf-8") as f:
    f.write(_markdown(sets, header,
                      {k: f"report/{v}" for k, v in images.items()}, main,
                      diffs, sections or {}))
  return top


def write_thresholds(workdir: str, thresholds: dict) -> None:
  """workdir/thresholds.json: those of the selected checkpoint."""
  with open(os.path.join(workdir, "thresholds.json"), "w") as f:
    json.dump(thresholds, f, indent=2)


def thresholds_table(body, where: str) -> dict:
  """The {label: threshold or None} table of a thresholds object (as in
  thresholds.json and checkpoints); UserError naming `where` if malformed."""
  table = body.get("thresholds") if isinstance(body, dict) else None
  if not isinstance(table, dict) or not table or not all(
      t is None or isinstance(t, (int, float)) for t in table.values()):
    raise errors.UserError(f"{where} holds no per-label \"thresholds\" "
                           f"object")
  return table


def write_predictions(workdir: str, name: str, result: Result
                       ) -> None:
  """workdir/predictions_<name>.npz: the selected model's probabilities,
  targets, mask, patients and label names (the columns) of one test set,
  for paired comparisons of two runs on the same images (ablations, method
  comparisons)."""
  np.savez(os.path.join(workdir, f"predictions_{slug(name)}.npz"),
           probs=result.probs, targets=result.targets, mask=result.mask,
           patients=np.asarray(result.groups, dtype=str),
           label_names=np.asarray(result.summary.label_names, dtype=str))


def run_header(c, d, expert_names: Sequence[str], experts: Sequence[Any],
               meta: dict) -> list[str]:
  """report.md's opening lines: what was trained on what, how the model was
  selected and where it is reported. `c` the config, `d` the run's
  `resolve.Data`, `experts` the loaded experts, `meta` the selected
  checkpoint's."""
  expert_paths = [e.path for e in experts]
  vision_only = [n for n, e in zip(expert_names, experts) if not e.has_text]
  zero_shot = ("Zero-shot: each frozen expert with the label prompts "
               f"\"{c.zero_shot.positive}\" / \"{c.zero_shot.negative}\"")
  if vision_only:
    zero_shot += (f"; {', '.join(vision_only)} "
                  f"{'is' if len(vision_only) == 1 else 'are'} vision-only "
                  f"(no text tower): no zero-shot row, the head started "
                  f"at zero")
  return [
      f"Data: {c.data.dataset} "
      f"({c.data.root or 'synthetic, generated in the cache'}), "
      f"{len(d.train.index)} training images, labels: "
      f"{', '.join(d.label_names)}.",
      "Experts: " + ", ".join(
          f"{n} ({p})" for n, p in zip(expert_names, expert_paths))
      + (" (small test-bed experts: no pretrained weights configured)."
         if not c.experts else "."),
      f"Training: {c.train.steps} steps of batch {c.train.batch_size}, seed "
      f"{c.seed}. Model: the checkpoint of step {meta['step']}, selected on "
      f"{d.valid.name} ({len(d.valid.index)} images; mean AUROC "
      f"{num(meta.get('best_metric'), 4)}); thresholds chosen there too.",
      f"Reported on held-out {d.test.name} ({len(d.test.index)} images, no "
      f"patient shared with training or validation); mean AUROC over "
      f"{', '.join(c.eval.mean_labels) or 'all labels'}; 95% CIs resample "
      f"patients ({c.eval.bootstrap} resamples).",
      zero_shot + ".",
  ]
