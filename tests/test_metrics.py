"""Metrics against scikit-learn on random, tied and masked data."""

import numpy as np
import pytest
from sklearn import metrics as skm

from medbridge_jax import metrics


def _data(seed, n=300, num_labels=5, tied=False):
  rng = np.random.default_rng(seed)
  y = (rng.random((n, num_labels)) < rng.uniform(0.1, 0.6, num_labels))
  s = rng.normal(size=(n, num_labels)) + 0.8 * y
  if tied:  # Few distinct values: many tied positive/negative pairs.
    s = np.round(s * 2) / 2
  mask = rng.random((n, num_labels)) > 0.2
  return 1 / (1 + np.exp(-s)), y.astype(np.float32), mask.astype(np.float32)


@pytest.mark.parametrize("seed,tied", [(0, False), (1, True), (2, True)])
def test_auroc_and_auprc_equal_sklearn(seed, tied):
  p, y, m = _data(seed, tied=tied)
  roc, pr = metrics.auroc(p, y, m), metrics.auprc(p, y, m)
  for j in range(y.shape[1]):
    k = m[:, j] > 0
    assert abs(roc[j] - skm.roc_auc_score(y[k, j], p[k, j])) < 1e-6
    assert abs(pr[j] - skm.average_precision_score(y[k, j], p[k, j])) < 1e-6


def test_all_tied_scores_give_one_half():
  y = np.array([0, 1, 0, 1, 1], np.float32)
  assert metrics.auroc(np.full(5, 0.3), y)[0] == 0.5
  assert abs(metrics.auprc(np.full(5, 0.3), y)[0]
             - skm.average_precision_score(y, np.full(5, 0.3))) < 1e-12


def test_one_class_label_is_nan_reported_and_excluded():
  p, y, m = _data(3)
  y[:, 1] = 1.0  # Only positives.
  y[:, 2] = 0.0  # Only negatives.
  s = metrics.summarize(p, y, m, list("abcde"), bootstrap=20, seed=0)
  assert np.isnan(s.auroc[1]) and np.isnan(s.auroc[2])
  assert s.undefined == ("b", "c")
  assert abs(s.mean_auroc - np.mean(s.auroc[[0, 3, 4]])) < 1e-12
  assert np.isfinite(s.mean_auroc_ci).all()
  assert s.to_json()["labels"]["b"]["auroc"] is None


def test_mask_excludes_rows():
  p, y, _ = _data(4)
  m = np.ones_like(y)
  m[:50] = 0
  np.testing.assert_allclose(metrics.auroc(p, y, m),
                             metrics.auroc(p[50:], y[50:]), atol=1e-12)


def test_mean_over_label_subset():
  p, y, m = _data(5)
  roc = metrics.auroc(p, y, m)
  assert metrics.mean_over(roc, list("abcde"), ("a", "d")) == pytest.approx(
      (roc[0] + roc[3]) / 2)
  with pytest.raises(ValueError, match="'z'"):
    metrics.mean_over(roc, list("abcde"), ("z",))


def test_bootstrap_is_deterministic_and_brackets_estimate():
  p, y, m = _data(6, n=400)
  a = metrics.bootstrap_auroc_ci(p, y, m, num_resamples=100, seed=7)
  b = metrics.bootstrap_auroc_ci(p, y, m, num_resamples=100, seed=7)
  c = metrics.bootstrap_auroc_ci(p, y, m, num_resamples=100, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  roc = metrics.auroc(p, y, m)
  assert ((a[0][:, 0] <= roc) & (roc <= a[0][:, 1])).all()
  assert a[1][0] <= np.mean(roc) <= a[1][1]


def test_weighted_auroc_equals_repeated_rows():
  p, y, m = _data(9, n=60)
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 60, 60)
  w = np.bincount(idx, minlength=60)[None].astype(float)
  got = metrics._weighted_auroc(p[:, 0], y[:, 0] > 0, w)[0]
  assert abs(got - skm.roc_auc_score(y[idx, 0], p[idx, 0])) < 1e-9


def test_ece():
  p, y, m = _data(10)
  got = metrics.expected_calibration_error(p, y, m, num_bins=10)
  for j in range(y.shape[1]):
    k = m[:, j] > 0
    pj, yj = p[k, j], y[k, j]
    b = np.minimum((pj * 10).astype(int), 9)
    want = sum(abs(pj[b == i].mean() - yj[b == i].mean()) * (b == i).mean()
               for i in range(10) if (b == i).any())
    assert abs(got[j] - want) < 1e-7  # the reference sums float32 targets
  assert metrics.expected_calibration_error(
      np.array([[0.0], [1.0]]), np.array([[0.0], [1.0]]))[0] == 0.0


def test_roc_curve_matches_sklearn_area():
  p, y, _ = _data(11)
  fpr, tpr = metrics.roc_curve(p[:, :1], y[:, :1])
  want = skm.roc_auc_score(y[:, 0], p[:, 0])
  assert abs(np.trapezoid(tpr, fpr) - want) < 1e-9


def test_youden_thresholds_maximise_j():
  p, y, m = _data(12)
  th = metrics.youden_thresholds(p, y, m)
  for j in range(y.shape[1]):
    k = m[:, j] > 0
    fpr, tpr, cut = skm.roc_curve(y[k, j], p[k, j])
    best = np.max(tpr - fpr)
    pred = p[k, j] >= th[j]
    pos = y[k, j] > 0
    got = pred[pos].mean() - pred[~pos].mean()
    assert got == pytest.approx(best, abs=1e-12)
  y[:, 0] = 1
  assert np.isnan(metrics.youden_thresholds(p, y, m)[0])


def test_label_masked_everywhere_is_nan_not_an_error():
  # A test set that lacks a label (cross-domain) has it masked in every row.
  p, y, m = _data(5)
  m[:, 3] = 0.0
  s = metrics.summarize(p, y, m, list("abcde"), bootstrap=20, seed=0)
  assert np.isnan(s.auroc[3]) and np.isnan(s.auprc[3])
  assert "d" in s.undefined
  assert abs(s.mean_auroc - np.mean(s.auroc[[0, 1, 2, 4]])) < 1e-12
