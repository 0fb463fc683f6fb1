"""DINOv2 folders (with and without registers) equal transformers' models.

Tiny random `Dinov2Model` / `Dinov2WithRegistersModel`s are built with
transformers (offline), every parameter given random values (layer scales
included: initialised ones are all equal and would hide a swap), saved with
save_pretrained and loaded with `experts.load`; features and every hidden
state are compared with the PyTorch model at the native side, a larger one
and a non-square one (positions interpolated as each model does it).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-order
from parity import assert_close
from safetensors.numpy import load_file, save_file
from medbridge_jax import experts
from medbridge_jax.errors import UserError
from medbridge_jax.experts import loader
from medbridge_jax.experts import positions
# pylint: enable=g-import-not-at-top,wrong-import-order

MEAN, STD = (0.51, 0.49, 0.47), (0.27, 0.26, 0.28)

# (id, registers, config kwargs, input (height, width) sides: native first).
CONFIGS = [
    ("dinov2_p7_i28", 0,
     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          mlp_ratio=3, patch_size=7, image_size=28),
     ((28, 28), (42, 42), (31, 50))),
    # Head dim 9, no q/k/v biases, tanh GELU, three registers.
    ("dinov2_reg3_p7_i35", 3,
     dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
          mlp_ratio=2, patch_size=7, image_size=35, qkv_bias=False,
          hidden_act="gelu_pytorch_tanh", num_register_tokens=3),
     ((35, 35), (49, 49), (21, 44))),
]


# ---- The antialiased bicubic resize -----------------------------------------

def _torch_resize(table, new, antialias):
  t = torch.from_numpy(table.transpose(2, 0, 1))[None]
  out = torch.nn.functional.interpolate(t, size=new, mode="bicubic",
                                        align_corners=False,
                                        antialias=antialias)
  return out[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("grid,new", [
    ((5, 5), (8, 8)),  # Up.
    ((5, 5), (3, 4)),  # Down.
    ((6, 4), (2, 9)),  # Non-square: down in height, up in width.
    ((37, 37), (16, 20)),  # RAD-DINO's table to a small non-square grid.
    ((3, 3), (1, 1)),
])
def test_bicubic_antialias_matrix_matches_torch(grid, new):
  table = np.random.RandomState(0).randn(*grid, 7).astype(np.float32)
  ref = _torch_resize(table, new, antialias=True)
  got = positions.resize(jnp.asarray(table.reshape(-1, 7)), grid, new,
                         "bicubic_antialias")
  np.testing.assert_allclose(np.asarray(got).reshape(*new, 7), ref,
                             atol=1e-5)
  # The plain kernel is another filter: the test tells them apart.
  assert np.abs(_torch_resize(table, new, antialias=False) - ref).max() > 1e-2


def test_resize_refuses_unknown_kind():
  with pytest.raises(ValueError, match="bilinear"):
    positions.resize(jnp.zeros((4, 2)), (2, 2), (3, 3), "bilinear")


# ---- Tiny transformers folders ----------------------------------------------

def _randomize(model, seed):
  """Noise on every parameter; LayerNorm scales and layer scales around
  1 (random per channel), the rest around 0."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      scale = 0.2 if p.ndim <= 1 else 1.0 / max(p.shape[-1], 1) ** 0.5
      noise = torch.randn(p.shape, generator=g) * scale
      if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight",
                        "lambda1")):
        noise = noise + 1.0
      if name.endswith(("cls_token", "register_tokens", "mask_token",
                        "position_embeddings")):
        noise = torch.randn(p.shape, generator=g)
      p.copy_(noise)
  return model.eval()


