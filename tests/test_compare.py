"""The method comparison: every method x seeds, compared with MedBridge.

Most tests put a stand-in trainer in place of `train.train_and_evaluate`:
it writes the files a real run writes (metrics.jsonl with each test set's
final record, predictions_<set>.npz, run_info.json, report/metrics.csv with
the zero-shot rows), with probabilities that depend on the method, the seed
and the set, so the table's numbers are checked against numbers recomputed
here from those files (scikit-learn's AUROC, a brute-force paired patient
bootstrap). One test runs the command for real on the runlocal config.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from medbridge_jax import errors, report, train
from medbridge_jax.ablation import runs
from medbridge_jax.comparison import experiment, isolated, tables
from medbridge_jax.data import synthetic_draw
from tests import tiny_run

REPO = tiny_run.REPO
LABELS = list(synthetic_draw.LABELS)
MAIN, EXTRA = "synthetic/test", "synthetic:nih/test"
ZERO_SHOT = "zero-shot clip (random)"


# ---------------------------------------------------------------------------
# A stand-in trainer.


def _split(set_name):
  """(targets, mask, patients) of a stand-in test set: patients of two
  images; Edema has no positives on the main split (AUROC undefined)."""
  rng = np.random.default_rng(zlib.crc32(set_name.encode()))
  n = 60 if set_name == MAIN else 44
  targets = (rng.random((n, len(LABELS))) < 0.35).astype(np.float32)
  if set_name == MAIN:
    targets[:, LABELS.index("Edema")] = 0
  mask = (rng.random(targets.shape) > 0.1).astype(np.float32)
  patients = np.repeat([f"p{i:04d}" for i in range(n // 2)], 2)
  return targets, mask, patients


def _sk_auroc(probs, targets, mask):
  """{label: scikit-learn AUROC on the known rows, None if one class}."""
  out = {}
  for j, name in enumerate(LABELS):
    keep = mask[:, j] > 0
    y = targets[keep, j]
    out[name] = (float(skm.roc_auc_score(y, probs[keep, j]))
                 if 0 < y.sum() < len(y) else None)
  return out


def _mean(values):
  return float(np.mean([v for v in values if v is not None]))


def _ci(name, seed):
  """A stand-in interval of a run's mean AUROC, distinct per run."""
  k = zlib.crc32(f"{name}{seed}".encode()) % 97
  return [0.4 + k / 1000, 0.8 + k / 1000]


def _costs(name, seed):
  k = zlib.crc32(name.encode()) % 1000
  return dict(method=name, trainable_params=1000 * k + 7,
              frozen_params=123456789, train_images_per_s=50.0 + k + seed,
              peak_memory_bytes=(3 * 2**30 + k * 2**20 if k % 2
                                 else 300 * 2**20 + k),
              peak_memory_kind="device" if k % 2 else "host_rss")


class FakeTrainer:
  """Writes a finished run's files for every test set of the config;
  probabilities depend on the method, the seed and the set only."""

  def __init__(self):
    self.calls = []
    self.stop = set()

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    if workdir in self.stop:
      return {"step": 2, "stopped": "SIGTERM"}
    name, seed = config.method.name, int(config.seed)
    sets = [MAIN] + [f"{d}/{s}" for d, _, s in config.data.test_datasets]
    os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
    csv_rows = ["set,method,label,auroc,auroc_ci_low,auroc_ci_high,auprc,"
                "ece,positives,negatives"]
    records = []
    for k, set_name in enumerate(sets):
      targets, mask, patients = _split(set_name)
      key = zlib.crc32(f"{name}|{seed}|{set_name}".encode())
      noise = np.random.default_rng(key).random(targets.shape)
      probs = ((0.5 * targets + noise) / 1.5).astype(np.float32)
      # Columns out of LABELS order (the same in every run, as the data's
      # label order is): the table must follow the npz's label_names.
      order = np.roll(np.arange(len(LABELS)), 2 + k)
      auroc = _sk_auroc(probs, targets, mask)
      records.append(dict(step=4, set=set_name, final=True, auroc=auroc,
                          mean_auroc=_mean(auroc.values()),
                          mean_auroc_ci=_ci(name, seed), ci_unit="patient",
                          selected_on="synthetic/valid",
                          zero_shot={"clip (random)": 0.5}))
      np.savez(os.path.join(workdir, "predictions_" + (
          "test" if k == 0 else report.slug(set_name)) + ".npz"),
               probs=probs[:, order], targets=targets[:, order],
               mask=mask[:, order], patients=patients,
               label_names=np.asarray(LABELS)[order])
      zs = _zero_shot(set_name)
      csv_rows += [f"{set_name},{ZERO_SHOT},{n},{v},0,1,0,0,1,1"
                   for n, v in zs.items()]
      csv_rows.append(f"{set_name},{ZERO_SHOT},MEAN,"
                      f"{_mean(zs.values())},0,1,0,0,,")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      for r in [dict(step=4, set="synthetic/valid", mean_auroc=0.5)] + records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    with open(os.path.join(workdir, "report", "metrics.csv"), "w") as f:
      f.write("\n".join(csv_rows) + "\n")
    with open(os.path.join(workdir, "run_info.json"), "w") as f:
      json.dump(_costs(name, seed), f)
    return records[0]


