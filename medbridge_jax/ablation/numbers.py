"""The runs' numbers: label groups, paired differences, spreads over seeds."""

from typing import Optional, Sequence

import numpy as np

from medbridge_jax.ablation import runs
from medbridge_jax.data import synthetic
from medbridge_jax import errors
from medbridge_jax import metrics

GROUPS = ("global", "focal")


def label_groups(label_names: Sequence[str]) -> dict[str, list[str]]:
  """"global"/"focal" -> the run's labels in that group (synthetic names)."""
  return {g: [n for n in label_names if synthetic.LABEL_GROUPS.get(n) == g]
          for g in GROUPS}


def group_means(auroc: dict, label_names: Sequence[str]) -> dict:
  """{"<group>_auroc": mean of the group's defined AUROCs, or None}."""
  groups = label_groups(label_names)
  return {f"{g}_auroc": mean([auroc[n] for n in groups[g]]) for g in GROUPS}


def paired(a: runs.RunResult, b: runs.RunResult, subset: Sequence[str],
           num_resamples: int, seed: int) -> dict:
  """AUROC of run `a` minus run `b` on the same test images, with its
  patient-level paired bootstrap interval (`metrics.PairedDifference` as
  JSON), the mean taken over `subset` (all labels if empty)."""
  same = (a.label_names == b.label_names
          and a.targets.shape == b.targets.shape
          and np.array_equal(a.targets, b.targets, equal_nan=True)
          and np.array_equal(a.mask, b.mask)
          and (a.patients is None) == (b.patients is None)
          and (a.patients is None or np.array_equal(a.patients, b.patients)))
  if not same:
    raise errors.UserError(
        f"runs {a.run_dir} and {b.run_dir} were not tested on the same "
        "images and labels: no paired difference")
  d = metrics.paired_auroc_difference(
      a.probs, b.probs, a.targets, a.mask, groups=a.patients,
      label_names=a.label_names, subset=tuple(subset),
      num_resamples=int(num_resamples), seed=int(seed))
  return d.to_json()


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
  """The mean of the defined values, None without any."""
  v = [float(x) for x in values if x is not None and np.isfinite(x)]
  return float(np.mean(v)) if v else None


def spread(values: Sequence[Optional[float]]) -> dict:
  """{"mean", "sd" (ddof 1; None below 2 values), "n", "values"} of the
  defined values."""
  v = [float(x) for x in values if x is not None and np.isfinite(x)]
  return dict(mean=float(np.mean(v)) if v else None,
              sd=float(np.std(v, ddof=1)) if len(v) > 1 else None,
              n=len(v), values=[None if x is None else float(x)
                                for x in values])


def seed_numbers(r: runs.RunResult) -> dict:
  """One seed's test numbers: mean AUROC, group means, per-label AUROC."""
  auroc = r.record["auroc"]
  return dict(mean_auroc=r.record["mean_auroc"],
              **group_means(auroc, r.label_names),
              auroc={n: auroc[n] for n in r.label_names},
              step=r.record.get("step"))


def over_seeds(per_seed: Sequence[dict]) -> dict:
  """`spread` of every number of `seed_numbers` over the seeds."""
  keys = ["mean_auroc"] + [f"{g}_auroc" for g in GROUPS]
  out = {k: spread([s[k] for s in per_seed]) for k in keys}
  labels = list(per_seed[0]["auroc"])
  out["auroc"] = {n: spread([s["auroc"][n] for s in per_seed])
                  for n in labels}
  return out
