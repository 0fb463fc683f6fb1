"""The ablation experiment: variants x seeds on the test split, dose-response.

Most tests put a stand-in trainer in place of `train.train_and_evaluate`: it
writes the files a real run writes (metrics.jsonl with the test set's final
record, thresholds.json, predictions_test.npz), with probabilities that
depend on the run's config and seed, so the tables' arithmetic is checked
against numbers recomputed here independently (a brute-force bootstrap).
One test trains for real on the tiny config, and one builds each variant's
model to count the views it really reads.
"""

import json
import os
import subprocess
import sys
import zlib

import jax
from flax import linen as nn
from flax import traverse_util
import numpy as np
import pytest
from sklearn import metrics as skm

from medbridge_jax import errors, train
from medbridge_jax.ablation import dose, grid, runs, tokens, variants
from medbridge_jax.data import synthetic
from medbridge_jax.data import synthetic_draw
from medbridge_jax.experts import from_config
from medbridge_jax.experts import zero_shot
from medbridge_jax.model import medbridge
from tests import tiny_run

REPO = tiny_run.REPO
TEST_SET = "synthetic/test"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


# ---------------------------------------------------------------------------
# A stand-in trainer and an independent reference.


def _test_split():
  """(targets, mask, patients) of the stand-in test split: 30 patients of
  two images, one label (Edema) without positives: its AUROC is undefined."""
  rng = np.random.default_rng(123)
  n, l = 60, len(synthetic_draw.LABELS)
  targets = (rng.random((n, l)) < 0.35).astype(np.float32)
  targets[:, synthetic_draw.LABELS.index("Edema")] = 0
  mask = (rng.random((n, l)) > 0.1).astype(np.float32)
  patients = np.repeat([f"patient{i:05d}" for i in range(30)], 2)
  return targets, mask, patients


def _sk_auroc(probs, targets, mask):
  out = {}
  for j, name in enumerate(synthetic_draw.LABELS):
    keep = mask[:, j] > 0
    y = targets[keep, j]
    out[name] = (float(skm.roc_auc_score(y, probs[keep, j]))
                 if 0 < y.sum() < len(y) else None)
  return out


class FakeTrainer:
  """Writes a finished run's files; probabilities are a function of the
  config (model switches, data, seed) and of nothing else."""

  def __init__(self):
    self.calls = []
    self.stop = set()

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    if workdir in self.stop:
      return {"step": 2, "stopped": "SIGTERM"}
    targets, mask, patients = _test_split()
    key = zlib.crc32(json.dumps([config.model.to_dict(), config.seed,
                                 config.data.to_dict(),
                                 list(config.experts)],
                                sort_keys=True).encode())
    noise = np.random.default_rng(key).random(targets.shape)
    probs = (0.4 * targets + noise).astype(np.float32) / 1.4
    auroc = _sk_auroc(probs, targets, mask)
    defined = [v for v in auroc.values() if v is not None]
    record = dict(step=4, set=TEST_SET, final=True, auroc=auroc,
                  mean_auroc=float(np.mean(defined)),
                  selected_on="synthetic/valid", zero_shot={})
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      for r in (dict(step=4, set="synthetic/valid", mean_auroc=0.5), record):
        f.write(json.dumps(r, sort_keys=True) + "\n")
    with open(os.path.join(workdir, "thresholds.json"), "w") as f:
      json.dump({"thresholds": {n: 0.5 for n in synthetic_draw.LABELS}}, f)
    np.savez(os.path.join(workdir, "predictions_test.npz"), probs=probs,
             targets=targets, mask=mask, patients=patients)
    return record


@pytest.fixture
def fake(monkeypatch):
  trainer = FakeTrainer()
  monkeypatch.setattr(train, "train_and_evaluate", trainer)
  return trainer


def _brute_auroc(s, y, w):
  """Weighted AUROC by comparing every positive with every negative."""
  num = den = 0.0
  for i in np.flatnonzero(y):
    for k in np.flatnonzero(~y):
      pair = w[i] * w[k]
      den += pair
      num += pair * (1.0 if s[i] > s[k] else 0.5 if s[i] == s[k] else 0.0)
  return num / den if den > 0 else np.nan


def _brute_paired(run_a, run_b, labels, subset, resamples, seed):
  """(point difference of the mean over `subset`, 95% interval): patients
  drawn with replacement (numbered in order of first appearance, one
  rng.integers call per resample), each label's AUROC a - b on the
  weighted rows, the mean over the subset's labels defined in the
  resample, percentile interval."""
  za, zb = (np.load(os.path.join(r, "predictions_test.npz"))
            for r in (run_a, run_b))
  targets, mask = za["targets"], za["mask"]
  np.testing.assert_array_equal(targets, zb["targets"])
  cols = [labels.index(n) for n in subset]
  ids = {}
  group = np.array([ids.setdefault(p, len(ids)) for p in za["patients"]])
  rng = np.random.default_rng(seed)

  def mean_diff(weights):
    diffs = []
    for j in cols:
      keep = mask[:, j] > 0
      y = targets[keep, j] > 0.5
      a = _brute_auroc(za["probs"][keep, j], y, weights[keep])
      b = _brute_auroc(zb["probs"][keep, j], y, weights[keep])
      if np.isfinite(a):
        diffs.append(a - b)
    return np.mean(diffs) if diffs else np.nan

  point = mean_diff(np.ones(len(group)))
  samples = []
  for _ in range(resamples):
    counts = np.bincount(rng.integers(0, len(ids), len(ids)),
                         minlength=len(ids))
    samples.append(mean_diff(counts[group].astype(float)))
  samples = np.array(samples)
  samples = samples[np.isfinite(samples)]
  return point, np.quantile(samples, [0.025, 0.975])


def _final_test_record(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f if l.strip()]
  return [r for r in records if r.get("final") and r["set"] == TEST_SET][-1]


def _config(**overrides):
  return tiny_run.tiny_config(**{"eval.bootstrap": 40, **overrides})


# ---------------------------------------------------------------------------
# The grid's numbers.


