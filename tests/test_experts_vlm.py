"""A VLM folder's vision tower as a vision-only expert (formats/hf_vlm.py).

Tiny random LLaVA, LLaVA-NeXT, PaliGemma and Gemma 3 models are built and
saved with transformers (tests/vlm_fixtures.py); `Expert.image_features`
must equal the VLM's own vision tower (max relative error <= 1e-4), every
published key layout must load the same weights, and only the vision
tower's shards may be read.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-order
import vlm_fixtures as vf
from medbridge_jax import experts
from medbridge_jax.errors import UserError
from medbridge_jax.experts import loader
from medbridge_jax.experts import preprocessing
from medbridge_jax.experts import tensors
from medbridge_jax.experts.formats import hf_vlm
from parity import assert_close
# pylint: enable=g-import-not-at-top,wrong-import-order

# id -> (kind, fixture kwargs). Sides differ so a grid mix-up shows.
CONFIGS = {
    "llava": ("llava", dict()),
    "llava_next": ("llava_next", dict(seed=3)),
    "paligemma": ("paligemma", dict(image=24, patch=4, seed=1)),
    "paligemma_head": ("paligemma", dict(head=True, seed=4)),
    "gemma3": ("gemma3", dict(image=28, patch=7, seed=2)),
}
# (config id, side): each is one compile of Expert.image_features.
FEATURE_CASES = [("llava", "native"), ("llava", "interpolated"),
                 ("paligemma", "native"), ("paligemma", "interpolated"),
                 ("gemma3", "native"), ("gemma3", "interpolated"),
                 ("llava_next", "interpolated"),
                 ("paligemma_head", "interpolated")]
# The configs whose folders the layout and shard tests rewrite.
BASE = ("llava", "paligemma", "gemma3")

_FOLDERS = {}
_EXPERTS = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """id -> (folder, torch model), each built once."""
  def get(name):
    if name not in _FOLDERS:
      kind, kwargs = CONFIGS[name]
      _FOLDERS[name] = vf.vlm_folder(str(tmp_path_factory.mktemp(name)),
                                     kind, **kwargs)
    return _FOLDERS[name]
  return get


@pytest.fixture(scope="module")
def built(folder):  # pylint: disable=redefined-outer-name
  """id -> (folder, torch model, our expert), each loaded once."""
  def get(name):
    path, model = folder(name)
    if name not in _EXPERTS:
      _EXPERTS[name] = experts.load(path)
    return path, model, _EXPERTS[name]
  return get


def reference(model, expert, pixels):
  """The features of the VLM's own vision tower (transformers 5.24's
  CLIPVisionModel / SiglipVisionModel at `model.model.vision_tower`).

  CLIP: `pooler_output` = post_layernorm(last_hidden_state[:, 0]), the
  class token after the post layer norm, no projection. SigLIP without its
  head: `pooler_output` is None and `last_hidden_state` is already
  post_layernorm(encoder output) (SiglipVisionModel.forward), so the
  reference is its mean over all tokens (SigLIP has no class token).
  SigLIP with its head: `pooler_output` = head(last_hidden_state).
  """
  tower = model.model.vision_tower
  px = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = tower(pixel_values=px, interpolate_pos_encoding=True)
  if expert.family == "siglip" and not tower.config.vision_use_head:
    assert out.pooler_output is None
    return out.last_hidden_state.mean(dim=1).numpy()
  return out.pooler_output.numpy()


def _side(expert, which):
  c = expert.vision.config
  if which == "native":
    return (c.image_size, c.image_size)
  return (c.image_size + 2 * c.patch_size, c.image_size - c.patch_size)


def _params_equal(a, b):
  """Every parameter array of two loaded experts identical."""
  flat_a = {k: np.asarray(v) for k, v in _flatten(a.params)}
  flat_b = {k: np.asarray(v) for k, v in _flatten(b.params)}
  assert sorted(flat_a) == sorted(flat_b)
  for k, v in flat_a.items():
    assert np.array_equal(v, flat_b[k]), k


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _copy(path, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(path, dst)
  return dst


def _edit_json(file, change):
  with open(file) as f:
    body = json.load(f)
  change(body)
  with open(file, "w") as f:
    json.dump(body, f)


@pytest.mark.parametrize("name,side", FEATURE_CASES,
                         ids=[f"{n}-{s}" for n, s in FEATURE_CASES])
def test_features_equal_the_vlm_vision_tower(built, name, side):
  _, model, expert = built(name)
  pixels = np.random.RandomState(0).randn(2, *_side(expert, side), 3)
  pixels = pixels.astype(np.float32)
  ours = np.asarray(expert.image_features(pixels))
  theirs = reference(model, expert, pixels)
  assert ours.shape == theirs.shape == (2, expert.vision.hidden_size)
  assert_close(ours, theirs, f"{name} {side} image features")


def test_tower_config_follows_the_checkpoint(built):
  """The pooling each contract names, and no projection."""
  want = {"llava": ("clip", "class"), "llava_next": ("clip", "class"),
          "paligemma": ("siglip", "mean"), "gemma3": ("siglip", "mean"),
          "paligemma_head": ("siglip", "map")}
  for name, (family, pooling) in want.items():
    c = built(name)[2].vision.config
    assert (c.family, c.pooling, c.projection_dim) == (family, pooling, 0)
    assert c.image_size == CONFIGS[name][1].get("image", 32)
    assert c.patch_size == CONFIGS[name][1].get("patch", 8)


@pytest.mark.parametrize("name", BASE)
@pytest.mark.parametrize("layout", sorted(vf.LAYOUTS))
def test_every_key_layout_loads_the_same_tower(built, tmp_path, name,
                                               layout):
  """The hub's layout and transformers 4's module names load the weights
  the transformers 5 save does (whose features match the reference), so
  they give the same features."""
  path, _, expert = built(name)
  other = vf.relayout(path, str(tmp_path / layout), layout)
  prefix = dict(vf.LAYOUTS[layout])["vision_tower."]
  vision = [n for n in vf.weight_map(other) if "vision_tower" in n]
  assert vision and all(n.startswith(prefix) for n in vision)
  loaded = experts.load(other)
  assert loaded.vision.config == expert.vision.config
  _params_equal(loaded, expert)


def test_a_single_file_loads_the_same_tower(built, tmp_path):
  """A VLM saved whole (model.safetensors, no index)."""
  _, model, expert = built("paligemma")
  model.save_pretrained(str(tmp_path))
  assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == [
      "model.safetensors"]
  loaded = experts.load(str(tmp_path))
  assert loaded.vision.config == expert.vision.config
  _params_equal(loaded, expert)


@pytest.mark.parametrize("name", BASE)
def test_language_model_shards_are_never_opened(built, tmp_path, name):
  path, _, expert = built(name)
  copy = _copy(path, tmp_path)
  shards = vf.shards(copy)
  no_vision = sorted(s for s, held in shards.items()
                     if not any(n.startswith("vision_tower.") for n in held))
  mixed = [s for s, held in shards.items()
           if s not in no_vision and
           not all(n.startswith("vision_tower.") for n in held)]
  # The fixture must have both: a shard only the language model uses, and
  # one where the tower's tensors sit next to others (read selectively).
  assert no_vision and mixed, shards
  for shard in no_vision:
    vf.corrupt(os.path.join(copy, shard))
  # The corruption is real: reading every tensor fails on that shard.
  with pytest.raises(UserError, match=re.escape(no_vision[0])):
    tensors.read(copy, hf_vlm.SINGLE, hf_vlm.INDEX)
  loaded = experts.load(copy)
  assert loaded.vision.config == expert.vision.config
  _params_equal(loaded, expert)


def test_a_corrupt_vision_shard_is_an_error_naming_it(folder, tmp_path):
  path, _ = folder("gemma3")
  copy = _copy(path, tmp_path)
  shard = sorted(s for s, held in vf.shards(copy).items()
                 if any(n.startswith("vision_tower.") for n in held))[-1]
  vf.corrupt(os.path.join(copy, shard))
  with pytest.raises(UserError, match=re.escape(shard)):
    experts.load(copy)


@pytest.mark.parametrize("name,use_head", [("paligemma", True),
                                           ("paligemma_head", False)])
def test_head_config_and_tensors_must_agree(folder, tmp_path, name,
                                            use_head):
  copy = _copy(folder(name)[0], tmp_path)

  def flip(body):
    body["vision_config"]["vision_use_head"] = use_head
  _edit_json(os.path.join(copy, "config.json"), flip)
  with pytest.raises(UserError, match=r"vision_use_head.*head\.\*"):
    experts.load(copy)


def test_head_key_absent_means_transformers_default(folder, tmp_path):
  """SigLIP's default vision_use_head is true: a headless tower whose
  config.json leaves the key out is refused, not read half."""
  copy = _copy(folder("gemma3")[0], tmp_path)
  _edit_json(os.path.join(copy, "config.json"),
             lambda body: body["vision_config"].pop("vision_use_head"))
  with pytest.raises(UserError, match="set \"vision_use_head\": false"):
    experts.load(copy)


def test_pixel_normalisation_and_vision_only(built):
  want = {"llava": vf.MEAN_STD["llava"],  # processor_config.json
          "paligemma": vf.MEAN_STD["paligemma"],  # preprocessor_config.json
          "gemma3": vf.MEAN_STD["gemma3"],
          "llava_next": preprocessing.FAMILY_MEAN_STD["clip"]}  # No file.
  assert os.path.isfile(os.path.join(built("llava")[0],
                                     "processor_config.json"))
  for name, (mean, std) in want.items():
    path, _, expert = built(name)
    assert expert.format == "hf_vlm"
    np.testing.assert_allclose(expert.image_mean, mean, rtol=1e-7)
    np.testing.assert_allclose(expert.image_std, std, rtol=1e-7)
    assert expert.text is None and not expert.has_text
    assert set(expert.params) == {"vision"}
    assert "language model" in expert.vision_only_reason
    with pytest.raises(UserError, match="vision-only.*language model"):
      expert.require_text("zero-shot prompts")


@pytest.mark.parametrize("name", ["llava", "paligemma_head", "gemma3"])
def test_vision_config_from_config_json_alone(built, tmp_path, name):
  path, _, expert = built(name)
  alone = tmp_path / "alone"
  alone.mkdir()
  shutil.copy(os.path.join(path, "config.json"), alone)
  assert loader.vision_config(str(alone)) == expert.vision.config


def test_an_index_without_a_vision_tower_is_an_error(folder, tmp_path):
  copy = _copy(folder("llava")[0], tmp_path)

  def drop(body):
    body["weight_map"] = {k: v for k, v in body["weight_map"].items()
                          if not k.startswith("vision_tower.")}
  _edit_json(os.path.join(copy, vf.INDEX), drop)
  with pytest.raises(UserError, match=r"no vision tower tensors \(found "
                     r"tensors under: language_model, multi_modal_projector"
                     r"\); expected '\[model\.\]vision_tower\."):
    experts.load(copy)


@pytest.mark.parametrize("change,message", [
    (dict(model_type="qwen2_vl"),
     r"unknown model_type 'qwen2_vl'.*gemma3.*llava.*llava_next.*paligemma"),
    (dict(model_type="gemma3_text"), "language model alone"),
])
def test_unsupported_model_types(folder, tmp_path, change, message):
  copy = _copy(folder("gemma3")[0], tmp_path)
  _edit_json(os.path.join(copy, "config.json"), lambda b: b.update(change))
  with pytest.raises(UserError, match=message):
    experts.load(copy)


def test_unsupported_vision_tower(folder, tmp_path):
  copy = _copy(folder("llava")[0], tmp_path)

  def pixtral(body):
    body["vision_config"]["model_type"] = "pixtral"
  _edit_json(os.path.join(copy, "config.json"), pixtral)
  with pytest.raises(UserError, match=r"vision_config.model_type 'pixtral'"
                     r".*clip_vision_model, siglip_vision_model"):
    experts.load(copy)
  with pytest.raises(UserError, match="unsupported vision-language "
                     "model_type 'clip'.*llava"):
    hf_vlm.parse_config({"model_type": "clip"}, "config.json")
