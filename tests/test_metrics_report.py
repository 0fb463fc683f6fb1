"""The report files: markdown tables, CSV, ROC figures, metrics.jsonl."""

import csv
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from medbridge_jax import metrics, report

NAMES = ["Cardiomegaly", "Nodule", "Effusion"]


def _split(seed=0, n=80):
  """Targets, mask and patient ids (2 images per patient) of one split."""
  rng = np.random.default_rng(seed)
  y = (rng.random((n, len(NAMES))) < 0.4).astype(np.float32)
  y[:, -1] = 0  # One label without positives: reported as n/a.
  groups = np.array([f"pat{i // 2:03d}" for i in rng.permutation(n)], object)
  return y, np.ones_like(y), groups


def _result(seed, split, groups=True, bootstrap=10, ci_seed=0, base=None):
  y, m, g = split
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=y.shape) + y) if base is None else base
  p = 1 / (1 + np.exp(-logits))
  g = g if groups else None
  s = metrics.summarize(p, y, m, NAMES, bootstrap=bootstrap, seed=ci_seed,
                        groups=g)
  return report.Result(s, p, y, m, g) if groups else report.Result(s, p, y, m)


def _sk_mean(r):
  return np.mean([skm.roc_auc_score(r.targets[:, j], r.probs[:, j])
                  for j in range(2)])  # The last label has no positives.


def test_write_report(tmp_path):
  split = _split()
  sets = {"synthetic/valid": {"MedBridge": _result(0, split),
                              "zero-shot": _result(1, split)}}
  top = report.write(str(tmp_path), sets, header=["config: test"])
  text = open(top).read()
  assert "Mean AUROC" in text and "zero-shot AUROC" in text
  assert "| Cardiomegaly |" in text and "Effusion" in text
  assert "n/a" in text and "report/roc_synthetic_valid.png" in text
  inner = open(tmp_path / "report" / "report.md").read()
  assert "(roc_synthetic_valid.png)" in inner
  assert os.path.getsize(tmp_path / "report" / "roc_synthetic_valid.png") > 1000
  rows = list(csv.DictReader(open(tmp_path / "report" / "metrics.csv")))
  assert len(rows) == 2 * (len(NAMES) + 1)
  got = float(rows[0]["auroc"])
  assert abs(got - sets["synthetic/valid"]["MedBridge"].summary.auroc[0]) < 1e-6


def test_report_intervals_are_patient_level_with_paired_deltas(tmp_path):
  split = _split(1)
  y, m, g = split
  ours = _result(0, split, bootstrap=60, ci_seed=3)
  rng = np.random.default_rng(7)
  close = _result(0, split, base=np.log(ours.probs / (1 - ours.probs))
                  + 0.8 * rng.normal(size=y.shape))
  far = _result(2, split, bootstrap=0)  # Like the zero-shot rows.
  sets = {"synthetic/valid": {"MedBridge": ours, "zero-shot a": close,
                              "zero-shot b": far}}
  text = open(report.write(str(tmp_path), sets)).read()
  assert (f"95% CI, 60 patient-level bootstrap resamples over "
          f"{len(set(g))} patients ({len(y)} images).") in text
  assert "Δ mean AUROC vs MedBridge [paired 95% CI]" in text
  for name, other in (("zero-shot a", close), ("zero-shot b", far)):
    delta = _sk_mean(other) - _sk_mean(ours)
    # MedBridge's own resamples (count, seed), applied to both models.
    d = metrics.paired_auroc_difference(ours.probs, other.probs, y, m,
                                        groups=g, num_resamples=60, seed=3)
    lo, hi = -d.mean_interval[::-1]
    row = (f"| {name} | {_sk_mean(other):.3f} | {delta:+.3f} "
           f"[{lo:+.3f}, {hi:+.3f}] | {d.p_value:.3f} |")
    assert row in text, (row, text)
    assert lo <= delta <= hi


def test_report_says_image_level_when_patients_are_unknown(tmp_path):
  split = _split(2)
  sets = {"s": {"MedBridge": _result(0, split, groups=False),
                "zero-shot": _result(1, split, groups=False)}}
  text = open(report.write(str(tmp_path), sets)).read()
  assert ("95% CI, 10 image-level bootstrap resamples over 80 images"
          in text)


def test_report_rejects_results_of_different_rows(tmp_path):
  sets = {"s": {"MedBridge": _result(0, _split(0)),
                "zero-shot": _result(1, _split(1))}}
  with pytest.raises(ValueError, match="targets"):
    report.write(str(tmp_path), sets)


def test_paired_difference_of_two_results():
  split = _split(3)
  y, m, g = split
  a, b = _result(0, split), _result(1, split, groups=False)
  got = report.paired_difference(a, b, 40, seed=5, mean_labels=["Nodule"])
  want = metrics.paired_auroc_difference(
      a.probs, b.probs, y, m, groups=g, label_names=NAMES, subset=["Nodule"],
      num_resamples=40, seed=5)
  np.testing.assert_array_equal(got.mean_interval, want.mean_interval)
  assert got.mean_difference == pytest.approx(
      skm.roc_auc_score(y[:, 1], a.probs[:, 1])
      - skm.roc_auc_score(y[:, 1], b.probs[:, 1]), abs=1e-12)
  assert got.num_groups == len(set(g)) and got.p_value == want.p_value
  # The patients of whichever Result knows them.
  back = report.paired_difference(b, a, 40, seed=5, mean_labels=["Nodule"])
  np.testing.assert_allclose(back.mean_interval, -want.mean_interval[::-1],
                             rtol=0, atol=1e-12)
  assert back.num_groups == len(set(g))
  other = report.Result(b.summary, b.probs, y, m, np.roll(g, 1))
  with pytest.raises(ValueError, match="patients"):
    report.paired_difference(a, other, 10)


def test_jsonl_append_and_truncate(tmp_path):
  for step in (10, 20, 30):
    report.append_jsonl(str(tmp_path), {"step": step, "mean_auroc": 0.5})
  report.append_jsonl(str(tmp_path), {"step": 20, "final": True})
  report.truncate_jsonl(str(tmp_path), 20)
  assert [r["step"] for r in report.read_jsonl(str(tmp_path))] == [10, 20]
