"""The report files: markdown tables, CSV, ROC figures, metrics.jsonl."""

import csv
import os

import numpy as np

from medbridge_jax import metrics, report


def _result(seed, names):
  rng = np.random.default_rng(seed)
  y = (rng.random((80, len(names))) < 0.4).astype(np.float32)
  y[:, -1] = 0  # One label without positives: reported as n/a.
  p = 1 / (1 + np.exp(-(rng.normal(size=y.shape) + y)))
  m = np.ones_like(y)
  s = metrics.summarize(p, y, m, names, bootstrap=10, seed=0)
  return report.Result(s, p, y, m)


def test_write_report(tmp_path):
  names = ["Cardiomegaly", "Nodule", "Effusion"]
  sets = {"synthetic/valid": {"MedBridge": _result(0, names),
                              "zero-shot": _result(1, names)}}
  top = report.write(str(tmp_path), sets, header=["config: test"])
  text = open(top).read()
  assert "Mean AUROC" in text and "zero-shot AUROC" in text
  assert "| Cardiomegaly |" in text and "Effusion" in text
  assert "n/a" in text and "report/roc_synthetic_valid.png" in text
  inner = open(tmp_path / "report" / "report.md").read()
  assert "(roc_synthetic_valid.png)" in inner
  assert os.path.getsize(tmp_path / "report" / "roc_synthetic_valid.png") > 1000
  rows = list(csv.DictReader(open(tmp_path / "report" / "metrics.csv")))
  assert len(rows) == 2 * (len(names) + 1)
  got = float(rows[0]["auroc"])
  assert abs(got - sets["synthetic/valid"]["MedBridge"].summary.auroc[0]) < 1e-6


def test_jsonl_append_and_truncate(tmp_path):
  for step in (10, 20, 30):
    report.append_jsonl(str(tmp_path), {"step": step, "mean_auroc": 0.5})
  report.append_jsonl(str(tmp_path), {"step": 20, "final": True})
  report.truncate_jsonl(str(tmp_path), 20)
  assert [r["step"] for r in report.read_jsonl(str(tmp_path))] == [10, 20]
