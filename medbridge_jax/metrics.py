"""Clinical evaluation metrics for multi-label chest X-ray predictions.

Everything here is numpy on the host: predictions are gathered after the
jitted forward passes. All functions take `scores` (N, L) (probabilities or
logits; AUROC and AUPRC only need the order), `targets` (N, L) in {0, 1} and
an optional `mask` (N, L) where 0 marks an unknown label to leave out.

A label whose known targets hold one class only has no AUROC: it is nan,
listed in `Summary.undefined`, and left out of every mean.

AUROC ties are handled like scikit-learn's `roc_auc_score` (a tied
positive/negative pair counts one half) and AUPRC is scikit-learn's
`average_precision_score` (precision at each distinct threshold weighted by the
recall step), so both agree with scikit-learn to float rounding.

Bootstrap intervals resample patients when given each row's patient id
(`groups`): a patient's images are correlated, so resampling images alone
gives intervals that are too narrow. Two models on the same rows are compared
with a paired interval of their difference (`paired_auroc_difference`).
"""

import dataclasses
from typing import Sequence

import numpy as np


def _prepare(scores, targets, mask):
  scores = np.asarray(scores, np.float64)
  targets = np.asarray(targets, np.float64)
  if scores.ndim == 1:
    scores, targets = scores[:, None], targets[:, None]
    mask = None if mask is None else np.asarray(mask)[:, None]
  if scores.shape != targets.shape:
    raise ValueError(
        f"scores {scores.shape} and targets {targets.shape} differ")
  if mask is None:
    mask = np.ones_like(targets)
  mask = np.asarray(mask, np.float64)
  if mask.shape != targets.shape:
    raise ValueError(f"mask {mask.shape} and targets {targets.shape} differ")
  # Unknown or non-finite targets are never counted.
  mask = (mask > 0) & np.isfinite(targets)
  return scores, np.where(mask, targets, 0.0) > 0.5, mask


def _weighted_auroc(scores, positive, weights):
  """AUROC of one label under row weights, vectorised over weight vectors.

  Args:
    scores: (N,) scores.
    positive: (N,) bool targets.
    weights: (B, N) non-negative row weights (counts of a bootstrap resample,
      or ones for the plain estimate).

  Returns:
    (B,) AUROC; nan where the weighted positives or negatives are zero.
  """
  if scores.size == 0:  # Every entry of the label masked out.
    return np.full(weights.shape[0], np.nan)
  order = np.argsort(scores, kind="stable")
  s, pos, w = scores[order], positive[order], weights[:, order]
  # Groups of tied scores: a tied positive/negative pair counts one half.
  starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
  wpos = np.add.reduceat(w * pos, starts, axis=1)  # (B, G)
  wneg = np.add.reduceat(w * ~pos, starts, axis=1)
  neg_below = np.cumsum(wneg, axis=1) - wneg
  total_pos, total_neg = wpos.sum(1), wneg.sum(1)
  area = (wpos * (neg_below + 0.5 * wneg)).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = area / (total_pos * total_neg)
  return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def auroc(scores, targets, mask=None) -> np.ndarray:
  """Per-label area under the ROC curve, (L,); nan for one-class labels."""
  scores, positive, mask = _prepare(scores, targets, mask)
  out = np.full(scores.shape[1], np.nan)
  for j in range(scores.shape[1]):
    keep = mask[:, j]
    out[j] = _weighted_auroc(scores[keep, j], positive[keep, j],
                             np.ones((1, int(keep.sum()))))[0]
  return out


def _roc_points(s: np.ndarray, pos: np.ndarray):
  """One label's ROC corners: (thresholds, false positives, true positives)
  counted at each distinct score, from the highest down (predict positive
  when score >= threshold); tied scores form one point."""
  order = np.argsort(-s, kind="stable")
  s, pos = s[order], pos[order]
  last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
  tps = np.cumsum(pos)[last].astype(np.float64)
  return s[last], (last + 1) - tps, tps