def _zero_shot(set_name):
  rng = np.random.default_rng(zlib.crc32(f"zs{set_name}".encode()))
  return {n: round(float(v), 6) for n, v in zip(LABELS, rng.random(5))}


@pytest.fixture
def fake(monkeypatch):
  trainer = FakeTrainer()
  monkeypatch.setattr(train, "train_and_evaluate", trainer)
  return trainer


def _run(*args, **kwargs):
  """experiment.run in this process: the stand-in trainer lives here."""
  return experiment.run(*args, isolate=False, **kwargs)


def _config(**overrides):
  return tiny_run.tiny_config(**{"eval.bootstrap": 30, **overrides})


# ---------------------------------------------------------------------------
# An independent reference: the paired patient bootstrap by brute force.


def _load(run_dir, set_name):
  """The run's predictions of `set_name`, columns in LABELS order."""
  file = "test" if set_name == MAIN else report.slug(set_name)
  z = np.load(os.path.join(run_dir, f"predictions_{file}.npz"))
  cols = [list(z["label_names"]).index(n) for n in LABELS]
  return (z["probs"][:, cols], z["targets"][:, cols], z["mask"][:, cols],
          z["patients"])


def _weighted_auroc(s, y, w):
  """Every positive against every negative, pairs weighted, ties half."""
  pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
  pair = w[pos][:, None] * w[neg][None, :]
  wins = ((s[pos][:, None] > s[neg][None, :])
          + 0.5 * (s[pos][:, None] == s[neg][None, :]))
  return (pair * wins).sum() / pair.sum() if pair.sum() > 0 else np.nan


def _brute_paired(run_a, run_b, set_name, resamples, seed):
  """(point difference of the mean AUROC a - b over all labels, 95%
  interval): patients drawn with replacement (numbered in order of first
  appearance, one rng.integers call per resample), the mean over the
  labels defined in the resample, percentile interval."""
  pa, targets, mask, patients = _load(run_a, set_name)
  pb, tb, _, _ = _load(run_b, set_name)
  np.testing.assert_array_equal(targets, tb)
  ids = {}
  group = np.array([ids.setdefault(p, len(ids)) for p in patients])

  def mean_diff(w):
    d = []
    for j in range(len(LABELS)):
      keep = mask[:, j] > 0
      y = targets[keep, j] > 0.5
      a = _weighted_auroc(pa[keep, j], y, w[keep])
      if np.isfinite(a):
        d.append(a - _weighted_auroc(pb[keep, j], y, w[keep]))
    return np.mean(d) if d else np.nan

  rng = np.random.default_rng(seed)
  samples = np.array([mean_diff(np.bincount(
      rng.integers(0, len(ids), len(ids)), minlength=len(ids))[group]
                                .astype(float)) for _ in range(resamples)])
  samples = samples[np.isfinite(samples)]
  return mean_diff(np.ones(len(group))), np.quantile(samples, [0.025, 0.975])


def _sk_of(run_dir, set_name):
  probs, targets, mask, _ = _load(run_dir, set_name)
  return _sk_auroc(probs, targets, mask)


# ---------------------------------------------------------------------------
# The table's numbers.


