"""open_clip folders load into experts that equal open_clip's models.

Tiny `open_clip.CLIP` / `CustomTextCLIP` models (open_clip's own ViT and
text transformer, a timm ViT trunk, a Hugging Face BERT text tower as in
BiomedCLIP) are built offline with noise on every parameter, saved in the
hub's layout and loaded with `experts.load`. Image features at the native
side and at interpolated sides (the reference's position table resized by
open_clip's `resize_pos_embed` / timm's `resample_abs_pos_embed`) and text
features must agree within `parity.TOL` (relative). Our side runs as one
jitted program per configuration.
"""

import json
import os

import jax
import numpy as np
import pytest

from medbridge_jax import experts
from medbridge_jax.errors import UserError
from medbridge_jax.experts import loader
from medbridge_jax.experts import zero_shot
from medbridge_jax.experts.formats import open_clip as reader

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

# pylint: disable=g-import-not-at-top,wrong-import-order
import open_clip_fixtures as fixtures
from parity import assert_close
# pylint: enable=g-import-not-at-top,wrong-import-order

LABELS = ("atelectasis", "pleural effusion", "edema")
CLIP_EOS = 513  # random_experts' CLIP vocabulary: the end token is last.

OPENAI = {  # OpenAI's layout: QuickGELU, pre-norm, class token.
    "embed_dim": 24, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                   "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 40, "width": 32, "heads": 4,
                 "layers": 2}}
LAION_VARIANT = {  # GELU, layer scale, no ln_pre, mean pooling, `text.*`.
    "embed_dim": 16, "custom_text": True,
    "vision_cfg": {"image_size": 24, "layers": 2, "width": 48,
                   "head_width": 16, "patch_size": 4, "mlp_ratio": 2.0,
                   "ls_init_value": 0.1, "no_ln_pre": True,
                   "pool_type": "avg", "norm_kwargs": {"eps": 1e-6}},
    "text_cfg": {"context_length": 40, "width": 32, "heads": 2,
                 "layers": 1, "ls_init_value": 0.1, "pool_type": "eos",
                 "eos_id": CLIP_EOS}}
BIOMEDCLIP = {  # A timm ViT trunk and a BERT text tower (hf_model_name).
    "embed_dim": 16,
    "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224",
                   "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_model_name": None, "hf_model_pretrained": False,
                 "hf_tokenizer_name": None, "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler",
                 "context_length": 24}}

# (id, model_cfg, image sides (h, w): the native one first, batch size).
CONFIGS = [
    ("openai_quickgelu", OPENAI, [(32, 32), (48, 40)], 2),
    ("gelu_layer_scale_avg", LAION_VARIANT, [(24, 24), (40, 40), (16, 20)],
     2),
    ("timm_trunk_bert_text", BIOMEDCLIP, [(224, 224), (240, 240)], 1),
]

_BUILT = {}