def _average_precision(scores, positive):
  if positive.sum() == 0 or positive.sum() == positive.size:
    return np.nan
  _, fps, tps = _roc_points(scores, positive)
  precision = tps / (fps + tps)
  recall_step = np.diff(np.r_[0.0, tps]) / tps[-1]
  return float(np.sum(recall_step * precision))


def auprc(scores, targets, mask=None) -> np.ndarray:
  """Per-label average precision, (L,); nan for one-class labels."""
  scores, positive, mask = _prepare(scores, targets, mask)
  return np.array([
      _average_precision(scores[mask[:, j], j], positive[mask[:, j], j])
      for j in range(scores.shape[1])])


def roc_curve(scores, targets, mask=None):
  """(false positive rates, true positive rates) of one label, for plots."""
  scores, positive, mask = _prepare(scores, targets, mask)
  _, fps, tps = _roc_points(scores[mask[:, 0], 0], positive[mask[:, 0], 0])
  fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
  with np.errstate(invalid="ignore", divide="ignore"):
    return fps / max(fps[-1], 1), tps / max(tps[-1], 1)


def youden_thresholds(probs, targets, mask=None) -> np.ndarray:
  """Per-label threshold maximising sensitivity + specificity - 1, (L,).

  The threshold is a score that occurs in the data (predict positive when
  score >= threshold); nan for labels without both classes.
  """
  probs, positive, mask = _prepare(probs, targets, mask)
  out = np.full(probs.shape[1], np.nan)
  for j in range(probs.shape[1]):
    pos = positive[mask[:, j], j]
    if pos.all() or not pos.any():
      continue
    thresholds, fps, tps = _roc_points(probs[mask[:, j], j], pos)
    out[j] = thresholds[np.argmax(tps / pos.sum() - fps / (~pos).sum())]
  return out


def expected_calibration_error(probs, targets, mask=None,
                               num_bins: int = 10) -> np.ndarray:
  """Per-label ECE of positive-class probabilities, (L,), equal-width bins.

  ECE = sum over bins of (bin share) * |mean probability - positive rate|.
  Defined for one-class labels too (nan only without any known target).
  """
  probs, positive, mask = _prepare(probs, targets, mask)
  if np.nanmin(probs, initial=0.0) < 0 or np.nanmax(probs, initial=1.0) > 1:
    raise ValueError("expected_calibration_error needs probabilities in [0, 1]")
  bins = np.minimum((probs * num_bins).astype(np.int64), num_bins - 1)
  out = np.full(probs.shape[1], np.nan)
  for j in range(probs.shape[1]):
    keep = mask[:, j]
    n = keep.sum()
    if n == 0:
      continue
    b, p, y = bins[keep, j], probs[keep, j], positive[keep, j]
    gap = np.abs(np.bincount(b, p, num_bins) - np.bincount(b, y, num_bins))
    # n_b/n * |mean p - mean y| summed over bins = sum |sum p - sum y| / n.
    out[j] = gap.sum() / n
  return out


def mean_over(values: np.ndarray, label_names: Sequence[str],
              subset: Sequence[str] = ()) -> float:
  """Mean of per-label `values` over `subset` (all if empty), skipping nans."""
  idx = label_indices(label_names, subset)
  v = np.asarray(values, np.float64)[idx]
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


def label_indices(label_names: Sequence[str], subset: Sequence[str] = ()
                  ) -> np.ndarray:
  """Column indices of `subset` in `label_names`; all columns if empty."""
  names = list(label_names)
  if not subset:
    return np.arange(len(names))
  missing = [s for s in subset if s not in names]
  if missing:
    raise ValueError(f"mean label(s) {missing} not among the labels {names}")
  return np.array([names.index(s) for s in subset], np.int64)