def _dinov2_folder(path, registers, kwargs, seed=0):
  """A tiny random DINOv2 model saved at `path`; (path, torch model)."""
  import transformers  # pylint: disable=g-import-not-at-top
  if registers:
    cfg = transformers.Dinov2WithRegistersConfig(**kwargs)
    model = transformers.Dinov2WithRegistersModel(cfg)
  else:
    cfg = transformers.Dinov2Config(**kwargs)
    model = transformers.Dinov2Model(cfg)
  model = _randomize(model, seed)
  model.save_pretrained(path)
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "BitImageProcessor",
               "image_mean": list(MEAN), "image_std": list(STD),
               "crop_size": {"height": cfg.image_size,
                             "width": cfg.image_size}}, f)
  return path, model


_BUILT = {}


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def pair(request, tmp_path_factory):
  """(config row, path, torch model, expert, pixels per side, our outputs,
  HF outputs), built once per configuration."""
  name = request.param[0]
  if name not in _BUILT:
    _BUILT[name] = _build(request.param, tmp_path_factory)
  return _BUILT[name]


def _build(config, tmp_path_factory):
  """One jitted program for every side: XLA compiles dominate the time."""
  name, registers, kwargs, sides = config
  path, model = _dinov2_folder(str(tmp_path_factory.mktemp(name)),
                               registers, kwargs)
  expert = experts.load(path)
  rng = np.random.RandomState(1)
  pixels = [rng.randn(2, h, w, 3).astype(np.float32) for h, w in sides]

  def run(params, pixels):
    return [expert.vision.apply({"params": params}, x,
                                output_hidden_states=True) for x in pixels]

  ours = jax.tree.map(np.asarray,
                      jax.jit(run)(expert.params["vision"], pixels))
  theirs = []
  with torch.no_grad():
    for x in pixels:
      out = model(pixel_values=torch.from_numpy(
          np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                  output_hidden_states=True)
      theirs.append((out.pooler_output.numpy(),
                     [h.numpy() for h in out.hidden_states]))
  return config, path, model, expert, pixels, ours, theirs


def test_features_and_hidden_states_match_transformers(pair):
  config, _, _, expert, _, ours, theirs = pair
  sides = config[3]
  for side, (feats, hidden), (ref, ref_hidden) in zip(sides, ours, theirs):
    assert_close(feats, ref, f"pooler_output at {side}")
    assert len(hidden) == len(ref_hidden) == expert.vision.num_layers + 1
    for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
      assert_close(a, b, f"hidden state {i} at {side}")
  # Registers sit between the class token and the patches.
  h, w = sides[0]
  p = expert.vision.config.patch_size
  assert ours[0][1][0].shape[1] == 1 + config[1] + (h // p) * (w // p)


def test_expert_image_features_public_path(pair):
  """Expert.image_features (loader -> Expert -> jit) at the non-square
  interpolated side."""
  _, _, _, expert, pixels, _, theirs = pair
  assert_close(expert.image_features(pixels[2]), theirs[2][0],
               "Expert.image_features")


def test_vision_only_expert_and_config(pair):
  config, path, model, expert, _, _, _ = pair
  _, registers, kwargs, _ = config
  assert not expert.has_text and expert.text is None
  assert set(expert.params) == {"vision"}
  assert "DINOv2 has no text tower" in expert.vision_only_reason
  with pytest.raises(UserError, match="vision-only"):
    expert.tokenize(["a chest x-ray"])
  assert expert.family == "dinov2" and expert.format == "hf_dinov2"
  assert expert.image_size == kwargs["image_size"]
  assert expert.image_mean == MEAN and expert.image_std == STD
  c = expert.vision.config
  assert loader.vision_config(path) == c  # config.json alone.
  assert (c.class_token, c.pre_norm, c.patch_bias, c.pooling,
          c.layer_scale, c.projection_dim) == (True, False, True, "class",
                                               True, 0)
  assert c.num_registers == registers
  assert c.mlp_dim == int(kwargs["hidden_size"] * kwargs["mlp_ratio"])
  assert c.position_interpolation == ("bicubic_antialias" if registers
                                      else "bicubic")
  # The mask token is on disk (skipped on purpose, not by accident).
  assert "embeddings.mask_token" in load_file(
      os.path.join(path, "model.safetensors"))
  del model


# ---- Other layouts and bad folders (no compile) -----------------------------

def _copy(src, dst, config_changes=None, tensors=None):
  """A copy of folder `src` with config.json keys changed and/or other
  tensors written."""
  shutil.copytree(src, dst)
  if config_changes:
    file = os.path.join(dst, "config.json")
    with open(file) as f:
      raw = json.load(f)
    raw.update(config_changes)
    with open(file, "w") as f:
      json.dump(raw, f)
  if tensors is not None:
    save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def _leaves(params):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _assert_same_params(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_classification_and_in_memory_layouts(pair, tmp_path):
  """An image-classification folder (the base model under its prefix,
  "dinov2." or "dinov2_with_registers.", the classifier skipped) and a
  file with transformers 5's in-memory attention names read to the very
  params of the base model's folder."""
  import transformers  # pylint: disable=g-import-not-at-top
  config, path, model, _, _, _, _ = pair
  want = loader.read(path).params
  if config[1]:
    prefix = "dinov2_with_registers"
    cls = transformers.Dinov2WithRegistersForImageClassification
  else:
    prefix, cls = "dinov2", transformers.Dinov2ForImageClassification
  head = cls(type(model.config).from_pretrained(path, num_labels=3))
  getattr(head, prefix).load_state_dict(model.state_dict())
  head.save_pretrained(str(tmp_path / "cls"))
  saved = load_file(str(tmp_path / "cls" / "model.safetensors"))
  assert "classifier.weight" in saved
  assert f"{prefix}.embeddings.cls_token" in saved
  _assert_same_params(loader.read(str(tmp_path / "cls")).params, want)

  renames = {"attention.attention.query": "attention.q_proj",
             "attention.attention.key": "attention.k_proj",
             "attention.attention.value": "attention.v_proj",
             "attention.output.dense": "attention.o_proj"}
  tensors = {}
  for k, v in load_file(os.path.join(path, "model.safetensors")).items():
    for old, new in renames.items():
      k = k.replace(old, new)
    tensors[k] = v
  assert any(".attention.q_proj." in k for k in tensors)
  renamed = _copy(path, tmp_path / "renamed", tensors=tensors)
  _assert_same_params(loader.read(renamed).params, want)


@pytest.mark.parametrize("pair", [CONFIGS[0]], indirect=True,
                         ids=[CONFIGS[0][0]])
def test_bad_folders_are_clear_errors(pair, tmp_path):
  _, path, _, _, _, _, _ = pair
  swiglu = _copy(path, tmp_path / "swiglu", {"use_swiglu_ffn": True})
  for fn in (experts.load, loader.vision_config):
    with pytest.raises(UserError, match="use_swiglu_ffn=true in .*swiglu"):
      fn(swiglu)

  tensors = load_file(os.path.join(path, "model.safetensors"))
  name = "encoder.layer.1.layer_scale2.lambda1"
  bad = dict(tensors, **{name: tensors[name][:-1].copy()})
  wrong = _copy(path, tmp_path / "wrong_shape", tensors=bad)
  with pytest.raises(UserError, match=(rf"tensor '{name}' in "
                                       rf".*wrong_shape.*model.safetensors"
                                       rf" has shape \(31,\)")):
    experts.load(wrong)

  extra = _copy(path, tmp_path / "extra",
                tensors=dict(tensors, **{"embeddings.extra": tensors[name]}))
  with pytest.raises(UserError, match="unexpected tensor 'embeddings.extra'"):
    experts.load(extra)

  missing = dict(tensors)
  del missing["encoder.layer.0.layer_scale1.lambda1"]
  gone = _copy(path, tmp_path / "missing", tensors=missing)
  with pytest.raises(UserError, match="missing tensor 'encoder.layer.0."
                                      "layer_scale1.lambda1'"):
    experts.load(gone)