def _pixels(sides, batch):
  rng = np.random.RandomState(0)
  return [rng.randn(batch, h, w, 3).astype(np.float32) for h, w in sides]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _resized_reference(model, cfg, side):
  """open_clip's model rebuilt for `side`, its position table resized by
  open_clip's own resize_pos_embed (or timm's resample_abs_pos_embed)."""
  if cfg["vision_cfg"].get("timm_model_name"):
    trunk = timm.create_model(cfg["vision_cfg"]["timm_model_name"],
                              pretrained=False, num_classes=0, img_size=side)
    state = dict(model.visual.trunk.state_dict())
    state["pos_embed"] = timm.layers.resample_abs_pos_embed(
        state["pos_embed"], [s // 16 for s in side], num_prefix_tokens=1)
    trunk.load_state_dict(state)
    proj = model.visual.head.proj.weight
    return lambda x: trunk.eval()(x) @ proj.T
  cfg = dict(cfg, vision_cfg=dict(cfg["vision_cfg"], image_size=list(side)))
  other = fixtures.build(cfg)
  state = dict(model.state_dict())
  open_clip.model.resize_pos_embed(state, other)
  other.load_state_dict(state)
  return other.encode_image


def _build(config, tmp_path_factory):
  name, cfg, sides, batch = config
  root = tmp_path_factory.mktemp(name)
  cfg = dict(cfg)
  if cfg["text_cfg"].get("hf_model_name", "") is None:
    # 64-wide heads, BERT's convention, which a folder without the BERT
    # config.json relies on (test_bert_config_from_tensors...).
    bert_dir = fixtures.write_bert(str(root / "bert"), vocab_size=80,
                                   width=128, heads=2, mlp=96)
    cfg["text_cfg"] = dict(cfg["text_cfg"], hf_model_name=bert_dir)
  path, model, cfg = fixtures.folder(str(root / "expert"), cfg)
  expert = experts.load(path)
  pixels = _pixels(sides, batch)
  ids, mask = expert.tokenize(zero_shot.prompts(LABELS))

  def run(params, pixels, ids, mask):
    images = [expert.vision.apply({"params": params["vision"]}, p)[0]
              for p in pixels]
    text = expert.text.apply({"params": params["text"]}, ids, mask)[0]
    return images, text

  images, text = jax.tree.map(
      np.asarray, jax.jit(run)(expert.params, pixels, ids, mask))
  with torch.no_grad():
    ref_images = [model.encode_image(_nchw(pixels[0])).numpy()]
    for side, p in zip(sides[1:], pixels[1:]):
      ref_images.append(
          _resized_reference(model, cfg, side)(_nchw(p)).numpy())
    # open_clip's own tokenizer pads with 0; the HF files pad with the end
    # token. Either way the end token is pooled, so the results agree.
    ref_ids = ids if expert.text.config.family == "bert" else np.where(
        mask.astype(bool), ids, 0)
    ref_text = model.encode_text(torch.from_numpy(
        ref_ids.astype(np.int64))).numpy()
  return dict(expert=expert, model=model, cfg=cfg, sides=sides, ids=ids,
              mask=mask, images=images, text=text, ref_images=ref_images,
              ref_text=ref_text, path=path)


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def built(request, tmp_path_factory):
  name = request.param[0]
  if name not in _BUILT:
    _BUILT[name] = _build(request.param, tmp_path_factory)
  return _BUILT[name]


def test_image_features_native_and_interpolated(built):
  for side, ours, theirs in zip(built["sides"], built["images"],
                                built["ref_images"]):
    assert_close(ours, theirs, f"image features at {side}")


def test_text_features(built):
  ids, mask = built["ids"], built["mask"]
  assert (mask.sum(axis=1) < ids.shape[1]).all()  # Padding happened.
  assert ids.shape[1] == built["cfg"]["text_cfg"]["context_length"]
  assert_close(built["text"], built["ref_text"], "text features")


def test_scalars_and_preprocessing(built):
  expert, model = built["expert"], built["model"]
  assert expert.family == "open_clip"
  assert expert.image_mean == fixtures.MEAN
  assert expert.image_std == fixtures.STD
  assert float(expert.logit_scale) == pytest.approx(
      float(model.logit_scale.detach().exp()), rel=1e-6)
  assert expert.image_size == built["sides"][0][0]


@pytest.mark.parametrize("built", [CONFIGS[2]], indirect=True,
                         ids=[CONFIGS[2][0]])
def test_bert_config_from_tensors_without_its_folder(built, tmp_path):
  """BiomedCLIP's hub folder names a hub BERT that is not on disk: its
  shape comes from the tensors, and the weights are the same."""
  path = built["path"]
  moved = tmp_path / "expert"
  moved.mkdir()
  for f in os.listdir(path):
    with open(os.path.join(path, f), "rb") as src:
      (moved / f).write_bytes(src.read())
  cfg = json.loads((moved / reader.CONFIG).read_text())
  cfg["model_cfg"]["text_cfg"]["hf_model_name"] = (
      "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract")
  (moved / reader.CONFIG).write_text(json.dumps(cfg))
  a, b = loader.read(path), loader.read(str(moved))
  assert a.text == b.text
  la = jax.tree_util.tree_leaves_with_path(a.params)
  lb = dict(jax.tree_util.tree_leaves_with_path(b.params))
  assert len(la) == len(lb)
  for k, v in la:
    np.testing.assert_array_equal(v, lb[k])


# ---- Architecture from configs and names (no compiles) ----------------------

@pytest.mark.parametrize("name", [
    "vit_tiny_patch16_224", "vit_small_patch32_224", "vit_base_patch16_384",
    "vit_large_patch16_224", "vit_huge_patch14_224"])
def test_timm_names_match_timm(name):
  width, depth, heads, patch, side = reader.timm_architecture(name, "test")
  with torch.device("meta"):
    model = timm.create_model(name, pretrained=False)
  assert width == model.embed_dim
  assert depth == len(model.blocks)
  assert heads == model.blocks[0].attn.num_heads
  assert (patch, patch) == tuple(model.patch_embed.patch_size)
  assert (side, side) == tuple(model.patch_embed.img_size)
  assert 4 * width == model.blocks[0].mlp.fc1.out_features
  assert model.blocks[0].norm1.eps == 1e-6
  assert model.blocks[0].attn.qkv.bias is not None
  assert model.has_class_token and not model.no_embed_class
  assert isinstance(model.norm_pre, torch.nn.Identity)  # No pre-norm.
  assert model.global_pool == "token"


def _config_folder(tmp_path, model_cfg):
  (tmp_path / reader.CONFIG).write_text(json.dumps({"model_cfg": model_cfg}))
  return str(tmp_path)


@pytest.mark.parametrize("where,key,value", [
    ("vision_cfg", "attentional_pool", True),
    ("vision_cfg", "qk_norm", True),
    ("vision_cfg", "block_type", "custom"),
    ("vision_cfg", "pool_type", "none"),
    ("vision_cfg", "pos_embed_type", "sin_cos_2d"),
    ("vision_cfg", "timm_model_name", "vit_base_patch16_siglip_224"),
    ("vision_cfg", "layers", [3, 4, 6, 3]),
    ("vision_cfg", "norm_kwargs", {"elementwise_affine": False}),
])
def test_unsupported_vision_options_are_refused(tmp_path, where, key,
                                                value):
  cfg = json.loads(json.dumps(OPENAI))
  cfg[where][key] = value
  path = _config_folder(tmp_path, cfg)
  with pytest.raises(UserError, match=key) as e:
    loader.vision_config(path)
  assert reader.CONFIG in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("no_causal_mask", True), ("pool_type", "last"), ("embed_cls", True),
    ("proj_bias", True), ("scale_attn", True)])
