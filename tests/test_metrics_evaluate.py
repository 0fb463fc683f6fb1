"""evaluate.evaluate resamples the split's patients, restricted to seen rows."""

import numpy as np

from medbridge_jax import evaluate
from medbridge_jax.data import index as index_lib
from medbridge_jax.data import labels
from tests import test_metrics_bootstrap as ref


def test_evaluate_passes_the_seen_rows_patients(monkeypatch):
  s, y, m, g = ref._patients(11, num_labels=3)
  n, names = len(y), ("a", "b", "c")
  idx = index_lib.Index(
      dataset="synthetic", split="valid", root="/nowhere",
      paths=tuple(f"img{i}.png" for i in range(n)), patients=tuple(g),
      studies=tuple(f"s{i}" for i in range(n)), label_names=names,
      labels=y.astype(np.float32))
  eval_set = labels.LabelledSplit("synthetic/valid", idx, np.ones(3, bool), y,
                                  m)
  seen = np.random.default_rng(0).random(n) > 0.1  # Some images unreadable.
  probs = 1 / (1 + np.exp(-s))
  monkeypatch.setattr(evaluate, "predict", lambda *a, **k: (probs, seen))
  result = evaluate.evaluate(None, eval_set, batch_size=8, mesh=None,
                             data_config=None, label_names=names,
                             bootstrap=50, seed=4)
  assert list(result.groups) == list(g[seen])
  summary = result.summary
  assert (summary.ci_unit, summary.num_groups) == ("patients",
                                                   len(set(g[seen])))
  # The interval is the materialised patient resample of the seen rows.
  p, yy, mm = probs[seen], y[seen], m[seen]
  samples = ref._reference_samples(p, yy, mm, ref._draws(list(g[seen]), 50, 4))
  per, mean, _ = ref._reference_interval(samples, np.arange(3))
  np.testing.assert_allclose(summary.auroc_ci, per, rtol=0, atol=1e-12)
  np.testing.assert_allclose(summary.mean_auroc_ci, mean, rtol=0, atol=1e-12)
  record = evaluate.record(7, eval_set.name, summary)
  assert (record["ci_unit"], record["num_groups"]) == (
      "patients", len(set(g[seen])))