def test_table_numbers_come_from_the_runs_files(fake, tmp_path):
  config = _config()
  workdir = str(tmp_path / "cmp")
  result = _run(config, workdir, ["linear_probe", "lora"],
                          num_seeds=2, config_spec="configs/x.py:runlocal")
  names = ["medbridge", "linear_probe", "lora"]  # The reference first.
  assert fake.calls == [os.path.join(workdir, n, f"seed{s}")
                        for n in names for s in (0, 1)]
  # Same seeds for every method; the method named in each run's config.
  for n in names:
    for s in (0, 1):
      asked = json.load(open(os.path.join(workdir, n, f"seed{s}",
                                          runs.REQUEST_FILE)))
      assert (asked["seed"], asked["method"]["name"]) == (s, n)
  assert json.load(open(os.path.join(workdir, "compare.json"))) == (
      json.loads(json.dumps(result)))
  text = open(os.path.join(workdir, "compare.md"), encoding="utf-8").read()
  assert text == result["markdown"]
  assert [s["set"] for s in result["sets"]] == [MAIN]
  main = result["sets"][0]
  assert [(r["method"], r["seed"]) for r in main["rows"]] == [
      (n, s) for n in names for s in (0, 1)]

  for row in main["rows"]:
    run_dir = os.path.join(workdir, row["method"], f"seed{row['seed']}")
    mine = _sk_of(run_dir, MAIN)
    assert row["mean_auroc"] == pytest.approx(_mean(mine.values()),
                                              abs=1e-12)
    for n in LABELS:
      assert (row["auroc"][n] is None) == (mine[n] is None)
    lo, hi = _ci(row["method"], row["seed"])
    cell = f"{_mean(mine.values()):.3f} [{lo:.3f}, {hi:.3f}]"
    c = _costs(row["method"], row["seed"])
    costs = (f"{c['trainable_params']:,} | 123,456,789 | "
             f"{c['train_images_per_s']:.1f} | ")
    if row["method"] == "medbridge":
      assert row["vs_reference"] is None
      assert (f"| medbridge | {row['seed']} | {cell} | reference | {costs}"
              in text)
      continue
    ref = os.path.join(workdir, "medbridge", f"seed{row['seed']}")
    point, (dlo, dhi) = _brute_paired(run_dir, ref, MAIN, 30, row["seed"])
    d = row["vs_reference"]
    assert d["mean_difference"] == pytest.approx(point, abs=1e-12)
    assert d["mean_interval"] == pytest.approx([dlo, dhi], abs=1e-12)
    assert point == pytest.approx(
        _mean(mine.values()) - _mean(_sk_of(ref, MAIN).values()), abs=1e-12)
    assert (f"| {row['method']} | {row['seed']} | {cell} | {point:+.3f} "
            f"[{dlo:+.3f}, {dhi:+.3f}] | {costs}") in text

  # Memory with its kind, by hand: 3 GiB + k MiB on the device, or
  # 300 MiB + k bytes of host RSS.
  assert tables.memory(3 * 2**30 + 512 * 2**20, "device") == (
      "3.50 GiB (device)")
  assert tables.memory(300 * 2**20 + 5, "host_rss") == "300 MiB (host RSS)"
  assert tables.memory(None, None) == "n/a"

  # Over the seeds and per label (columns in the data's label order, the
  # npz's): mean ± SD of the two seeds' numbers.
  order = list(np.load(os.path.join(workdir, "lora", "seed0",
                                    "predictions_test.npz"))["label_names"])
  assert order != LABELS
  for n in names:
    per_seed = [_sk_of(os.path.join(workdir, n, f"seed{s}"), MAIN)
                for s in (0, 1)]
    means = [_mean(a.values()) for a in per_seed]
    assert (f"| {n} | {np.mean(means):.3f} ± {np.std(means, ddof=1):.3f} |"
            in text)
    cells = [f"{np.mean([a[l] for a in per_seed]):.3f} ± "
             f"{np.std([a[l] for a in per_seed], ddof=1):.3f}"
             if per_seed[0][l] is not None else "n/a" for l in order]
    assert f"| {n} | {' | '.join(cells)} |" in text
  assert f"| Method | {' | '.join(order)} |" in text

  # Zero-shot rows from the reference's report/metrics.csv.
  zs = _zero_shot(MAIN)
  assert (f"| {ZERO_SHOT} |  | {_mean(zs.values()):.3f} |  | 0 |" in text)
  assert f"| {ZERO_SHOT} | {' | '.join(f'{zs[l]:.3f}' for l in order)} |" \
      in text

  # The header: the machine, the config, the seeds, the steps.
  device = jax.devices()[0]
  assert f"{device.platform} device" in text and device.device_kind in text
  assert "Config: configs/x.py:runlocal." in text
  assert "Each run: 4 steps of batch 8" in text and "Seeds 0, 1 " in text
  assert "- medbridge (reference): " in text and "- lora: " in text