def test_unsupported_text_options_are_refused(tmp_path, key, value):
  cfg = json.loads(json.dumps(OPENAI))
  cfg["text_cfg"][key] = value
  path, _, _ = fixtures.folder(str(tmp_path / "x"), cfg)
  with pytest.raises(UserError, match=key):
    loader.read(path)


def test_final_ln_after_pool_with_mean_pooling_is_refused(tmp_path):
  cfg = json.loads(json.dumps(OPENAI))
  cfg["vision_cfg"].update(pool_type="avg", final_ln_after_pool=True)
  with pytest.raises(UserError, match="final_ln_after_pool"):
    loader.vision_config(_config_folder(tmp_path, cfg))


def test_vision_config_from_the_config_alone(tmp_path):
  v = loader.vision_config(_config_folder(tmp_path, LAION_VARIANT))
  assert (v.hidden_size, v.num_heads, v.mlp_dim, v.patch_size,
          v.image_size) == (48, 3, 96, 4, 24)
  assert (v.act, v.eps, v.pre_norm, v.pooling, v.layer_scale,
          v.projection_dim) == ("gelu", 1e-6, False, "mean", True, 16)
  t = loader.vision_config(_config_folder(tmp_path, BIOMEDCLIP))
  assert (t.hidden_size, t.num_layers, t.num_heads, t.patch_size,
          t.image_size, t.eps, t.patch_bias, t.pre_norm) == (
              192, 12, 3, 16, 224, 1e-6, True, False)


def test_no_tokenizer_files_is_vision_only(tmp_path):
  path, _, _ = fixtures.folder(str(tmp_path / "x"), OPENAI, tokenizer=False)
  found = loader.read(path)
  assert found.text is None and found.tokenizer is None
  assert "no tokenizer files" in found.vision_only_reason
  assert set(found.params) == {"vision"}


def test_pickle_folder_is_refused_with_the_convert_command(tmp_path):
  model = fixtures.build(json.loads(json.dumps(
      dict(OPENAI, text_cfg=dict(OPENAI["text_cfg"], vocab_size=514)))))
  path = tmp_path / "x"
  fixtures.save(str(path), model, OPENAI)
  os.remove(path / reader.SINGLE)
  torch.save(model.state_dict(), path / reader.PICKLE)
  with pytest.raises(UserError) as e:
    experts.load(str(path))
  message = str(e.value)
  assert "python -m medbridge_jax.experts.convert" in message
  assert str(path / reader.PICKLE) in message
