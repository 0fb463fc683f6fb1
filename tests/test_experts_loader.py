"""Loading HF folders: every bad input is a UserError that names the thing."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from medbridge_jax import experts
from medbridge_jax.errors import UserError
from medbridge_jax.experts import random_experts

CLIP = "clip:width=32,layers=2,heads=4,patch=8,image=32,text_len=24"
SIGLIP = "siglip:width=32,layers=2,heads=4,patch=8,image=32,text_len=16"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("experts")
  return {"clip": random_experts.write(str(root / "clip"), CLIP, 0),
          "siglip": random_experts.write(str(root / "siglip"), SIGLIP, 0)}


@pytest.fixture
def clip_copy(folders, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(folders["clip"], dst)
  return dst


def _weights(path):
  return os.path.join(path, "model.safetensors")


def _edit_config(path, **changes):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(file, "w") as f:
    json.dump(cfg, f)


def test_loads_both_families(folders):
  for family, path in folders.items():
    e = experts.load(path)
    assert e.family == family and e.name == family and e.path == path
    assert e.image_size == 32
    assert e.vision.num_layers == 2 and e.vision.hidden_size == 32
    assert set(e.params) == ({"vision", "text", "logit_scale"} |
                             ({"logit_bias"} if family == "siglip" else set()))
    assert all(a.dtype == jnp.float32 for a in
               jax.tree.leaves(e.params))


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(UserError, match="expert folder not found"):
    experts.load(str(tmp_path / "nope"))
  with pytest.raises(UserError, match="no supported expert format.*found: "
                     "nothing.*closest is hf_clip: config.json"):
    experts.load(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="cannot read config.json"):
    experts.load(str(tmp_path))


def test_unknown_and_single_tower_model_types(clip_copy):
  _edit_config(clip_copy, model_type="bert")
  with pytest.raises(UserError, match="unknown model_type 'bert'"):
    experts.load(clip_copy)
  _edit_config(clip_copy, model_type="clip_text_model")
  with pytest.raises(UserError, match="text tower alone.*clip_text_model"):
    experts.load(clip_copy)


def test_pickle_weights_are_refused(clip_copy):
  os.remove(_weights(clip_copy))
  with pytest.raises(UserError, match="no weights"):
    experts.load(clip_copy)
  with open(os.path.join(clip_copy, "pytorch_model.bin"), "wb") as f:
    f.write(b"not even a pickle")
  with pytest.raises(UserError) as e:
    experts.load(clip_copy)
  msg = str(e.value)
  assert "pytorch_model.bin" in msg and "arbitrary code" in msg
  assert "medbridge_jax.experts.convert" in msg


def test_wrong_shape_names_the_tensor_and_file(clip_copy):
  t = load_file(_weights(clip_copy))
  key = "vision_model.encoder.layers.1.mlp.fc1.weight"
  t[key] = np.zeros((3, 3), np.float32)
  save_file(t, _weights(clip_copy))
  with pytest.raises(UserError, match=f"'{key}' in .*model.safetensors has "
                     r"shape \(3, 3\); config.json implies \(128, 32\)"):
    experts.load(clip_copy)


def test_missing_and_unexpected_tensors(clip_copy):
  t = load_file(_weights(clip_copy))
  t["vision_model.surprise.weight"] = np.zeros(2, np.float32)
  save_file(t, _weights(clip_copy))
  with pytest.raises(UserError,
                     match="unexpected tensor 'vision_model.surprise.weight'"):
    experts.load(clip_copy)
  del t["vision_model.surprise.weight"]
  del t["text_projection.weight"]
  save_file(t, _weights(clip_copy))
  with pytest.raises(UserError,
                     match="missing tensor 'text_projection.weight'"):
    experts.load(clip_copy)


def test_config_and_weights_disagree(clip_copy):
  cfg = json.load(open(os.path.join(clip_copy, "config.json")))
  cfg["vision_config"]["num_hidden_layers"] = 3
  json.dump(cfg, open(os.path.join(clip_copy, "config.json"), "w"))
  with pytest.raises(UserError, match="missing tensor 'vision_model.encoder"
                     r".layers.2.self_attn.q_proj.weight' in the checkpoint"):
    experts.load(clip_copy)


def test_old_position_id_buffers_and_half_precision_are_accepted(
    folders, clip_copy):
  t = load_file(_weights(clip_copy))
  t["text_model.embeddings.position_ids"] = np.arange(24)[None]
  t["vision_model.embeddings.position_ids"] = np.arange(17)[None]
  key = "vision_model.encoder.layers.0.mlp.fc2.weight"
  t[key] = t[key].astype(np.float16)
  save_file(t, _weights(clip_copy))
  a, b = experts.load(folders["clip"]), experts.load(clip_copy)
  got = b.params["vision"]["layers_0"]["mlp"]["fc2"]["kernel"]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, a.params["vision"]["layers_0"]["mlp"]["fc2"]["kernel"], atol=1e-3)


def _shard(path, index_edit=None):
  t = load_file(_weights(path))
  os.remove(_weights(path))
  names = sorted(t)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  weight_map = {}
  for file, keys in shards.items():
    save_file({k: t[k] for k in keys}, os.path.join(path, file))
    weight_map.update({k: file for k in keys})
  if index_edit:
    index_edit(weight_map)
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_sharded_safetensors(folders, clip_copy):
  _shard(clip_copy)
  a, b = experts.load(folders["clip"]), experts.load(clip_copy)
  flat = lambda e: jax.tree_util.tree_leaves_with_path(e.params)
  for (ka, va), (kb, vb) in zip(flat(a), flat(b)):
    assert ka == kb
    np.testing.assert_array_equal(va, vb)


def test_sharded_missing_shard(clip_copy):
  _shard(clip_copy)
  os.remove(os.path.join(clip_copy, "model-00002-of-00002.safetensors"))
  with pytest.raises(UserError, match="shard model-00002-of-00002.safetensors "
                     "listed in .* is missing"):
    experts.load(clip_copy)


def test_sharded_index_disagrees_with_shard(clip_copy):
  def lie(weight_map):
    weight_map["visual_projection.weight"] = (
        "model-00001-of-00002.safetensors")
  _shard(clip_copy, lie)
  with pytest.raises(UserError, match="'visual_projection.weight' is mapped "
                     "to model-00001-of-00002.safetensors by .* but that "
                     "shard does not hold it"):
    experts.load(clip_copy)


def test_missing_tokenizer_files(folders, tmp_path):
  clip = str(tmp_path / "clip")
  shutil.copytree(folders["clip"], clip)
  os.remove(os.path.join(clip, "merges.txt"))
  with pytest.raises(UserError, match="vocab.json and merges.txt"):
    experts.load(clip)
  siglip = str(tmp_path / "siglip")
  shutil.copytree(folders["siglip"], siglip)
  os.remove(os.path.join(siglip, "spiece.model"))
  with pytest.raises(UserError, match="spiece.model missing"):
    experts.load(siglip)


def test_no_tokenizer_files_at_all_is_a_vision_only_expert(folders, tmp_path):
  clip = str(tmp_path / "clip")
  shutil.copytree(folders["clip"], clip)
  for name in os.listdir(clip):
    if name.startswith(("vocab", "merges", "tokenizer", "special_tokens")):
      os.remove(os.path.join(clip, name))
  e, full = experts.load(clip), experts.load(folders["clip"])
  assert not e.has_text and full.has_text
  assert e.text is None and set(e.params) == {"vision"}
  assert "no tokenizer files" in e.vision_only_reason
  flat = lambda p: jax.tree_util.tree_leaves_with_path(p)
  for (ka, va), (kb, vb) in zip(flat(e.params["vision"]),
                                flat(full.params["vision"])):
    assert ka == kb
    np.testing.assert_array_equal(va, vb)
  with pytest.raises(UserError, match="vision-only.*no tokenizer files"):
    e.encode_text(["a chest x-ray"])


def test_preprocessor_config(folders, clip_copy):
  e = experts.load(folders["clip"])
  assert e.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
  file = os.path.join(clip_copy, "preprocessor_config.json")
  json.dump({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.1, 0.2, 0.25]},
            open(file, "w"))
  e = experts.load(clip_copy)
  assert e.image_mean == (0.5, 0.4, 0.3) and e.image_std == (0.1, 0.2, 0.25)
  gray = np.full((2, 4, 4, 1), 0.6, np.float32)
  x = np.asarray(e.normalize_pixels(gray))
  assert x.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(x[0, 0, 0], [1.0, 1.0, 1.2], rtol=1e-5)
  rgb = np.full((4, 4, 3), 0.5, np.float32)  # No batch axis is fine too.
  np.testing.assert_allclose(np.asarray(e.normalize_pixels(rgb))[0, 0],
                             [0, .5, .8],
                             atol=1e-6)
  with pytest.raises(UserError, match="channels last"):
    e.normalize_pixels(np.zeros((2, 3, 4, 4)))
  os.remove(file)
  assert experts.load(clip_copy).image_std == pytest.approx(
      (0.26862954, 0.26130258, 0.27577711))
  json.dump({"image_mean": [0.5], "image_std": [0.1, 0.2, 0.3]},
            open(file, "w"))
  with pytest.raises(UserError, match="image_mean .* 3 numbers"):
    experts.load(clip_copy)


def test_siglip_default_normalisation(folders):
  e = experts.load(folders["siglip"])
  assert e.image_mean == (0.5, 0.5, 0.5) and e.image_std == (0.5, 0.5, 0.5)
  np.testing.assert_allclose(e.normalize_pixels(np.ones((1, 2, 2, 1))), 1.0)


def test_tokenize(folders):
  for family, length in (("clip", 24), ("siglip", 16)):
    e = experts.load(folders[family])
    ids, mask = e.tokenize(["a chest x-ray showing atelectasis",
                            "no finding",
                            "a very long sentence " * 10])
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert ids.shape == mask.shape == (3, length) == (3, e.max_length)
    assert mask[1].sum() < mask[0].sum() <= length and mask[2].all()
    eos = e.text.config.eos_token_id
    assert (ids == eos).any(axis=1).all()  # Truncation keeps the end token.


def test_bad_feature_inputs(folders):
  e = experts.load(folders["clip"])
  with pytest.raises(UserError, match="NCHW"):
    e.image_features(np.zeros((1, 3, 32, 32), np.float32))
  with pytest.raises(UserError, match="3 channels"):
    e.image_features(np.zeros((1, 32, 32, 1), np.float32))
  with pytest.raises(UserError, match="input_ids must be"):
    e.text_features(np.zeros((24,), np.int32))
  with pytest.raises(UserError, match="longer than"):
    e.text_features(np.zeros((1, 25), np.int32))


def test_compute_dtype_keeps_params_float32(folders):
  e = experts.load(folders["siglip"], dtype=jnp.bfloat16,
                   attention_impl="xla")
  assert e.vision.dtype == e.text.dtype == jnp.bfloat16 == e.dtype
  assert e.vision.attention_impl == "xla"
  assert all(a.dtype == jnp.float32 for a in
             jax.tree.leaves(e.params))
  f32 = e.with_dtype(jnp.float32)
  assert f32.vision.dtype == jnp.float32 and f32.params is e.params