def test_extra_test_sets_get_their_own_section(fake, tmp_path):
  config = _config(**{"data.test_datasets": (("synthetic:nih", "", "test"),)})
  workdir = str(tmp_path / "cmp")
  result = _run(config, workdir, ["coop"], num_seeds=1)
  assert [s["set"] for s in result["sets"]] == [MAIN, EXTRA]
  text = result["markdown"]
  assert text.index(f"## Test split: {MAIN}") < text.index(
      f"## Extra test set: {EXTRA}")
  extra = text[text.index(f"## Extra test set: {EXTRA}"):]
  coop = os.path.join(workdir, "coop", "seed0")
  ref = os.path.join(workdir, "medbridge", "seed0")
  mine = _sk_of(coop, EXTRA)
  point, (lo, hi) = _brute_paired(coop, ref, EXTRA, 30, 0)
  ci = _ci("coop", 0)
  # No cost columns in an extra set's section; its own zero-shot values.
  assert (f"| coop | 0 | {_mean(mine.values()):.3f} [{ci[0]:.3f}, "
          f"{ci[1]:.3f}] | {point:+.3f} [{lo:+.3f}, {hi:+.3f}] |\n") in extra
  assert (f"| {ZERO_SHOT} |  | {_mean(_zero_shot(EXTRA).values()):.3f} |  |"
          "\n") in extra
  assert "Over the seeds" not in text  # One seed: nothing to spread.


def test_finished_runs_are_reused_resumed_and_never_mixed(fake, tmp_path):
  config = _config()
  workdir = str(tmp_path / "cmp")
  first = _run(config, workdir, ["clip_adapter"], num_seeds=1)
  assert len(fake.calls) == 2
  again = _run(config, workdir, ["clip_adapter"], num_seeds=1)
  assert len(fake.calls) == 2
  assert again["sets"] == first["sets"]
  assert [c["reused"] for c in first["costs"]] == [False, False]
  assert [dict(c, reused=False) for c in again["costs"]] == first["costs"]

  # An unfinished run trains again in its own folder (the real trainer
  # resumes there from its checkpoints).
  run_dir = os.path.join(workdir, "clip_adapter", "seed0")
  os.remove(os.path.join(run_dir, runs.RESULT_FILE))
  _run(config, workdir, ["clip_adapter"], num_seeds=1)
  assert fake.calls[2:] == [run_dir]

  # Stopped by SIGTERM: the finished methods only, and a note; the same
  # command finishes the rest.
  stop = os.path.join(workdir, "vpt_deep", "seed0")
  fake.stop = {stop}
  stopped = _run(config, workdir, ["clip_adapter", "vpt_deep"],
                           num_seeds=1)
  assert stopped["stopped"] == stop
  assert {r["method"] for r in stopped["sets"][0]["rows"]} == {
      "medbridge", "clip_adapter"}
  assert "rerun the same command to resume" in stopped["markdown"]
  fake.stop = set()
  done = _run(config, workdir, ["clip_adapter", "vpt_deep"],
                        num_seeds=1)
  assert done["stopped"] is None and fake.calls[-1] == stop
  assert len(done["sets"][0]["rows"]) == 3

  # The same sub-workdir asked to run another config: an error, no run.
  calls = len(fake.calls)
  with pytest.raises(errors.UserError, match=r"made with another config "
                     r"\(train.steps: 4 there, 5 now\)"):
    _run(_config(**{"train.steps": 5}), workdir, ["clip_adapter"],
                   num_seeds=1)
  assert len(fake.calls) == calls


def test_unknown_or_repeated_method_is_a_user_error(fake, tmp_path):
  with pytest.raises(errors.UserError, match=r"--methods='lroa' is not one "
                     r"of .*\(did you mean 'lora'\?\)"):
    _run(_config(), str(tmp_path), ["linear_probe", "lroa"])
  with pytest.raises(errors.UserError, match="names a method twice"):
    _run(_config(), str(tmp_path), ["lora", "lora"])
  assert not fake.calls


# ---------------------------------------------------------------------------
# Runs in fresh processes.


def _refuse():
  raise errors.UserError("refused in the child")


def _wait_for_sigterm(ready, handle):
  """In the child: says it is ready, then waits for a SIGTERM (caught, as
  the trainer does, if `handle`)."""
  got = []
  if handle:
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
  with open(ready, "w") as f:
    f.write("ready")
  for _ in range(600):
    if got:
      return "stopped cleanly"
    time.sleep(0.1)
  return "no SIGTERM came"


def _sigterm_when(ready):
  def send():
    while not os.path.exists(ready):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  threading.Thread(target=send, daemon=True).start()


def test_children_answer_refuse_and_get_the_sigterm(tmp_path):
  assert isolated.in_child(os.getpid) != os.getpid()
  with pytest.raises(errors.UserError, match="refused in the child"):
    isolated.in_child(_refuse)
  # A SIGTERM to this process reaches the child; this process lives on.
  ready = str(tmp_path / "ready")
  _sigterm_when(ready)
  assert isolated.in_child(_wait_for_sigterm, ready, True) == (
      "stopped cleanly")
  # A child the SIGTERM ends (outside the trainer's loop): Interrupted,
  # which train_all reports as the run it stopped.
  os.remove(ready)
  _sigterm_when(ready)
  with pytest.raises(isolated.Interrupted):
    isolated.in_child(_wait_for_sigterm, ready, False)


# ---------------------------------------------------------------------------
# The command.


def _command(tmp_path, *args, timeout=120):
  env = dict(os.environ, MEDBRIDGE_CACHE=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "medbridge_jax.compare",
       "--config=configs/in_domain.py:runlocal",
       f"--workdir={tmp_path / 'w'}"] + list(args),
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--methods=linear_probe,lroa"], "medbridge_jax.compare: error: "
     "--methods='lroa' is not one of"),
    (["--seeds=0"], "medbridge_jax.compare: error: --seeds=0 must be at "
     "least 1"),
    (["--config.loss.kind=bse"], "medbridge_jax.compare: error: "
     "config.loss.kind='bse' is not one of 'bce', 'asymmetric'"),
])
def test_command_line_bad_input(tmp_path, args, message):
  proc = _command(tmp_path, *args)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith(message), proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w" / "medbridge")


def test_real_comparison_end_to_end(tmp_path):
  """Two cheap methods and MedBridge, one seed, trained for real: the
  table reads the trainer's own files."""
  proc = _command(tmp_path, "--methods=linear_probe,clip_adapter",
                  "--seeds=1", timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = str(tmp_path / "w")
  text = open(os.path.join(workdir, "compare.md"), encoding="utf-8").read()
  assert text.strip() in proc.stdout
  result = json.load(open(os.path.join(workdir, "compare.json")))
  main = result["sets"][0]
  assert main["set"] == MAIN
  assert [r["method"] for r in main["rows"]] == [
      "medbridge", "linear_probe", "clip_adapter"]
  ref = os.path.join(workdir, "medbridge", "seed0")
  for row in main["rows"]:
    run_dir = os.path.join(workdir, row["method"], "seed0")
    mine = _sk_of(run_dir, MAIN)
    assert row["mean_auroc"] == pytest.approx(_mean(mine.values()),
                                              abs=1e-6)
    info = json.load(open(os.path.join(run_dir, "run_info.json")))
    assert info["method"] == row["method"]
    cost = [c for c in result["costs"] if c["method"] == row["method"]][0]
    assert cost["trainable_params"] == info["trainable_params"] > 0
    assert f"| {info['trainable_params']:,} | " in text
    if row["method"] != "medbridge":
      point, (lo, hi) = _brute_paired(run_dir, ref, MAIN,
                                      result["config"]["eval"]["bootstrap"],
                                      0)
      assert row["vs_reference"]["mean_difference"] == pytest.approx(
          point, abs=1e-9)
      assert row["vs_reference"]["mean_interval"] == pytest.approx(
          [lo, hi], abs=1e-9)
  assert [z["variant"] for z in main["zero_shot"]] == [
      "zero-shot clip (random)", "zero-shot siglip (random)"]
  # Each run in its own process: the linear probe's peak memory is its own,
  # below MedBridge's (trained before it); in one process it could only
  # have grown.
  peak = {c["method"]: c["peak_memory_bytes"] for c in result["costs"]}
  assert peak["linear_probe"] < peak["medbridge"], peak