def test_table_numbers_come_from_the_runs_files(fake, tmp_path):
  config = _config()
  workdir = str(tmp_path / "grid")
  names = ["full", "global_only", "no_moe"]
  result = grid.run(config, workdir, names, num_seeds=2)
  assert len(fake.calls) == 6
  assert [r["variant"] for r in result["rows"]] == names
  assert result["test_set"] == TEST_SET
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  text = open(os.path.join(workdir, "results.md")).read()
  assert text == result["markdown"]

  for row in result["rows"]:
    run_dirs = [os.path.join(workdir, row["variant"], f"seed{s}")
            for s in (0, 1)]
    records = [_final_test_record(r) for r in run_dirs]
    means = [r["mean_auroc"] for r in records]
    assert row["mean_auroc"]["values"] == means
    assert row["mean_auroc"]["mean"] == pytest.approx(np.mean(means),
                                                      abs=1e-12)
    assert row["mean_auroc"]["sd"] == pytest.approx(np.std(means, ddof=1),
                                                    abs=1e-12)
    for group, labels in (("global", synthetic_draw.GLOBAL_LABELS),
                          ("focal", synthetic_draw.FOCAL_LABELS)):
      per_seed = [np.mean([r["auroc"][n] for n in labels
                           if r["auroc"][n] is not None]) for r in records]
      assert row[f"{group}_auroc"]["mean"] == pytest.approx(
          np.mean(per_seed), abs=1e-12)
    assert (f"| {row['variant']} | {row['description']} | "
            f"{np.mean(means):.3f} ± {np.std(means, ddof=1):.3f} |") in text

  # Paired differences from full, per seed, recomputed from the npz files.
  full = [os.path.join(workdir, "full", f"seed{s}") for s in (0, 1)]
  assert "vs_reference" not in result["rows"][0]
  for row in result["rows"][1:]:
    cells = []
    for s, d in zip((0, 1), row["vs_reference"]):
      run_dir = os.path.join(workdir, row["variant"], f"seed{s}")
      for what, subset in (("mean", synthetic_draw.LABELS),
                           ("focal", synthetic_draw.FOCAL_LABELS)):
        point, (lo, hi) = _brute_paired(run_dir, full[s],
                                        list(synthetic_draw.LABELS), subset,
                                        40, s)
        assert d[what]["mean_difference"] == pytest.approx(point, abs=1e-12)
        assert d[what]["mean_interval"] == pytest.approx([lo, hi],
                                                         abs=1e-12)
        if what == "mean":  # The same as the records' mean AUROCs.
          assert point == pytest.approx(
              _final_test_record(run_dir)["mean_auroc"]
              - _final_test_record(full[s])["mean_auroc"], abs=1e-12)
          cells.append(f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    assert f"| {row['variant']} | mean | {' | '.join(cells)} |" in text


def test_runs_are_cached_resumed_and_never_mixed(fake, tmp_path):
  config = _config()
  workdir = str(tmp_path / "grid")
  names = ["full", "global_only"]
  first = grid.run(config, workdir, names, num_seeds=2)
  assert len(fake.calls) == 4

  # Finished runs are reused: no training, the same table.
  again = grid.run(config, workdir, names, num_seeds=2)
  assert len(fake.calls) == 4 and again["markdown"] == first["markdown"]

  # A run without its result file trains again in its own folder (the real
  # trainer resumes there from its checkpoints).
  run_dir = os.path.join(workdir, "global_only", "seed1")
  os.remove(os.path.join(run_dir, runs.RESULT_FILE))
  grid.run(config, workdir, names, num_seeds=2)
  assert fake.calls[4:] == [run_dir]

  # Stopped by SIGTERM: the table holds the finished variants only; the
  # same command finishes the rest.
  fake.stop = {os.path.join(workdir, "no_moe", "seed0")}
  stopped = grid.run(config, workdir, names + ["no_moe"], num_seeds=2)
  assert stopped["stopped"] == os.path.join(workdir, "no_moe", "seed0")
  assert [r["variant"] for r in stopped["rows"]] == names
  assert "rerun the same command to resume" in stopped["markdown"]
  fake.stop = set()
  done = grid.run(config, workdir, names + ["no_moe"], num_seeds=2)
  assert done["stopped"] is None and len(done["rows"]) == 3

  # The same sub-workdir asked to run another config: an error, no run.
  calls = len(fake.calls)
  with pytest.raises(errors.UserError,
                     match=r"was made with another config \(train.steps: 4 "
                     r"there, 5 now\)"):
    grid.run(_config(**{"train.steps": 5}), workdir, names, num_seeds=2)
  assert len(fake.calls) == calls


def test_seeds_and_variant_configs(fake, tmp_path):
  config = _config(seed=7)
  grid.run(config, str(tmp_path), ["linear_probe"], num_seeds=3)
  seeds = [json.load(open(os.path.join(tmp_path, "linear_probe", f"seed{s}",
                                       runs.REQUEST_FILE)))["seed"]
           for s in (7, 8, 9)]
  assert seeds == [7, 8, 9]
  by_name = variants.for_config(config)
  c = variants.variant_config(config, by_name["linear_probe"])
  assert (c.model.focal.enabled, c.model.queries.enabled,
          c.model.fusion.enabled, c.model.moe.enabled) == (False,) * 4
  c = variants.variant_config(config, by_name["local_only"])
  assert c.model.focal.enabled and not c.model.focal.global_view
  with pytest.raises(errors.UserError, match="--seeds=0"):
    grid.run(config, str(tmp_path), ["full"], num_seeds=0)


def test_grid_lists_and_heldout_pretraining(monkeypatch):
  config = _config()
  assert list(variants.for_config(config)) == [
      "full", "global_only", "local_only", "hires_global", "linear_probe",
      "no_queries", "no_moe", "single_0", "single_1", "shared_crop"]
  # Pre-trained random experts get the held-out-shapes variant where
  # random_experts knows the spec item.
  specs = tuple(f"{s},pretrain=10"
                for s in tiny_run.TINY["random_experts"])
  config = _config(random_experts=specs)
  monkeypatch.setattr(variants, "_heldout_supported", lambda spec: True)
  by_name = variants.for_config(config)
  assert list(by_name)[-1] == "heldout_pretraining"
  c = variants.variant_config(config, by_name["heldout_pretraining"])
  assert c.random_experts == tuple(f"{s},{variants.HELDOUT_ITEM}"
                                   for s in specs)
  monkeypatch.setattr(variants, "_heldout_supported", lambda spec: False)
  assert "heldout_pretraining" not in variants.for_config(config)


def test_hires_side_matches_full_tokens():
  """Default experts: 5 views of 64 / 8 = 8 patches squared (CLIP) and of
  48 / 8 = 6 squared (SigLIP): 320 + 180 = 500 tokens; one view of 128 px
  each gives 2 x 16^2 = 512 (120 px: 450, 136 px: 578)."""
  from configs import in_domain  # pylint: disable=g-import-not-at-top
  config = in_domain.get_config()
  assert tokens.training_tokens(config) == 500
  assert tokens.matched_global_side(config) == 128
  config.random_experts = ("clip:width=32,layers=2,heads=2,patch=16,image=64",
                           "siglip:width=32,layers=2,heads=2,patch=8,"
                           "image=48")
  # 5 x 16 + 5 x 36 = 260; multiples of 16: 160 -> 100 + 400 = 500,
  # 128 -> 64 + 256 = 320, 112 -> 49 + 196 = 245 (nearest).
  assert tokens.training_tokens(config) == 260
  assert tokens.matched_global_side(config) == 112


# ---------------------------------------------------------------------------
# What each variant's model really reads.


def _tower_inputs(model, images, train_mode, params=None):
  """({expert: [pixels shape of each tower.embed call]}, abstract params):
  init (params None) or apply, traced only."""
  calls = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "embed":
      k = int(context.module.path[0].split("_")[1])
      calls.setdefault(k, []).append(tuple(args[0].shape))
    return next_fun(*args, **kwargs)

  def run(p, x):
    key = jax.random.key(0)
    with nn.intercept_methods(record):
      if p is None:
        return model.init({"params": key, "focal": key}, x,
                          train=train_mode)["params"]
      return model.apply({"params": p}, x, train=train_mode,
                         rngs={"focal": key})

  out = jax.eval_shape(run, params, images)
  return calls, out


def test_each_variant_builds_the_model_it_names(cache):
  del cache
  # Experts of different sides (32 and 24 px), as the default's 64 and 48.
  config = _config(random_experts=(
      "clip:width=32,layers=2,heads=2,patch=8,image=32",
      "siglip:width=32,layers=2,heads=2,patch=8,image=24"))
  by_name = variants.for_config(config)
  images = np.random.default_rng(0).random((2, 128, 128)).astype(np.float32)
  loaded = from_config.load(config)
  paths = from_config.expert_paths(config)[0]
  prompts = [zero_shot.prompt_embeddings(
      e, list(synthetic_draw.LABELS), config.zero_shot.positive,
      config.zero_shot.negative) for e in loaded]
  seen, params_of = {}, {}
  for name in ("full", "global_only", "local_only", "hires_global",
               "linear_probe", "shared_crop", "single_1"):
    c = variants.variant_config(config, by_name[name])
    keep = slice(None)
    if name == "single_1":  # The very folder full loads as expert 1.
      assert from_config.expert_paths(c)[0] == [paths[1]]
      keep = slice(1, 2)
    model = medbridge.build(c, loaded[keep], synthetic_draw.LABELS,
                            prompts[keep])
    seen[name] = {}
    seen[name][True], params = _tower_inputs(model, images, True)
    params_of[name] = {"/".join(k) for k in traverse_util.flatten_dict(
        params) if "tower" not in k}
    if name in ("full", "local_only", "shared_crop"):
      seen[name][False], _ = _tower_inputs(model, images, False, params)
  n = int(config.model.focal.num_local)
  # Training: (2 images x views, side, side, 3) per tower call.
  assert seen["full"][True] == {0: [(2 * (1 + n), 32, 32, 3)],
                                1: [(2 * (1 + n), 24, 24, 3)]}
  assert seen["global_only"][True] == {0: [(2, 32, 32, 3)],
                                       1: [(2, 24, 24, 3)]}
  assert seen["local_only"][True] == {0: [(2 * n, 32, 32, 3)],
                                      1: [(2 * n, 24, 24, 3)]}
  # Evaluation: native windows, stride 3/4 of the side over 128 px: 5 x 5
  # of 32 px (starts 0, 24, ..., 96), 7 x 7 of 24 px (0, 18, ..., 90, 104);
  # one shared 32 px side gives the 24 px expert 5 x 5 windows too.
  assert seen["full"][False] == {0: [(2 * 26, 32, 32, 3)],
                                 1: [(2 * 50, 24, 24, 3)]}
  assert seen["local_only"][False] == {0: [(2 * 25, 32, 32, 3)],
                                       1: [(2 * 49, 24, 24, 3)]}
  assert seen["shared_crop"][False] == {0: [(2 * 26, 32, 32, 3)],
                                        1: [(2 * 26, 24, 24, 3)]}
  # One whole-image view of G px per expert, with about full's tokens.
  side = tokens.matched_global_side(config)
  assert seen["hires_global"][True] == {0: [(2, side, side, 3)],
                                        1: [(2, side, side, 3)]}
  hires = 2 * (side // 8) ** 2
  full = (1 + n) * ((32 // 8) ** 2 + (24 // 8) ** 2)
  assert abs(hires - full) <= 0.1 * full, (hires, full)
  # The linear probe: one global view, a head per expert, nothing else.
  assert seen["linear_probe"][True] == seen["global_only"][True]
  assert params_of["linear_probe"] == {
      f"expert_{k}/head/{p}" for k in (0, 1) for p in ("bias", "kernel")}
  assert any("fusion" in p for p in params_of["full"])
  assert any("queries" in p for p in params_of["full"])
  assert any(p.startswith("gate/") for p in params_of["full"])
  assert seen["single_1"][True] == {0: [(2 * (1 + n), 24, 24, 3)]}


# ---------------------------------------------------------------------------
# Dose-response.


def test_dose_response_levels_data_and_gains(fake, tmp_path, cache):
  config = _config()
  workdir = str(tmp_path / "grid")
  grid_result = grid.run(config, workdir, ["full", "global_only"],
                           num_seeds=1)
  calls = len(fake.calls)
  result = dose.run_dose(config, workdir, scales=(1, 2),
                           contrasts=(0.5, 1), num_seeds=1)
  levels = [(lv["focal_scale"], lv["focal_contrast"])
            for lv in result["levels"]]
  assert levels == [(1.0, 1.0), (2.0, 1.0), (1.0, 0.5)]
  # Level 1 reuses the grid's runs; the other two train both variants.
  assert len(fake.calls) == calls + 4
  assert fake.calls[calls:] == [
      os.path.join(workdir, level, v, "seed0")
      for level in ("dose-fs2.0", "dose-fc0.5")
      for v in ("full", "global_only")]
  for level, (scale, contrast) in (("dose-fs2.0", (2.0, 1.0)),
                                   ("dose-fc0.5", (1.0, 0.5))):
    asked = json.load(open(os.path.join(workdir, level, "full", "seed0",
                                        runs.REQUEST_FILE)))
    d = asked["data"]
    assert (d["synthetic"]["focal_scale"],
            d["synthetic"]["focal_contrast"]) == (scale, contrast)
    assert d["root"] == os.path.join(cache, "data", synthetic.cache_name(
        40, 0, "chexpert", 128, scale, contrast))
    assert os.path.isfile(os.path.join(d["root"], ".complete"))
  # Gains: full minus global_only over the focal labels, per level.
  text = open(os.path.join(workdir, "dose.md")).read()
  assert text == result["markdown"]
  for level, lv in zip(("", "dose-fs2.0", "dose-fc0.5"), result["levels"]):
    run_dirs = [os.path.join(workdir, level, v, "seed0")
            for v in ("full", "global_only")]
    point, (lo, hi) = _brute_paired(*run_dirs, list(synthetic_draw.LABELS),
                                    synthetic_draw.FOCAL_LABELS, 40, 0)
    gain = lv["per_seed"][0]["gain"]
    assert gain["mean_difference"] == pytest.approx(point, abs=1e-12)
    assert gain["mean_interval"] == pytest.approx([lo, hi], abs=1e-12)
    assert lv["gain"]["mean"] == pytest.approx(point, abs=1e-12)
    assert (f"| {lv['focal_scale']:g} | {lv['focal_contrast']:g} | 0 | "
            f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}] |") in text
  assert grid_result["rows"]  # The grid's table is untouched by the dose.


def test_dose_needs_generated_data(tmp_path):
  config = _config(**{"data.dataset": "chexpert", "data.root": "/data/x"})
  with pytest.raises(errors.UserError, match="--dose needs the generated "
                     "synthetic data"):
    dose.run_dose(config, str(tmp_path), scales=(2,))
  with pytest.raises(errors.UserError, match="data.synthetic.focal_scale"):
    dose.dose_levels((0,), ())


# ---------------------------------------------------------------------------
# A real tiny run.


def test_real_runs_end_to_end(cache, tmp_path):
  """Two cheap variants, one seed, trained for real: the table reads the
  trainer's own files (label order included)."""
  del cache
  config = tiny_run.tiny_config(**{"eval.bootstrap": 20})
  workdir = str(tmp_path / "grid")
  result = grid.run(config, workdir, ["global_only", "linear_probe"],
                      num_seeds=1, reference="global_only")
  base, probe = (os.path.join(workdir, v, "seed0")
                 for v in ("global_only", "linear_probe"))
  for row, run_dir in zip(result["rows"], (base, probe)):
    record = _final_test_record(run_dir)
    assert row["mean_auroc"]["mean"] == record["mean_auroc"]
    # The npz's columns are the labels in the data's order.
    z = np.load(os.path.join(run_dir, "predictions_test.npz"))
    mine = _sk_auroc(z["probs"], z["targets"], z["mask"])
    for name in synthetic_draw.LABELS:
      assert (mine[name] is None) == (record["auroc"][name] is None)
      if mine[name] is not None:
        assert mine[name] == pytest.approx(record["auroc"][name], abs=1e-9)
  d = result["rows"][1]["vs_reference"][0]["mean"]
  point, (lo, hi) = _brute_paired(probe, base, list(synthetic_draw.LABELS),
                                  synthetic_draw.LABELS, 20, 0)
  assert d["mean_difference"] == pytest.approx(point, abs=1e-12)
  assert d["mean_interval"] == pytest.approx([lo, hi], abs=1e-12)
  assert [r["variant"] for r in result["zero_shot"]] == [
      "zero-shot clip (random)", "zero-shot siglip (random)"]


# ---------------------------------------------------------------------------
# Bad input.


def test_unknown_variant_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="unknown ablation variant 'nope'"):
    grid.run(_config(), str(tmp_path), ["full", "nope"])


@pytest.mark.parametrize("args, message", [
    (["--variants=full,nope"], "unknown ablation variant 'nope'"),
    (["--config.train.stepz=3"], "unknown config key 'train.stepz' in "
     "--config.train.stepz=3 (did you mean train.steps?)"),
    (["--dose=1,2", "--variants=full"], "--variants is for the grid"),
    (["--dose=1,big"], "--dose=1,big: not numbers"),
])
def test_command_line_bad_input(tmp_path, args, message):
  proc = subprocess.run(
      [sys.executable, "-m", "medbridge_jax.ablate",
       "--config=configs/in_domain.py:runlocal",
       f"--workdir={tmp_path / 'w'}"] + args,
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, MEDBRIDGE_CACHE=str(tmp_path / "cache")))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr
