"""The shipped test-bed experts: what the default loads, and how to remake
them.

Pre-training is deterministic only per platform, so "the command remakes
the shipped weights" is checked as: a short regeneration gives bit-equal
folders in two processes on this machine; the shipped folders record the
very spec, seed and recipe the command records today; and they hold the
files a fresh folder of their spec holds, with the seed's random text tower
and a trained vision tower, loadable by our loader.
"""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from medbridge_jax import default_config
from medbridge_jax import experts
from medbridge_jax.experts import from_config
from medbridge_jax.experts import pretrain
from medbridge_jax.experts import random_experts
from medbridge_jax.experts import testbed

SHIPPED = testbed.shipped_specs()
# The quickest to regenerate: the 48 px tower on held-out shapes.
QUICK = [s for s in testbed.shipped_specs(2) if "siglip" in s[0] and
         "heldout" in s[0]][0]


def _json(path, name):
  with open(os.path.join(path, name), encoding="utf-8") as f:
    return json.load(f)


def _bytes(path, name):
  with open(os.path.join(path, name), "rb") as f:
    return f.read()


def test_ships_both_shapes_on_both_variants():
  assert len(SHIPPED) == 2 * len(default_config.RANDOM_EXPERT_SHAPES)
  for spec, seed in SHIPPED:
    assert os.path.isdir(os.path.join(testbed.ROOT,
                                      testbed.folder_name(spec, seed)))


def test_default_config_loads_the_shipped_experts(tmp_path, monkeypatch):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  config = default_config.get_default()
  paths, generated = from_config.expert_paths(config)
  assert generated  # Test-bed experts, not real checkpoints.
  assert paths == [os.path.join(testbed.ROOT, testbed.folder_name(s, i))
                   for i, s in enumerate(config.random_experts)]
  heldout = [s for s, _ in SHIPPED if "heldout" in s]
  config.random_experts = tuple(heldout)
  paths, _ = from_config.expert_paths(config)
  assert all(os.path.dirname(p) == testbed.ROOT and "heldout" in p
             for p in paths)
  assert not os.listdir(tmp_path)  # Nothing written, nothing pre-trained.


def test_find_matches_parsed_specs_seeds_and_recipe(monkeypatch):
  spec, seed = SHIPPED[0]
  family, rest = spec.split(":")
  shuffled = f"{family}:" + ",".join(reversed(rest.split(",")))
  assert testbed.find(shuffled, seed) == testbed.find(spec, seed)
  assert testbed.find(spec, seed) is not None
  assert testbed.find(spec, seed + 1) is None
  assert testbed.find(spec.replace("pretrain=", "pretrain=1"), seed) is None
  # Weights made by another recipe are never taken for today's.
  monkeypatch.setattr(pretrain, "LEARNING_RATE", pretrain.LEARNING_RATE * 2)
  assert testbed.find(spec, seed) is None


@pytest.mark.parametrize("spec,seed", SHIPPED)
def test_shipped_record_is_what_the_command_records(spec, seed):
  path = os.path.join(testbed.ROOT, testbed.folder_name(spec, seed))
  got = _json(path, "pretraining.json")
  want = random_experts.pretraining_record(spec, seed)
  assert {k: got.get(k) for k in want} == want
  _, v = random_experts.parse_spec(spec)
  assert got["steps"] == default_config.PRETRAIN_STEPS
  assert got["shapes"] == v["pretrain_shapes"]
  for key in ("platform", "jax", "jaxlib", "date", "final_losses"):
    assert got[key], key


