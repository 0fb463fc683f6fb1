"""Hugging Face CLIP and SigLIP folders (SigLIP 2 and MedSigLIP included).

`config.json` (model_type "clip" or "siglip", or a vision tower alone:
"clip_vision_model", "siglip_vision_model"), `model.safetensors` or shards
with `model.safetensors.index.json`, tokenizer files and
`preprocessor_config.json`. A folder without tokenizer files, or a vision
tower alone, is a vision-only expert.
"""

import os
from typing import List

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError
from medbridge_jax.experts import names
from medbridge_jax.experts import preprocessing
from medbridge_jax.experts import tensors
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.formats import Checkpoint
from medbridge_jax.experts.names import Entry
from medbridge_jax.experts.text import TextConfig, TextTower
from medbridge_jax.experts.vit import VisionConfig

NAME = "hf_clip"
EXPECTS = ("config.json with model_type 'clip' or 'siglip' (or "
           "'clip_vision_model' / 'siglip_vision_model') and "
           "model.safetensors")
FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
         "preprocessor_config.json", "tokenizer_config.json")
TWO_TOWERS = ("clip", "siglip")
VISION_ONLY = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
TEXT_ONLY = ("clip_text_model", "siglip_text_model")
MODEL_TYPES = TWO_TOWERS + tuple(VISION_ONLY)
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def detect(path: str, files) -> bool:
  if "config.json" not in files:
    return False
  raw = jsonfile.read(os.path.join(path, "config.json"), "config.json")
  return raw.get("model_type") in MODEL_TYPES + TEXT_ONLY + ("siglip2",)


def side(value, key: str, path: str) -> int:
  """A square side from an int or an (h, w) pair."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise UserError(f"{key}={value} in {path}: only square images and "
                      f"patches are supported")
    value = value[0]
  return int(value)


def tower_config(v, family: str, projection_dim: int, path: str,
                  prefix: str = "vision_config.") -> VisionConfig:
  """Our VisionConfig from transformers' CLIP/SigLIP vision config object."""
  config = VisionConfig(
      family=family, hidden_size=int(v.hidden_size),
      num_layers=int(v.num_hidden_layers),
      num_heads=int(v.num_attention_heads),
      mlp_dim=int(v.intermediate_size),
      patch_size=side(v.patch_size, prefix + "patch_size", path),
      image_size=side(v.image_size, prefix + "image_size", path),
      act=str(v.hidden_act), eps=float(v.layer_norm_eps),
      num_channels=int(getattr(v, "num_channels", 3)),
      projection_dim=projection_dim,
      use_head=bool(getattr(v, "vision_use_head", True)))
  check_heads(config.hidden_size, config.num_heads, prefix, path)
  return config


def check_heads(width: int, heads: int, prefix: str, path: str):
  if width % heads:
    raise UserError(f"{prefix}hidden_size {width} is not divisible by "
                    f"num_attention_heads {heads} in {path}")


def parse_config(raw: dict, path: str):
  """(VisionConfig, TextConfig or None) from a config.json dict, with
  transformers' defaults for the keys a published file leaves out."""
  model_type = raw.get("model_type")
  if model_type == "siglip2":
    raise UserError(
        f"{path}: model_type 'siglip2' is SigLIP 2's NaFlex variant (any "
        f"aspect ratio, patches embedded by a Linear, positions resized per "
        f"image); it is not supported. Use a fixed-resolution SigLIP 2 "
        f"folder (model_type 'siglip', e.g. google/siglip2-base-patch16-224)")
  if model_type in TEXT_ONLY:
    raise UserError(
        f"{path} describes a text tower alone (model_type {model_type!r}); "
        f"an expert needs the image tower ('clip' or 'siglip')")
  if model_type not in MODEL_TYPES:
    raise UserError(f"unknown model_type {model_type!r} in {path}; "
                    f"expected one of {', '.join(MODEL_TYPES)}")
  family = VISION_ONLY.get(model_type, model_type)
  # transformers' config classes fill in their defaults; they need no torch.
  with tokenizers.quiet_transformers() as transformers:
    cls = {"clip": transformers.CLIPConfig,
           "siglip": transformers.SiglipConfig,
           "clip_vision_model": transformers.CLIPVisionConfig,
           "siglip_vision_model": transformers.SiglipVisionConfig}[model_type]
    try:
      cfg = cls.from_dict(raw)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"invalid {model_type} config {path}: {e}") from None
  if model_type in VISION_ONLY:
    # A vision model alone has no projection: its pooler output.
    return tower_config(cfg, family, 0, path, prefix=""), None
  v, t = cfg.vision_config, cfg.text_config
  if family == "clip":
    v_proj = t_proj = int(cfg.projection_dim)
  else:
    v_proj = 0
    t_proj = int(getattr(t, "projection_size", None) or t.hidden_size)
  eos = t.eos_token_id
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  vision = tower_config(v, family, v_proj, path)
  text = TextConfig(
      family=family, vocab_size=int(t.vocab_size),
      hidden_size=int(t.hidden_size), num_layers=int(t.num_hidden_layers),
      num_heads=int(t.num_attention_heads), mlp_dim=int(t.intermediate_size),
      max_length=int(t.max_position_embeddings), act=str(t.hidden_act),
      eps=float(t.layer_norm_eps), projection_dim=t_proj,
      eos_token_id=int(eos if eos is not None else 2))
  check_heads(text.hidden_size, text.num_heads, "text_config.", path)
  return vision, text


def encoder_layers(hf: str, ours: names.Path, n: int, d: int,
                   hidden: int) -> List[Entry]:
  """transformers' CLIP/SigLIP encoder layers `{hf}.encoder.layers.N`."""
  out = []
  for i in range(n):
    h, o = f"{hf}.encoder.layers.{i}", ours + (f"layers_{i}",)
    for proj, name in (("q", "query"), ("k", "key"), ("v", "value"),
                       ("out", "out")):
      out += names.linear(f"{h}.self_attn.{proj}_proj", o + ("attn", name),
                          d, d)
    out += names.norm(h + ".layer_norm1", o + ("norm1",), d)
    out += names.norm(h + ".layer_norm2", o + ("norm2",), d)
    out += names.mlp(h + ".mlp", o + ("mlp",), d, hidden)
  return out


def vision_entries(c: VisionConfig, root: str = "vision_model."
                   ) -> List[Entry]:
  """The vision tower's tensors, named under `root` (where a VLM keeps the
  tower: e.g. "vision_tower.vision_model." or "vision_tower.")."""
  d, p, v = c.hidden_size, c.patch_size, ("vision",)
  m = root[:-1]
  e = m + ".embeddings"
  num_pos = c.grid * c.grid + c.num_position_prefix
  out = [Entry(e + ".patch_embedding.weight", (d, c.num_channels, p, p),
               (v + ("patch_embed", "kernel"),), "conv"),
         Entry(e + ".position_embedding.weight", (num_pos, d),
               (v + ("position_embedding",),), "copy")]
  if c.class_token:
    out += [Entry(e + ".class_embedding", (d,), (v + ("class_embedding",),),
                  "copy")]
  if c.pre_norm:
    out += names.norm(m + ".pre_layrnorm", v + ("pre_norm",), d)
  if c.patch_bias:
    out += [Entry(e + ".patch_embedding.bias", (d,),
                  (v + ("patch_embed", "bias"),), "copy")]
  out += encoder_layers(m, v, c.num_layers, d, c.mlp_dim)
  out += names.norm(m + ".post_layernorm", v + ("post_norm",), d)
  if c.projection_dim:
    out += names.linear("visual_projection", v + ("projection",), d,
                        c.projection_dim, bias=False)
  if c.pooling == "map":
    h, o = m + ".head", v + ("head",)
    out += [Entry(h + ".probe", (1, 1, d), (o + ("probe",),), "copy")]
    out += names.qkv(h + ".attention.in_proj_weight",
                     h + ".attention.in_proj_bias", o, d)
    out += names.linear(h + ".attention.out_proj", o + ("out",), d, d)
    out += names.norm(h + ".layernorm", o + ("norm",), d)
    out += names.mlp(h + ".mlp", o + ("mlp",), d, c.mlp_dim)
  return out


def text_entries(c: TextConfig) -> List[Entry]:
  d, t = c.hidden_size, ("text",)
  e = "text_model.embeddings"
  out = [Entry(e + ".token_embedding.weight", (c.vocab_size, d),
               (t + ("token_embedding",),), "copy"),
         Entry(e + ".position_embedding.weight", (c.max_length, d),
               (t + ("position_embedding",),), "copy")]
  out += encoder_layers("text_model", t, c.num_layers, d, c.mlp_dim)
  out += names.norm("text_model.final_layer_norm", t + ("final_norm",), d)
  if c.family == "clip":
    out += names.linear("text_projection", t + ("projection",), d,
                        c.projection_dim, bias=False)
  else:
    out += names.linear("text_model.head", t + ("projection",), d,
                        c.projection_dim)
  return out


def scalar_entries(family: str) -> List[Entry]:
  if family == "clip":
    return [Entry("logit_scale", (), (("logit_scale",),), "copy")]
  return [Entry("logit_scale", (1,), (("logit_scale",),), "copy"),
          Entry("logit_bias", (1,), (("logit_bias",),), "copy")]


def all_entries(vision: VisionConfig, text: TextConfig) -> List[Entry]:
  """Every tensor of a two-tower CLIP / SigLIP checkpoint."""
  return (vision_entries(vision) + text_entries(text) +
          scalar_entries(vision.family))


def vision_config(path: str) -> VisionConfig:
  """The image tower's config, from config.json alone."""
  cfg_path = os.path.join(path, "config.json")
  return parse_config(jsonfile.read(cfg_path, "config.json"), cfg_path)[0]


def read(path: str) -> Checkpoint:
  """A CLIP / SigLIP folder's towers, params and preprocessing."""
  cfg_path = os.path.join(path, "config.json")
  vision, text = parse_config(jsonfile.read(cfg_path, "config.json"),
                              cfg_path)
  family = vision.family
  tokenizer = reason = None
  if text is not None:
    tokenizer = tokenizers.for_folder(path, family, text.max_length)
    if tokenizer is None:
      reason = f"no tokenizer files in {path}"
  else:
    reason = f"{cfg_path} describes the vision tower alone"
  if reason:
    # Only the vision tower is read (a two-tower file's text weights are
    # skipped as well: unused without a tokenizer).
    entries = vision_entries(vision)
    keep = lambda name: name.startswith(("vision_model.",
                                         "visual_projection."))
  else:
    entries = all_entries(vision, text)
    keep = None
  found, where = tensors.read(path, SINGLE, INDEX, keep)
  params = names.to_params(found, entries, where)
  mean, std = preprocessing.mean_std(path, family)
  return Checkpoint(
      family=family, format=NAME, vision=vision, params=params,
      image_mean=mean, image_std=std,
      text=None if reason else text,
      text_class=None if reason else TextTower,
      tokenizer=tokenizer, vision_only_reason=reason,
      disk_dtype=tensors.disk_dtype(found))
