"""random_experts writes genuine HF folders: transformers loads them too."""

import hashlib
import os

import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax import experts
from medbridge_jax.errors import UserError
from medbridge_jax.experts import random_experts

# The default experts' shapes, without the minutes of pre-training
# (tests/test_experts_pretrain.py covers that).
DEFAULT_SPECS = default_config.RANDOM_EXPERT_SHAPES


def _digest(path):
  out = {}
  for name in sorted(os.listdir(path)):
    with open(os.path.join(path, name), "rb") as f:
      out[name] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.parametrize("spec,match", [
    ("vit:width=8,layers=1,heads=1,patch=8,image=16", "family"),
    ("clip:width=8,layers=1,heads=1,patch=8", "missing image="),
    ("clip:width=8,layers=1,heads=1,patch=8,image=16,depth=3", "bad item"),
    ("clip:width=8,layers=1,heads=1,patch=8,image=x", "must be an integer"),
    ("clip:width=8,layers=1,heads=3,patch=8,image=16", "not divisible"),
    ("clip:width=8,layers=1,heads=1,patch=8,image=20", "not a multiple"),
    ("clip:width=8,layers=0,heads=1,patch=8,image=16", "positive"),
    ("clip:width=8,layers=1,heads=1,patch=8,image=16,pretrain=-1", "0 or more"),
    ("clip:width=8,layers=1,heads=1,patch=8,image=16,pretrain=5,"
     "pretrain_shapes=disks", "pretrain_shapes must be one of all, heldout"),
    ("clip:width=8,layers=1,heads=1,patch=8,image=16,"
     "pretrain_shapes=heldout", "pretrain_shapes needs pretrain=STEPS"),
])
def test_bad_specs(spec, match, tmp_path):
  with pytest.raises(UserError, match=match):
    random_experts.write(str(tmp_path / "x"), spec, 0)


def test_spec_defaults():
  family, v = random_experts.parse_spec(
      "siglip:width=48,layers=4,heads=4,patch=8,image=48")
  assert family == "siglip"
  assert v["mlp"] == 192 and v["proj"] == 48 and v["text_len"] == 64
  assert v["text_width"] == 32 and v["text_layers"] == 2
  assert v["pretrain"] == 0 and v["pretrain_shapes"] == "all"
  _, v = random_experts.parse_spec(
      "clip:width=8,layers=1,heads=1,patch=8,image=16,pretrain=2,"
      "pretrain_shapes=heldout")
  assert v["pretrain"] == 2 and v["pretrain_shapes"] == "heldout"


def test_default_experts_are_the_shapes_pretrained():
  specs = default_config.get_default().random_experts
  assert len(specs) == len(DEFAULT_SPECS)
  for spec, shape in zip(specs, DEFAULT_SPECS):
    family, v = random_experts.parse_spec(spec)
    assert (family, dict(v, pretrain=0)) == random_experts.parse_spec(shape)
    assert v["pretrain"] == default_config.PRETRAIN_STEPS > 0


@pytest.mark.parametrize("spec", DEFAULT_SPECS)
def test_deterministic_by_seed(spec, tmp_path):
  a = _digest(random_experts.write(str(tmp_path / "a"), spec, 7))
  b = _digest(random_experts.write(str(tmp_path / "b"), spec, 7))
  c = _digest(random_experts.write(str(tmp_path / "c"), spec, 8))
  assert a == b
  assert a["model.safetensors"] != c["model.safetensors"]
  assert {k: v for k, v in a.items() if k != "model.safetensors"} == {
      k: v for k, v in c.items() if k != "model.safetensors"}


def test_writes_into_an_existing_folder(tmp_path):
  (tmp_path / "old.txt").write_text("kept")
  random_experts.write(str(tmp_path), DEFAULT_SPECS[0], 0)
  assert (tmp_path / "old.txt").read_text() == "kept"
  assert (tmp_path / "model.safetensors").exists()
  assert not [p for p in tmp_path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("spec", DEFAULT_SPECS)
def test_transformers_loads_the_folder_and_agrees(spec, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  path = random_experts.write(str(tmp_path / "e"), spec, 0)
  expert = experts.load(path)
  cls = (transformers.CLIPModel if expert.family == "clip"
         else transformers.SiglipModel)
  model, info = cls.from_pretrained(path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                   "mismatched_keys")), info
  model.eval()
  # The tokenizer transformers picks from the folder gives our ids.
  tok = transformers.AutoTokenizer.from_pretrained(path)
  texts = ["a chest x-ray showing pleural effusion", "no finding"]
  ids, mask = expert.tokenize(texts)
  ref = tok(texts, padding="max_length", max_length=expert.max_length,
            truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  # Features agree (HF inputs NCHW, ours NHWC).
  rng = np.random.RandomState(0)
  images = rng.rand(2, expert.image_size, expert.image_size, 1)
  pixels = np.asarray(expert.normalize_pixels(images))
  with torch.no_grad():
    t_px = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    ref_img = model.get_image_features(pixel_values=t_px)
    ref_txt = model.get_text_features(
        input_ids=torch.from_numpy(ids.astype(np.int64)),
        attention_mask=torch.from_numpy(mask.astype(np.int64)))
  ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
  ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
  np.testing.assert_allclose(expert.image_features(pixels), ref_img,
                             atol=1e-4)
  np.testing.assert_allclose(expert.text_features(ids, mask), ref_txt,
                             atol=1e-4)
  # The preprocessor config is transformers' too.
  proc = transformers.AutoImageProcessor.from_pretrained(path)
  assert tuple(proc.image_mean) == pytest.approx(expert.image_mean)
