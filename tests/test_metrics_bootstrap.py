"""Patient-level (cluster) bootstrap intervals and paired differences.

The references materialise every resample as explicit repeated rows and score
them with scikit-learn; they share only the documented draw convention with
the code: groups numbered by first appearance, and resample b drawing
`rng.integers(0, G, G)` from one `np.random.default_rng(seed)`.
"""

import numpy as np
import pytest
from sklearn import metrics as skm

from medbridge_jax import metrics


def _patients(seed, num_patients=60, num_labels=4):
  """Scores, targets, mask and patient ids: 1 to 4 correlated images each."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 5, num_patients)
  ids = [f"p{rng.integers(10**6):06d}" for _ in range(num_patients)]
  groups = np.repeat(np.array(ids, object), sizes)
  perm = rng.permutation(groups.size)  # A patient's rows are not adjacent.
  groups = groups[perm]
  patient_y = rng.random((num_patients, num_labels)) < 0.35
  patient_s = rng.normal(size=(num_patients, num_labels))
  y = np.repeat(patient_y, sizes, axis=0)[perm]
  s = (np.repeat(patient_s, sizes, axis=0)[perm] + 0.9 * y
       + 0.5 * rng.normal(size=y.shape))
  mask = (rng.random(y.shape) > 0.15).astype(np.float32)
  return s, y.astype(np.float32), mask, groups


def _draws(groups, num_resamples, seed):
  """Per resample, the explicit list of rows (repeated as drawn)."""
  first = {}
  for g in groups:
    first.setdefault(g, len(first))
  rows_of = [[] for _ in first]
  for i, g in enumerate(groups):
    rows_of[first[g]].append(i)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_resamples):
    picked = rng.integers(0, len(first), len(first))
    out.append(np.array([i for k in picked for i in rows_of[k]], np.int64))
  return out


def _reference_samples(s, y, m, rows_list):
  """(B, L) sklearn AUROC of each materialised resample; nan if one class."""
  out = np.full((len(rows_list), y.shape[1]), np.nan)
  for b, rows in enumerate(rows_list):
    for j in range(y.shape[1]):
      keep = rows[m[rows, j] > 0]
      yy = y[keep, j]
      if 0 < yy.sum() < yy.size:
        out[b, j] = skm.roc_auc_score(yy, s[keep, j])
  return out


def _reference_interval(samples, idx, level=0.95):
  """Per-label and mean percentile intervals as the docs define them."""
  a = (1 - level) / 2
  per = np.array([np.quantile(c[np.isfinite(c)], [a, 1 - a])
                  if np.isfinite(c).sum() >= 2 else [np.nan, np.nan]
                  for c in samples.T])
  means = [np.mean(r[idx][np.isfinite(r[idx])]) for r in samples
           if np.isfinite(r[idx]).any()]
  return per, np.quantile(means, [a, 1 - a]), np.array(means)


def test_patient_bootstrap_equals_materialised_resamples():
  s, y, m, g = _patients(0)
  y[:, 3] = 0  # Undefined on the full data: out of every mean.
  got_per, got_mean = metrics.bootstrap_auroc_ci(
      s, y, m, groups=g, label_names=list("abcd"), num_resamples=120, seed=5)
  ref = _reference_samples(s, y, m, _draws(list(g), 120, 5))
  want_per, want_mean, _ = _reference_interval(ref[:, :3], np.arange(3))
  np.testing.assert_allclose(got_per[:3], want_per, rtol=0, atol=1e-12)
  assert np.isnan(got_per[3]).all()
  np.testing.assert_allclose(got_mean, want_mean, rtol=0, atol=1e-12)
  # A label subset in the mean.
  _, got_sub = metrics.bootstrap_auroc_ci(
      s, y, m, groups=g, label_names=list("abcd"), subset=("c", "a"),
      num_resamples=120, seed=5)
  _, want_sub, _ = _reference_interval(ref, np.array([2, 0]))
  np.testing.assert_allclose(got_sub, want_sub, rtol=0, atol=1e-12)


def test_one_image_per_patient_is_the_image_level_bootstrap():
  s, y, m, _ = _patients(1)
  ids = [f"patient-{i * 7919 % 1009}" for i in range(len(y))]  # Unsorted.
  patient = metrics.bootstrap_auroc_ci(s, y, m, groups=ids,
                                       num_resamples=80, seed=3)
  image = metrics.bootstrap_auroc_ci(s, y, m, num_resamples=80, seed=3)
  np.testing.assert_array_equal(patient[0], image[0])
  np.testing.assert_array_equal(patient[1], image[1])
  # And both are the materialised image-level resamples.
  ref = _reference_samples(s, y, m, _draws(list(range(len(y))), 80, 3))
  want_per, want_mean, _ = _reference_interval(ref, np.arange(y.shape[1]))
  np.testing.assert_allclose(image[0], want_per, rtol=0, atol=1e-12)
  np.testing.assert_allclose(image[1], want_mean, rtol=0, atol=1e-12)


def test_duplicated_images_widen_the_interval_by_about_sqrt_k():
  rng = np.random.default_rng(2)
  n, k = 300, 4
  y = (rng.random((n, 2)) < 0.4).astype(np.float32)
  s = rng.normal(size=(n, 2)) + y
  ids = np.arange(n)
  # Each patient's k images are exact duplicates, the patients in row order.
  s_k, y_k, ids_k = (np.repeat(x, k, axis=0) for x in (s, y, ids))
  patient = metrics.bootstrap_auroc_ci(s_k, y_k, groups=ids_k,
                                       num_resamples=400, seed=0)
  image = metrics.bootstrap_auroc_ci(s_k, y_k, num_resamples=400, seed=0)
  # Patient resampling of duplicates is the image bootstrap of one copy.
  once = metrics.bootstrap_auroc_ci(s, y, num_resamples=400, seed=0)
  np.testing.assert_allclose(patient[0], once[0], rtol=0, atol=1e-12)
  np.testing.assert_allclose(patient[1], once[1], rtol=0, atol=1e-12)
  ratio = np.diff(patient[0]).ravel() / np.diff(image[0]).ravel()
  assert ((ratio > 1.6) & (ratio < 2.5)).all(), ratio  # sqrt(4) = 2.
  assert 1.6 < np.diff(patient[1])[0] / np.diff(image[1])[0] < 2.5


def test_groups_of_the_wrong_length_are_rejected():
  s, y, m, g = _patients(3)
  with pytest.raises(ValueError, match="groups"):
    metrics.bootstrap_auroc_ci(s, y, m, groups=g[:-1], num_resamples=5)
  with pytest.raises(ValueError, match="groups"):
    metrics.paired_auroc_difference(s, s, y, m, groups=g[1:])


def test_summary_records_the_resampling_unit():
  s, y, m, g = _patients(4)
  p = 1 / (1 + np.exp(-s))
  names = list("abcd")
  got = metrics.summarize(p, y, m, names, bootstrap=50, seed=2, groups=g)
  assert (got.ci_unit, got.num_groups, got.num_resamples) == (
      "patients", len(set(g)), 50)
  _, want = metrics.bootstrap_auroc_ci(p, y, m, groups=g, num_resamples=50,
                                       seed=2)
  np.testing.assert_array_equal(got.mean_auroc_ci, want)
  j = got.to_json()
  assert (j["ci_unit"], j["num_groups"], j["num_resamples"]) == (
      "patients", len(set(g)), 50)
  plain = metrics.summarize(p, y, m, names, bootstrap=50, seed=2)
  assert (plain.ci_unit, plain.num_groups) == ("images", len(y))


def test_identical_models_differ_by_exactly_zero():
  s, y, m, g = _patients(5)
  d = metrics.paired_auroc_difference(s, s.copy(), y, m, groups=g,
                                      num_resamples=60, seed=1)
  assert (d.difference == 0).all() and d.mean_difference == 0
  assert (d.interval == 0).all() and (d.mean_interval == 0).all()
  assert d.p_value == 1.0
  assert (d.num_groups, d.num_resamples) == (len(set(g)), 60)


def test_paired_difference_equals_materialised_resamples():
  s, y, m, g = _patients(6, num_labels=5)
  y[:, 4] = 1  # Undefined on the full data: out of every mean.
  rng = np.random.default_rng(0)
  s_b = s + 0.6 * rng.normal(size=s.shape)
  names = list("abcde")
  d = metrics.paired_auroc_difference(s, s_b, y, m, groups=g,
                                      label_names=names, num_resamples=150,
                                      seed=9)
  for j in range(4):
    k = m[:, j] > 0
    want = (skm.roc_auc_score(y[k, j], s[k, j])
            - skm.roc_auc_score(y[k, j], s_b[k, j]))
    assert abs(d.difference[j] - want) < 1e-12
  assert np.isnan(d.difference[4]) and np.isnan(d.interval[4]).all()
  assert abs(d.mean_difference - np.mean(d.difference[:4])) < 1e-12
  rows = _draws(list(g), 150, 9)
  ref = _reference_samples(s, y, m, rows) - _reference_samples(s_b, y, m, rows)
  want_per, want_mean, means = _reference_interval(ref[:, :4], np.arange(4))
  np.testing.assert_allclose(d.interval[:4], want_per, rtol=0, atol=1e-12)
  np.testing.assert_allclose(d.mean_interval, want_mean, rtol=0, atol=1e-12)
  assert d.p_value == np.mean(means <= 0)
  assert 0 < d.p_value < 1  # The noise is small enough to leave it open.
  assert d.mean_labels == tuple("abcde")
  # Swapping the models mirrors everything.
  r = metrics.paired_auroc_difference(s_b, s, y, m, groups=g,
                                      label_names=names, num_resamples=150,
                                      seed=9)
  np.testing.assert_allclose(r.mean_interval, -d.mean_interval[::-1],
                             atol=1e-12)
  assert r.p_value == np.mean(means >= 0)


def test_paired_interval_is_narrower_than_unpaired_ones():
  s, y, m, g = _patients(7, num_patients=150)
  rng = np.random.default_rng(1)
  s_b = s + 0.15 * rng.normal(size=s.shape)  # Strongly correlated models.
  d = metrics.paired_auroc_difference(s, s_b, y, m, groups=g,
                                      num_resamples=200, seed=0)
  _, ci_a = metrics.bootstrap_auroc_ci(s, y, m, groups=g, num_resamples=200,
                                       seed=0)
  _, ci_b = metrics.bootstrap_auroc_ci(s_b, y, m, groups=g,
                                       num_resamples=200, seed=0)
  # Independent resamples of the two models would give about this width.
  unpaired = np.hypot(np.diff(ci_a)[0], np.diff(ci_b)[0])
  assert np.diff(d.mean_interval)[0] < 0.3 * unpaired
  assert d.mean_interval[0] <= d.mean_difference <= d.mean_interval[1]


def test_paired_difference_without_resamples_is_a_point_estimate():
  s, y, m, g = _patients(8)
  s_b = s[::-1].copy()
  d = metrics.paired_auroc_difference(s, s_b, y, m, groups=g,
                                      num_resamples=0)
  np.testing.assert_allclose(
      d.difference, metrics.auroc(s, y, m) - metrics.auroc(s_b, y, m),
      atol=1e-12)
  assert np.isnan(d.mean_interval).all() and np.isnan(d.p_value)
  assert d.to_json()["mean_interval"] == [None, None]
