"""Loading a local Hugging Face CLIP or SigLIP folder into an `Expert`.

The folder is read as the publishers lay it out: `config.json`,
`model.safetensors` (or shards named by `model.safetensors.index.json`),
tokenizer files and `preprocessor_config.json`. Tensors are read with
safetensors' numpy backend (no torch). Pickle checkpoints (`*.bin`) are
refused: unpickling can run arbitrary code.
"""

import contextlib
import os
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError
from medbridge_jax.experts import hf_names
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.expert import FAMILY_MEAN_STD, Expert
from medbridge_jax.experts.text import TextConfig, TextTower
from medbridge_jax.experts.vit import VisionConfig, VisionTower

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
VISION_ONLY = ("clip_vision_model", "siglip_vision_model",
               "clip_text_model", "siglip_text_model")


@contextlib.contextmanager
def quiet_transformers():
  """Mutes transformers' warnings about its own default sub-configs."""
  # transformers takes seconds to import: only when a config is parsed.
  import transformers  # pylint: disable=g-import-not-at-top
  level = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()
  try:
    yield transformers
  finally:
    transformers.logging.set_verbosity(level)


def _side(value, key: str, path: str) -> int:
  """A square side from an int or an (h, w) pair."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise UserError(f"{key}={value} in {path}: only square images and "
                      f"patches are supported")
    value = value[0]
  return int(value)


def parse_config(raw: dict, path: str) -> Tuple[VisionConfig, TextConfig]:
  """Tower configs from a config.json dict, with transformers' defaults."""
  model_type = raw.get("model_type")
  if model_type in VISION_ONLY:
    raise UserError(
        f"{path} describes a single tower (model_type {model_type!r}); "
        f"MedBridge needs the full two-tower model (model_type 'clip' or "
        f"'siglip') for its text prompts")
  if model_type not in ("clip", "siglip"):
    raise UserError(f"unknown model_type {model_type!r} in {path}; "
                    f"expected 'clip' or 'siglip'")
  # transformers' config classes fill in their defaults for keys a
  # published config.json leaves out; they need no torch.
  with quiet_transformers() as transformers:
    cls = (transformers.CLIPConfig if model_type == "clip"
           else transformers.SiglipConfig)
    try:
      cfg = cls.from_dict(raw)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"invalid {model_type} config {path}: {e}") from None
  v, t = cfg.vision_config, cfg.text_config
  cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if model_type == "clip":
    v_proj = t_proj = int(cfg.projection_dim)
    eos = t.eos_token_id
  else:
    v_proj = 0
    t_proj = int(getattr(t, "projection_size", None) or t.hidden_size)
    eos = t.eos_token_id
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  vision = VisionConfig(
      family=model_type, hidden_size=int(v.hidden_size),
      num_layers=int(v.num_hidden_layers),
      num_heads=int(v.num_attention_heads),
      mlp_dim=int(v.intermediate_size),
      patch_size=_side(v.patch_size, "vision_config.patch_size", cfg_path),
      image_size=_side(v.image_size, "vision_config.image_size", cfg_path),
      act=str(v.hidden_act), eps=float(v.layer_norm_eps),
      num_channels=int(getattr(v, "num_channels", 3)),
      projection_dim=v_proj,
      use_head=bool(getattr(v, "vision_use_head", True)))
  text = TextConfig(
      family=model_type, vocab_size=int(t.vocab_size),
      hidden_size=int(t.hidden_size), num_layers=int(t.num_hidden_layers),
      num_heads=int(t.num_attention_heads), mlp_dim=int(t.intermediate_size),
      max_length=int(t.max_position_embeddings), act=str(t.hidden_act),
      eps=float(t.layer_norm_eps), projection_dim=t_proj,
      eos_token_id=int(eos if eos is not None else 2))
  for c, which in ((vision, "vision_config"), (text, "text_config")):
    if c.hidden_size % c.num_heads:
      raise UserError(f"{which}.hidden_size {c.hidden_size} is not divisible "
                      f"by num_attention_heads {c.num_heads} in {cfg_path}")
  if vision.image_size % vision.patch_size:
    raise UserError(f"vision_config.image_size {vision.image_size} is not a "
                    f"multiple of patch_size {vision.patch_size} in {cfg_path}")
  return vision, text


def _refuse_pickles(path: str):
  pickles = sorted(f for f in os.listdir(path)
                   if f.endswith((".bin", ".pt", ".pth", ".ckpt"))
                   or f.endswith(".bin.index.json"))
  if pickles:
    raise UserError(
        f"{path} holds only pickle weights ({pickles[0]}); they are refused "
        f"because unpickling can run arbitrary code. Convert them once where "
        f"you trust the file: transformers' from_pretrained(folder) then "
        f"save_pretrained(folder, safe_serialization=True) writes "
        f"{SINGLE}")
  raise UserError(f"no weights in {path}: expected {SINGLE} or {INDEX} "
                  f"with its shards")


def _read_safetensors(file: str) -> Dict[str, np.ndarray]:
  try:
    with safe_open(file, framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read safetensors file {file}: {e}") from None


def read_tensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """All tensors of the folder and, per name, the file that holds it."""
  single = os.path.join(path, SINGLE)
  index = os.path.join(path, INDEX)
  if os.path.isfile(single):
    tensors = _read_safetensors(single)
    return tensors, {k: single for k in tensors}
  if not os.path.isfile(index):
    _refuse_pickles(path)
  weight_map = jsonfile.read(index, "safetensors index").get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserError(f"{index} has no 'weight_map'")
  tensors, where = {}, {}
  for shard in sorted(set(weight_map.values())):
    file = os.path.join(path, shard)
    if not os.path.isfile(file):
      raise UserError(f"shard {shard} listed in {index} is missing")
    for k, a in _read_safetensors(file).items():
      if weight_map.get(k) != shard:
        raise UserError(f"tensor {k!r} in {file} is not mapped to that shard "
                        f"by {index}")
      tensors[k], where[k] = a, file
  for k, shard in weight_map.items():
    if k not in tensors:
      raise UserError(f"tensor {k!r} is mapped to {shard} by {index} but "
                      f"that shard does not hold it")
  return tensors, where


def _preprocessing(path: str, family: str):
  mean, std = FAMILY_MEAN_STD[family]
  file = os.path.join(path, "preprocessor_config.json")
  if os.path.isfile(file):
    raw = jsonfile.read(file, "preprocessor config")
    mean = raw.get("image_mean", mean)
    std = raw.get("image_std", std)
    for key, value in (("image_mean", mean), ("image_std", std)):
      if (not isinstance(value, (list, tuple)) or len(value) != 3
          or not all(isinstance(x, (int, float)) for x in value)):
        raise UserError(f"{key} in {file} must be 3 numbers; got {value!r}")
  return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def load(path: str, dtype=jnp.float32,
         attention_impl: Optional[str] = None) -> Expert:
  """An `Expert` from a local Hugging Face CLIP or SigLIP folder.

  Args:
    path: the folder (config.json, safetensors weights, tokenizer files).
    dtype: compute dtype (float32 or bfloat16); params stay float32.
    attention_impl: passed to jax.nn.dot_product_attention (None, "xla",
      "cudnn").
  """
  path = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.isdir(path):
    raise UserError(f"expert folder not found: {path}")
  raw = jsonfile.read(os.path.join(path, "config.json"), "config.json")
  vision_cfg, text_cfg = parse_config(raw, os.path.join(path, "config.json"))
  family = vision_cfg.family
  make_tokenizer, max_length = tokenizers.for_folder(
      path, family, text_cfg.max_length)
  tensors, where = read_tensors(path)
  entries = hf_names.all_entries(vision_cfg, text_cfg)
  params = hf_names.to_params(tensors, entries, where)
  del tensors
  params = jax.tree.map(jnp.asarray, params)
  mean, std = _preprocessing(path, family)
  return Expert(
      name=os.path.basename(path), path=path, family=family,
      image_size=vision_cfg.image_size, image_mean=mean, image_std=std,
      vision=VisionTower(vision_cfg, dtype, attention_impl),
      text=TextTower(text_cfg, dtype, attention_impl),
      params=params, max_length=max_length, make_tokenizer=make_tokenizer)
