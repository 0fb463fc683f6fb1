"""The real training loop, small: runlocal config, tiny data and experts.

One run end to end; a run killed (SIGTERM, then SIGKILL) and resumed
through the command line, with its newest checkpoint corrupted, ends with
the same metrics as an uninterrupted run; a non-finite loss stops without a
NaN checkpoint; 1 and 8 devices agree.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medbridge_jax import checkpoints, errors, report, train
from medbridge_jax.data import boxes
from medbridge_jax.data import resolve
from tests import tiny_run

REPO = tiny_run.REPO
tiny_config = tiny_run.tiny_config
as_flags = tiny_run.as_flags


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A private cache (data, experts, compiled programs) for this module."""
  yield from tiny_run.private_cache(tmp_path_factory)


def _final(workdir):
  return [r for r in report.read_jsonl(workdir) if r.get("final")][0]


def test_one_run_end_to_end(cache, tmp_path):
  from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  # bf16 compute and gradient accumulation ride along at no extra cost.
  config = tiny_config(**{"model.compute_dtype": "bfloat16",
                          "train.grad_accum": 2, "train.batch_size": 16})
  record = train.train_and_evaluate(config, workdir)
  assert record["final"] and record["step"] == 4
  assert record["set"] == "synthetic/test"
  assert record["selected_on"] == "synthetic/valid"
  assert set(record["zero_shot"]) == {"clip (random)", "siglip (random)"}
  assert _final(workdir)["mean_auroc"] == record["mean_auroc"]

  # The reported numbers are the held-out test split's, recomputed here
  # with scikit-learn from the saved probabilities of its very rows.
  data = resolve.resolve(config)
  saved = np.load(os.path.join(workdir, "predictions_test.npz"))
  np.testing.assert_array_equal(saved["patients"], data.test.index.patients)
  np.testing.assert_array_equal(saved["targets"], data.test.targets)
  assert not set(saved["patients"]) & set(data.valid.index.patients)
  aurocs = []
  for j, name in enumerate(data.label_names):
    keep = saved["mask"][:, j] > 0
    y = saved["targets"][keep, j]
    if 0 < y.sum() < len(y):
      want = sk.roc_auc_score(y, saved["probs"][keep, j])
      assert record["auroc"][name] == pytest.approx(want, abs=1e-9), name
      aurocs.append(want)
    else:
      assert record["auroc"][name] is None, name
  assert record["mean_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-9)

  text = open(os.path.join(workdir, "report.md")).read()
  assert "Mean AUROC" in text and "zero-shot clip (random) AUROC" in text
  assert "patient-level bootstrap" in text
  files = os.listdir(os.path.join(workdir, "report"))
  assert {"report.md", "metrics.csv", "roc_synthetic_test.png"} <= set(files)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # thresholds.json: those stored with the selected checkpoint.
  c = checkpoints.Checkpointer(workdir, 2)
  _, best_meta = c.restore_best(None, config.to_dict())
  c.close()
  with open(os.path.join(workdir, "thresholds.json")) as f:
    assert json.load(f) == best_meta["thresholds"]
  assert set(best_meta["thresholds"]["thresholds"]) == set(record["auroc"])
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["compute_dtype"] == "bfloat16"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert os.listdir(os.path.join(workdir, "best")) == ["4"]
  # The generated data set has boxes: the evidence maps were scored on
  # every (image, label) of the test split that is positive and boxed,
  # counted here from the box file and the index alone.
  found = boxes.read(data.test.index.dataset, data.test.index.root)
  boxed = {(b.image, b.label) for b in found.boxes}
  index = data.test.index
  pairs = sum(
      1 for i, path in enumerate(index.paths)
      for j, label in enumerate(index.label_names)
      if index.labels[i, j] == 1 and (path, label) in boxed)
  loc = record["localisation"]
  assert pairs > 0 and sum(
      v["pairs"] for v in loc["labels"].values()) == pairs
  assert "### Where: evidence maps against the boxes" in text
  # The gallery's overlays exist where report.md links them.
  gallery = re.findall(r"\]\((report/gallery/[^)]+\.png)\)", text)
  assert gallery and "### Evidence gallery" in text
  assert all(os.path.isfile(os.path.join(workdir, g)) for g in gallery)
  # Rerunning a finished run only evaluates again: same numbers, one record.
  again = train.train_and_evaluate(config, workdir)
  assert again["auroc"] == record["auroc"]
  assert len([r for r in report.read_jsonl(workdir) if r.get("final")]) == 1


def test_resuming_with_other_towers_is_refused(cache, tmp_path):
  """A checkpoint's queries and heads belong to the towers they were
  trained with: resuming over an edited expert folder names the expert."""
  from medbridge_jax.experts import from_config  # pylint: disable=g-import-not-at-top
  del cache
  config = tiny_config(**{"train.steps": 2, "zero_shot.enabled": False})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  folder = from_config.expert_paths(config)[0][0]
  with tiny_run.edited_expert(folder, str(tmp_path)):
    config.train.steps = 4
    with pytest.raises(errors.UserError,
                       match=r"expert 0 \(clip \(random\), .*\): its tower "
                             r"weights differ from those the checkpoint at "
                             r"step 2 was trained with"):
      train.train_and_evaluate(config, workdir)


def _run_cli(workdir, flags, cache_dir):
  env = dict(os.environ, MEDBRIDGE_CACHE=cache_dir, JAX_PLATFORMS="cpu")
  return subprocess.Popen(
      [sys.executable, "-m", "medbridge_jax.main",
       "--config=configs/in_domain.py:runlocal", f"--workdir={workdir}"]
      + flags, cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _wait_for_checkpoint(proc, workdir, at_least, timeout=300):
  """Waits until a complete checkpoint of step >= at_least exists."""
  deadline = time.time() + timeout
  while not any(s >= at_least for s in _steps(workdir)):
    if proc.poll() is not None:
      raise AssertionError(f"run ended before step {at_least}:\n"
                           f"{proc.stdout.read()[-3000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"no checkpoint {at_least} after {timeout} s")
    time.sleep(0.02)


def test_interrupted_runs_resume_to_identical_metrics(cache, tmp_path):
  steps = dict(**{"train.steps": 24, "train.checkpoint_every": 2,
                  "train.eval_every": 8, "train.keep_checkpoints": 3})
  reference = train.train_and_evaluate(tiny_config(**steps),
                                       str(tmp_path / "reference"))

  workdir = str(tmp_path / "interrupted")
  flags = as_flags(**steps)
  # 1. SIGTERM: the run saves where it is and exits cleanly.
  proc = _run_cli(workdir, flags, cache)
  _wait_for_checkpoint(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM" in out
  stopped = max(_steps(workdir))
  assert stopped < 24

  # 2. SIGKILL a resumed run a few checkpoints later.
  proc = _run_cli(workdir, flags, cache)
  _wait_for_checkpoint(proc, workdir, min(stopped + 4, 20))
  proc.kill()
  proc.wait()
  killed_at = _steps(workdir)
  assert killed_at[-1] < 24 and len(killed_at) >= 2

  # 3. Corrupt the newest checkpoint (as a save killed midway might) and
  #    resume: the run skips it and still ends exactly like the reference.
  newest = os.path.join(workdir, "checkpoints", str(killed_at[-1]), "state")
  for root, _, files in os.walk(newest):
    for f in files:
      if f != "_METADATA":
        open(os.path.join(root, f), "w").close()
  proc = _run_cli(workdir, flags, cache)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "unreadable" in out
  assert os.listdir(os.path.join(workdir, "corrupt")) == [f"{killed_at[-1]}-0"]

  got = _final(workdir)
  assert got["auroc"] == reference["auroc"]  # Bit for bit.
  assert got["mean_auroc"] == reference["mean_auroc"]
  assert got["mean_ece"] == reference["mean_ece"]
  evals = [r["step"] for r in report.read_jsonl(workdir) if not r.get("final")]
  # Each validation evaluation (periodic, and the last step's) recorded once.
  assert evals == [8, 16, 24]


class _PoisonAt:
  """Training batches whose n-th batch has NaN targets on known labels."""

  def __init__(self, feed, n):
    self._feed, self._n, self._i = feed, n, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._feed)
    self._i += 1
    if self._i == self._n:
      batch = dict(batch, targets=np.full_like(batch["targets"], np.nan),
                   mask=np.ones_like(batch["mask"]))
    return batch

  def __getattr__(self, name):
    return getattr(self._feed, name)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path,
                                                       monkeypatch):
  original = resolve.train_feed
  monkeypatch.setattr(resolve, "train_feed",
                      lambda data, config: _PoisonAt(original(data, config), 3))
  workdir = str(tmp_path / "nan")
  config = tiny_config(**{"train.steps": 6})
  with pytest.raises(train.NonFiniteLoss,
                     match=r"at step 3.*checkpoint \(step 2\) is kept"):
    train.train_and_evaluate(config, workdir)
  assert issubclass(train.NonFiniteLoss, errors.UserError)
  assert _steps(workdir) == [2]
  c = checkpoints.Checkpointer(workdir, 2)
  state, meta = c.restore(None, config.to_dict())
  c.close()
  assert meta["step"] == 2 and checkpoints.all_finite(state)


def test_one_and_eight_devices_agree(cache, tmp_path):
  eight = train.train_and_evaluate(tiny_config(), str(tmp_path / "eight"))
  one = train.train_and_evaluate(tiny_config(**{"mesh.data": 1}),
                                 str(tmp_path / "one"))
  for key in ("mean_auroc", "mean_auprc", "mean_ece"):
    assert one[key] == pytest.approx(eight[key], abs=1e-5), key
  for label, v in eight["auroc"].items():
    assert one["auroc"][label] == pytest.approx(v, abs=1e-5), label