@pytest.mark.parametrize("spec,seed", SHIPPED)
def test_shipped_folder_is_its_spec_with_a_trained_vision_tower(
    spec, seed, tmp_path):
  path = os.path.join(testbed.ROOT, testbed.folder_name(spec, seed))
  # The same spec and seed without pre-training: written here, in seconds.
  plain_spec = spec.split(",pretrain=")[0]
  plain = random_experts.write(str(tmp_path / "plain"), plain_spec, seed)
  assert set(os.listdir(path)) == set(os.listdir(plain)) | {
      "pretraining.json"}
  for name in os.listdir(plain):
    if name != "model.safetensors":  # Config, tokenizer, preprocessor.
      assert _bytes(path, name) == _bytes(plain, name), name
  shipped, fresh = (load_file(os.path.join(p, "model.safetensors"))
                    for p in (path, plain))
  assert shipped.keys() == fresh.keys()
  assert all(w.dtype == np.float32 for w in shipped.values())
  # numpy's random init is the same on every platform: the text tower and
  # the logit scale are this seed's; the vision tower is trained.
  for k in shipped:
    if not k.startswith(("vision_model.", "visual_projection.")):
      np.testing.assert_array_equal(shipped[k], fresh[k], err_msg=k)
  assert not np.array_equal(
      shipped["vision_model.embeddings.patch_embedding.weight"],
      fresh["vision_model.embeddings.patch_embedding.weight"])
  assert os.path.getsize(os.path.join(path, "model.safetensors")) < 2 << 20
  expert = experts.load(path)
  _, v = random_experts.parse_spec(spec)
  assert expert.image_size == v["image"]
  images = np.random.RandomState(0).rand(2, v["image"], v["image"], 1)
  pixels = expert.normalize_pixels(images)
  assert np.all(np.isfinite(expert.image_features(pixels)))


def test_the_command_regenerates_bit_equal_folders(tmp_path):
  spec, seed = QUICK
  name = testbed.folder_name(spec, seed)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run(
      [sys.executable, "-m", "medbridge_jax.experts.testbed",
       f"--out={tmp_path / 'a'}", "--steps=2", f"--only={name}"],
      check=True, env=env, capture_output=True, timeout=300)
  testbed.write(str(tmp_path / "b"), steps=2, only=[name])
  a, b = tmp_path / "a" / name, tmp_path / "b" / name
  assert sorted(os.listdir(a)) == sorted(os.listdir(b))
  for f in os.listdir(a):
    if f != "pretraining.json":
      assert _bytes(a, f) == _bytes(b, f), f
  ra, rb = _json(a, "pretraining.json"), _json(b, "pretraining.json")
  ra.pop("date"), rb.pop("date")
  assert ra == rb  # Final losses included: same numbers, same platform.
  assert ra["steps"] == 2 and ra["seed"] == seed
  # It records what the shipped folder records, but for the steps.
  shipped = _json(os.path.join(testbed.ROOT, testbed.folder_name(
      *[s for s in SHIPPED if s[1] == seed and "heldout" in s[0]][0])),
                  "pretraining.json")
  drop = ("spec", "steps", "date", "final_losses", "platform")
  assert ({k: v for k, v in ra.items() if k not in drop} ==
          {k: v for k, v in shipped.items() if k not in drop})


def test_the_command_names_a_bad_folder(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "medbridge_jax.experts.testbed",
       f"--out={tmp_path}", "--only=clip_nothing"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=120)
  assert out.returncode == 2
  assert "--only=clip_nothing is no shipped folder" in out.stderr


def test_an_unshipped_spec_pretrains_into_the_cache_with_progress(
    tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("MEDBRIDGE_CACHE", str(tmp_path))
  spec = "clip:width=16,layers=1,heads=2,patch=8,image=16,pretrain=3"
  with caplog.at_level(logging.INFO):
    path = from_config.random_expert_folder(spec, 0)
  assert path.startswith(str(tmp_path))
  assert _json(path, "pretraining.json")["steps"] == 3
  lines = [r.getMessage() for r in caplog.records
           if "Pre-training test-bed expert" in r.getMessage()]
  assert any("step 1/3" in l for l in lines), lines
  assert any("step 3/3" in l and "ETA 0 s" in l for l in lines), lines
