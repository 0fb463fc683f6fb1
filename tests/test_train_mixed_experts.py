"""One training run with three experts of different families and formats.

A CLIP-like Hugging Face folder, a DINOv2-like one (vision only) and an
open_clip folder with a timm ViT trunk and a BERT text tower train together
on the embedded default's synthetic data, mixed by the gate; the vision-only
expert has no zero-shot row and its head starts at zero.
"""

import os

import numpy as np
import pytest

from medbridge_jax import checkpoints, train
from medbridge_jax.data import resolve
from tests import mixed_experts
from tests import tiny_run

pytest.importorskip("torch")  # The DINOv2 folder is written by transformers.


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield from tiny_run.private_cache(tmp_path_factory)


def test_three_mixed_experts_train_and_report(cache, tmp_path):
  from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
  folders = (mixed_experts.clip_folder(str(tmp_path / "clip")),
             mixed_experts.dinov2_folder(str(tmp_path / "dino")),
             mixed_experts.open_clip_timm_bert_folder(str(tmp_path / "oc")))
  # bf16 compute rides along: every family's towers run in it.
  config = tiny_run.tiny_config(**{"experts": folders,
                                   "model.compute_dtype": "bfloat16"})
  workdir = str(tmp_path / "run")
  record = train.train_and_evaluate(config, workdir)
  assert set(record["zero_shot"]) == {"clip", "oc"}

  # The selected model mixes all three experts through one gate.
  c = checkpoints.Checkpointer(workdir, 2)
  state, _ = c.restore_best(None, config.to_dict())
  c.close()
  params = state["params"]
  assert {"expert_0", "expert_1", "expert_2"} <= set(params)
  gate = next(v for k, v in params.items() if "gate" in k)
  assert any(np.shape(leaf)[-1] == 3 for leaf in _leaves(gate))

  data = resolve.resolve(config)
  saved = np.load(os.path.join(workdir, "predictions_test.npz"))
  for j, name in enumerate(data.label_names):
    keep = saved["mask"][:, j] > 0
    y = saved["targets"][keep, j]
    if 0 < y.sum() < len(y):
      assert record["auroc"][name] == pytest.approx(
          sk.roc_auc_score(y, saved["probs"][keep, j]), abs=1e-9)

  text = open(os.path.join(workdir, "report.md")).read()
  assert "zero-shot clip" in text and "zero-shot oc" in text
  assert "zero-shot dino" not in text
  assert "dino is vision-only (no text tower)" in text


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree
