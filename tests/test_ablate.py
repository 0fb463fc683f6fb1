"""The ablation grid, small: two variants on the tiny runlocal config.

The table's rows and columns, and its group means recomputed independently
from each run's own metrics.jsonl; rerunning reuses finished runs; bad input
is one line and a non-zero exit.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medbridge_jax import ablate, errors, report
from medbridge_jax.data import synthetic
from tests import tiny_run

REPO = tiny_run.REPO


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


def _final_aurocs(run_dir):
  records = [r for r in report.read_jsonl(run_dir) if r.get("final")]
  return records[0]["auroc"]


def test_two_variants_table(cache, tmp_path):
  del cache
  config = tiny_run.tiny_config(**{"eval.bootstrap": 0})
  workdir = str(tmp_path / "grid")
  # The two cheapest variants (no random crops to compile).
  result = ablate.run(config, workdir, ["no_queries", "global_only"])

  assert [r["variant"] for r in result["rows"]] == ["no_queries",
                                                    "global_only"]
  assert [r["variant"] for r in result["zero_shot"]] == [
      "zero-shot clip (random)", "zero-shot siglip (random)"]
  saved = json.load(open(os.path.join(workdir, "ablation.json")))
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  text = open(os.path.join(workdir, "ablation.md")).read()
  assert text == result["markdown"]
  header = next(l for l in text.splitlines() if l.startswith("| Variant |"))
  assert [c.strip() for c in header.strip("|").split("|")] == [
      "Variant", "What changes", "Mean AUROC", "Global findings",
      "Focal findings", "Focal vs global_only", "Train+eval (s)"]
  lines = [l for l in text.splitlines() if l.startswith("| no_queries |")]
  assert len(lines) == 2  # The summary table and the per-label table.

  # Group means, recomputed from each run's own metrics.jsonl.
  for r in result["rows"]:
    per_label = _final_aurocs(os.path.join(workdir, r["variant"]))
    assert set(per_label) == set(synthetic.LABELS)
    for group, names in (("global", synthetic.GLOBAL_LABELS),
                         ("focal", synthetic.FOCAL_LABELS)):
      values = [per_label[n] for n in names if per_label[n] is not None]
      assert r[f"{group}_auroc"] == pytest.approx(np.mean(values), abs=1e-12)
    defined = [v for v in per_label.values() if v is not None]
    assert r["mean_auroc"] == pytest.approx(np.mean(defined), abs=1e-12)
    assert f"| {r['variant']} | " in text
    assert f"{r['focal_auroc']:.3f}" in text
  probe, glob = result["rows"]
  delta = next(l for l in text.splitlines() if l.startswith("| no_queries |"))
  assert float(delta.split("|")[6]) == pytest.approx(
      probe["focal_auroc"] - glob["focal_auroc"], abs=1e-3)

  # A rerun reuses both finished runs (no training) and gives the same table.
  again = ablate.run(config, workdir, ["no_queries", "global_only"])
  assert again["markdown"] == result["markdown"]


def test_variants_and_configs():
  config = tiny_run.tiny_config()
  grid = ablate.variants(config)
  assert list(grid) == ["full", "global_only", "no_queries", "no_moe",
                        "single_0", "single_1"]
  c = ablate.variant_config(config, grid["global_only"])
  assert not c.model.focal.enabled and config.model.focal.enabled
  assert not ablate.variant_config(config, grid["no_queries"]
                                   ).model.queries.enabled
  assert not ablate.variant_config(config, grid["no_moe"]).model.moe.enabled


def test_single_expert_uses_the_same_weights(cache):
  del cache
  from medbridge_jax import experts_setup  # pylint: disable=g-import-not-at-top
  config = tiny_run.tiny_config()
  both, _ = experts_setup.expert_paths(config)
  for k in range(2):
    c = ablate.variant_config(config, ablate.variants(config)[f"single_{k}"])
    assert experts_setup.expert_paths(c)[0] == [both[k]]


def test_unknown_variant_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="unknown ablation variant 'nope'"):
    ablate.run(tiny_run.tiny_config(), str(tmp_path), ["full", "nope"])


@pytest.mark.parametrize("args, message", [
    (["--variants=full,nope"], "unknown ablation variant 'nope'"),
    (["--config.train.stepz=3"], "unknown config key 'train.stepz' in "
     "--config.train.stepz=3 (did you mean train.steps?)"),
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