def group_index(groups, n: int) -> tuple[np.ndarray, int]:
  """Each row's group number, groups numbered by first appearance.

  Args:
    groups: (n,) hashable group ids (patient ids), or None: every row is its
      own group.
    n: the number of rows.

  Returns:
    (index (n,) int64, number of distinct groups).
  """
  if groups is None:
    return np.arange(n), n
  groups = list(groups.tolist() if isinstance(groups, np.ndarray) else groups)
  if len(groups) != n:
    raise ValueError(f"groups has {len(groups)} entries for {n} rows")
  numbers = {}
  index = np.array([numbers.setdefault(g, len(numbers)) for g in groups],
                   np.int64)
  return index, len(numbers)


def resample_weights(groups, n: int, num_resamples: int, seed: int
                     ) -> tuple[np.ndarray, int]:
  """Row weights of a cluster bootstrap: groups drawn with replacement.

  Resample b draws `num_groups` group numbers with
  `np.random.default_rng(seed).integers(0, num_groups, num_groups)` (one call
  per resample, in order; groups numbered as `group_index` does) and weights
  every row by how often its group was drawn. Without groups the rows are
  the groups, i.e. the plain image-level bootstrap.

  Returns:
    (weights (num_resamples, n) float64, number of groups).
  """
  index, num_groups = group_index(groups, n)
  rng = np.random.default_rng(seed)
  counts = np.zeros((max(num_resamples, 0), num_groups))
  for b in range(counts.shape[0]):
    counts[b] = np.bincount(rng.integers(0, num_groups, num_groups),
                            minlength=num_groups)
  return counts[:, index], num_groups


def _auroc_samples(scores, positive, mask, weights) -> np.ndarray:
  """(B, L) AUROC of every label under each of B row-weight vectors."""
  samples = np.full((weights.shape[0], scores.shape[1]), np.nan)
  for j in range(scores.shape[1]):
    keep = mask[:, j]
    samples[:, j] = _weighted_auroc(scores[keep, j], positive[keep, j],
                                    weights[:, keep])
  return samples


def sample_means(samples: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Per resample, the mean of columns `idx` over its defined labels; the
  resamples where none is defined are dropped."""
  sub = samples[:, idx]
  defined = np.isfinite(sub)
  # Labels undefined on the full data are undefined in every mean.
  means = np.where(defined, sub, 0.0).sum(1) / np.maximum(defined.sum(1), 1)
  return means[defined.any(1)]


def interval(values: np.ndarray, level: float) -> np.ndarray:
  """Percentile interval (2,) of the finite `values`; nan if fewer than 2."""
  v = values[np.isfinite(values)]
  if v.size < 2:
    return np.full(2, np.nan)
  alpha = (1 - level) / 2
  return np.quantile(v, [alpha, 1 - alpha])


def _names(label_names, num_labels: int) -> list:
  return list(label_names if label_names is not None else range(num_labels))


def bootstrap_auroc_ci(scores, targets, mask=None, *, groups=None,
                       label_names=None, subset: Sequence[str] = (),
                       num_resamples: int = 200, seed: int = 0,
                       level: float = 0.95):
  """Percentile bootstrap intervals of per-label AUROC and of mean AUROC.

  With `groups` (N,) (patient ids), the distinct groups are resampled with
  replacement and each row weighted by how often its group was drawn (a
  cluster bootstrap: a patient's correlated images stay together); without,
  rows are resampled (see `resample_weights`). The same resample serves every
  label, so the interval of the mean accounts for correlated labels. A
  resample where a label has one class only is skipped for that label.
  Deterministic given `seed`.

  Returns:
    (per_label (L, 2), mean (2,)) lower and upper bounds; nan when
    `num_resamples` is 0 or too few resamples were defined.
  """
  scores, positive, mask = _prepare(scores, targets, mask)
  n, num_labels = scores.shape
  if num_resamples <= 0 or n == 0:
    group_index(groups, n)  # Still reject groups of the wrong length.
    return np.full((num_labels, 2), np.nan), np.full(2, np.nan)
  weights, _ = resample_weights(groups, n, num_resamples, seed)
  samples = _auroc_samples(scores, positive, mask, weights)
  per_label = np.stack([interval(samples[:, j], level)
                        for j in range(num_labels)])
  idx = label_indices(_names(label_names, num_labels), subset)
  return per_label, interval(sample_means(samples, idx), level)


@dataclasses.dataclass
class PairedDifference:
  """AUROC of model a minus model b on the same rows, with paired intervals.

  Both models are scored on every resample of the same bootstrap (same rows,
  same patient draws), so what they share cancels in the difference.
  """
  label_names: tuple[str, ...]
  difference: np.ndarray  # (L,) AUROC a - b; nan where undefined.
  interval: np.ndarray  # (L, 2) percentile interval of the difference.
  mean_difference: float  # Mean AUROC a - b over `mean_labels`.
  mean_interval: np.ndarray  # (2,)
  p_value: float  # Share of resamples with mean difference <= 0.
  mean_labels: tuple[str, ...]
  num_groups: int  # Patients (or rows, without groups) resampled.
  num_resamples: int
  level: float

  def to_json(self) -> dict:
    """A JSON-able dict (nan becomes None)."""
    def f(x):
      x = float(x)
      return x if np.isfinite(x) else None
    return dict(
        mean_difference=f(self.mean_difference),
        mean_interval=[f(v) for v in self.mean_interval],
        p_value=f(self.p_value), mean_labels=list(self.mean_labels),
        num_groups=int(self.num_groups),
        num_resamples=int(self.num_resamples), level=float(self.level),
        labels={n: dict(difference=f(self.difference[j]),
                        interval=[f(v) for v in self.interval[j]])
                for j, n in enumerate(self.label_names)})


def paired_auroc_difference(scores_a, scores_b, targets, mask=None, *,
                            groups=None, label_names=None,
                            subset: Sequence[str] = (),
                            num_resamples: int = 200, seed: int = 0,
                            level: float = 0.95) -> PairedDifference:
  """Paired bootstrap of AUROC(a) - AUROC(b), two models on the same rows.

  Resamples exactly as `bootstrap_auroc_ci` (patients when `groups` is
  given) and applies each resample to both models. Labels undefined on the
  full data are left out of the mean, as in `summarize`.
  """
  scores_b, _, _ = _prepare(scores_b, targets, mask)
  scores_a, positive, mask = _prepare(scores_a, targets, mask)
  n, num_labels = scores_a.shape
  names = _names(label_names, num_labels)
  idx = label_indices(names, subset)
  roc_a, roc_b = (_auroc_samples(s, positive, mask, np.ones((1, n)))[0]
                  for s in (scores_a, scores_b))
  difference = roc_a - roc_b
  mean_difference = (mean_over(roc_a, names, subset)
                     - mean_over(roc_b, names, subset))
  per_label = np.full((num_labels, 2), np.nan)
  mean_interval, p_value = np.full(2, np.nan), float("nan")
  _, num_groups = group_index(groups, n)
  if num_resamples > 0 and n > 0:
    weights, _ = resample_weights(groups, n, num_resamples, seed)
    # Which labels a resample defines depends on targets and weights only,
    # so both models' samples are nan in the same places.
    samples = (_auroc_samples(scores_a, positive, mask, weights)
               - _auroc_samples(scores_b, positive, mask, weights))
    per_label = np.stack([interval(samples[:, j], level)
                          for j in range(num_labels)])
    means = sample_means(samples, idx)
    mean_interval = interval(means, level)
    if means.size:
      p_value = float(np.mean(means <= 0))
  return PairedDifference(
      label_names=tuple(str(x) for x in names), difference=difference,
      interval=per_label, mean_difference=mean_difference,
      mean_interval=mean_interval, p_value=p_value,
      mean_labels=tuple(str(names[i]) for i in idx), num_groups=num_groups,
      num_resamples=max(int(num_resamples), 0), level=float(level))


@dataclasses.dataclass
class Summary:
  """All metrics of one evaluation, per label and averaged."""
  label_names: tuple[str, ...]
  auroc: np.ndarray  # (L,) nan where undefined.
  auprc: np.ndarray  # (L,)
  ece: np.ndarray  # (L,)
  auroc_ci: np.ndarray  # (L, 2)
  mean_auroc: float  # Over `mean_labels`, defined labels only.
  mean_auroc_ci: np.ndarray  # (2,)
  mean_auprc: float
  mean_ece: float
  mean_labels: tuple[str, ...]  # Labels in the means (all if none chosen).
  undefined: tuple[str, ...]  # Labels with one class only: no AUROC.
  positives: np.ndarray  # (L,) known positives.
  negatives: np.ndarray  # (L,) known negatives.
  # What the bootstrap resampled: "patients" (cluster bootstrap over
  # `num_groups` patients) or "images" (rows, `num_groups` of them).
  ci_unit: str = "images"
  num_groups: int = 0
  num_resamples: int = 0  # 0: no intervals.
  ci_seed: int = 0  # The bootstrap's seed, to pair other models with it.

  def to_json(self) -> dict:
    """A JSON-able dict (nan becomes None)."""
    def f(x):
      x = float(x)
      return x if np.isfinite(x) else None
    per = {}
    for j, name in enumerate(self.label_names):
      per[name] = dict(auroc=f(self.auroc[j]), auprc=f(self.auprc[j]),
                       ece=f(self.ece[j]),
                       auroc_ci=[f(v) for v in self.auroc_ci[j]],
                       positives=int(self.positives[j]),
                       negatives=int(self.negatives[j]))
    return dict(mean_auroc=f(self.mean_auroc),
                mean_auroc_ci=[f(v) for v in self.mean_auroc_ci],
                mean_auprc=f(self.mean_auprc), mean_ece=f(self.mean_ece),
                mean_labels=list(self.mean_labels),
                undefined=list(self.undefined), ci_unit=self.ci_unit,
                num_groups=int(self.num_groups),
                num_resamples=int(self.num_resamples), labels=per)


def summarize(probs, targets, mask, label_names: Sequence[str], *,
              mean_labels: Sequence[str] = (), bootstrap: int = 0,
              seed: int = 0, ece_bins: int = 10, groups=None) -> Summary:
  """Every metric of one evaluation of probabilities `probs` (N, L).

  `groups` (N,): each row's patient id; the intervals then resample
  patients (see `bootstrap_auroc_ci`).
  """
  label_names = tuple(label_names)
  probs_, positive, known = _prepare(probs, targets, mask)
  if probs_.shape[1] != len(label_names):
    raise ValueError(f"{probs_.shape[1]} score columns for "
                     f"{len(label_names)} labels")
  roc = auroc(probs, targets, mask)
  pr = auprc(probs, targets, mask)
  ece = expected_calibration_error(probs, targets, mask, ece_bins)
  ci, mean_ci = bootstrap_auroc_ci(
      probs, targets, mask, groups=groups, label_names=label_names,
      subset=mean_labels, num_resamples=bootstrap, seed=seed)
  idx = label_indices(label_names, mean_labels)
  return Summary(
      label_names=label_names, auroc=roc, auprc=pr, ece=ece, auroc_ci=ci,
      mean_auroc=mean_over(roc, label_names, mean_labels),
      mean_auroc_ci=mean_ci,
      mean_auprc=mean_over(pr, label_names, mean_labels),
      mean_ece=mean_over(ece, label_names, mean_labels),
      mean_labels=tuple(label_names[i] for i in idx),
      undefined=tuple(n for n, v in zip(label_names, roc)
                      if not np.isfinite(v)),
      positives=(positive & known).sum(0), negatives=(~positive & known).sum(0),
      ci_unit="images" if groups is None else "patients",
      num_groups=group_index(groups, probs_.shape[0])[1],
      num_resamples=max(int(bootstrap), 0), ci_seed=int(seed))
