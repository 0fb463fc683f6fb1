"""Hugging Face DINOv2 folders, with and without registers (RAD-DINO too).

`config.json` (model_type "dinov2" or "dinov2_with_registers"),
`model.safetensors` or shards with `model.safetensors.index.json`, and
`preprocessor_config.json`. DINOv2 is an image model alone: the expert is
vision-only, and its features are transformers' `pooler_output` (the class
token after the final LayerNorm).

Tensor names are those `save_pretrained` writes (and the hub holds):
`embeddings.{cls_token, mask_token, position_embeddings, register_tokens,
patch_embeddings.projection}`, `encoder.layer.N.{norm1,
attention.attention.{query,key,value}, attention.output.dense,
layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, layer_scale2.lambda1}`,
`layernorm`; an image-classification folder has them under its base
model's prefix ("dinov2.", "dinov2_with_registers.") beside `classifier`.
transformers 5 names the attention `attention.{q,k,v,o}_proj` in memory;
files with those names are read too.
"""

import os
from typing import List

import numpy as np

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts import names
from medbridge_jax.experts import preprocessing
from medbridge_jax.experts import tensors
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.formats import Checkpoint
from medbridge_jax.experts.formats import hf_clip
from medbridge_jax.experts.names import Entry
from medbridge_jax.experts.vit import VisionConfig

NAME = "hf_dinov2"
EXPECTS = ("config.json with model_type 'dinov2' or 'dinov2_with_registers' "
           "and model.safetensors")
FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
         "preprocessor_config.json")
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# How transformers resizes each model's position table: the registers
# model's `interpolate_pos_encoding` passes antialias=True, the plain one
# does not.
INTERPOLATION = {"dinov2": "bicubic",
                 "dinov2_with_registers": "bicubic_antialias"}

# Where an image-classification folder keeps the base model
# (transformers' `base_model_prefix`); a base model saved alone has none.
PREFIXES = ("", "dinov2.", "dinov2_with_registers.")
# On disk but unused for features: the mask token (masked-image
# pre-training only) and a classification folder's linear head.
SKIPPED = frozenset([p + "embeddings.mask_token" for p in PREFIXES]
                    + ["classifier.weight", "classifier.bias"])
# Attention projections: as saved (and on the hub), or as transformers 5
# names them in memory.
ATTENTION_NAMES = {
    "saved": {"query": "attention.attention.query",
              "key": "attention.attention.key",
              "value": "attention.attention.value",
              "out": "attention.output.dense"},
    "in_memory": {"query": "attention.q_proj", "key": "attention.k_proj",
                  "value": "attention.v_proj", "out": "attention.o_proj"},
}


def detect(path: str, files) -> bool:
  if "config.json" not in files:
    return False
  raw = jsonfile.read(os.path.join(path, "config.json"), "config.json")
  return raw.get("model_type") in MODEL_TYPES


def parse_config(raw: dict, path: str) -> VisionConfig:
  """Our VisionConfig from a DINOv2 config.json dict, with transformers'
  defaults for the keys a published file leaves out."""
  model_type = raw.get("model_type")
  if model_type not in MODEL_TYPES:
    raise UserError(f"unknown model_type {model_type!r} in {path}; "
                    f"expected one of {', '.join(MODEL_TYPES)}")
  with tokenizers.quiet_transformers() as transformers:
    cls = {"dinov2": transformers.Dinov2Config,
           "dinov2_with_registers": transformers.Dinov2WithRegistersConfig
           }[model_type]
    try:
      cfg = cls.from_dict(raw)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"invalid {model_type} config {path}: {e}") from None
  if cfg.use_swiglu_ffn:
    raise UserError(f"use_swiglu_ffn=true in {path}: DINOv2's SwiGLU MLP "
                    f"(the giant model) is not supported; supported DINOv2 "
                    f"experts have the plain MLP (ViT-S/B/L, RAD-DINO)")
  act = str(cfg.hidden_act)
  if act not in layers.ACTIVATIONS:
    raise UserError(f"unsupported hidden_act {act!r} in {path}; supported: "
                    f"{', '.join(sorted(layers.ACTIVATIONS))}")
  hidden = int(cfg.hidden_size)
  heads = int(cfg.num_attention_heads)
  hf_clip.check_heads(hidden, heads, "", path)
  # transformers always builds the layer scales (`layerscale_value` is
  # only their initial value): the trained ones are in the weights.
  return VisionConfig(
      family="dinov2", hidden_size=hidden,
      num_layers=int(cfg.num_hidden_layers), num_heads=heads,
      mlp_dim=int(hidden * cfg.mlp_ratio),
      patch_size=hf_clip.side(cfg.patch_size, "patch_size", path),
      image_size=hf_clip.side(cfg.image_size, "image_size", path),
      act=act, eps=float(cfg.layer_norm_eps),
      num_channels=int(cfg.num_channels), projection_dim=0,
      class_token=True, pre_norm=False, patch_bias=True, pooling="class",
      layer_scale=True,
      num_registers=int(getattr(cfg, "num_register_tokens", 0) or 0),
      position_interpolation=INTERPOLATION[model_type])


def qkv_bias(raw: dict) -> bool:
  """Whether the query/key/value projections have biases on disk."""
  return bool(raw.get("qkv_bias", True))


def entries(c: VisionConfig, prefix: str = "", attention: str = "saved",
            with_qkv_bias: bool = True) -> List[Entry]:
  """Every tensor of a DINOv2 model saved under `prefix`."""
  d, p, v = c.hidden_size, c.patch_size, ("vision",)
  e = prefix + "embeddings"
  num_pos = c.grid * c.grid + 1
  out = [Entry(e + ".cls_token", (1, 1, d), (v + ("class_embedding",),),
               "copy", shape=(d,)),
         Entry(e + ".position_embeddings", (1, num_pos, d),
               (v + ("position_embedding",),), "copy", shape=(num_pos, d)),
         Entry(e + ".patch_embeddings.projection.weight",
               (d, c.num_channels, p, p), (v + ("patch_embed", "kernel"),),
               "conv"),
         Entry(e + ".patch_embeddings.projection.bias", (d,),
               (v + ("patch_embed", "bias"),), "copy")]
  if c.num_registers:
    r = c.num_registers
    out.append(Entry(e + ".register_tokens", (1, r, d),
                     (v + ("registers",),), "copy", shape=(r, d)))
  attn = ATTENTION_NAMES[attention]
  for i in range(c.num_layers):
    h, o = f"{prefix}encoder.layer.{i}", v + (f"layers_{i}",)
    for ours in ("query", "key", "value", "out"):
      bias = with_qkv_bias or ours == "out"
      out += names.linear(f"{h}.{attn[ours]}", o + ("attn", ours), d, d,
                          bias=bias)
    out += names.norm(h + ".norm1", o + ("norm1",), d)
    out += names.norm(h + ".norm2", o + ("norm2",), d)
    out += names.mlp(h + ".mlp", o + ("mlp",), d, c.mlp_dim)
    out += [Entry(h + ".layer_scale1.lambda1", (d,), (o + ("scale1",),),
                  "copy"),
            Entry(h + ".layer_scale2.lambda1", (d,), (o + ("scale2",),),
                  "copy")]
  out += names.norm(prefix + "layernorm", v + ("post_norm",), d)
  return out


def _layout(found, path: str):
  """(prefix, attention naming) of the tensors read from `path`."""
  prefix = next((p for p in PREFIXES if p + "embeddings.cls_token" in found),
                None)
  if prefix is None:
    raise UserError(f"missing tensor 'embeddings.cls_token' in {path} "
                    f"(nor under {PREFIXES[1]!r} or {PREFIXES[2]!r}, as "
                    f"image-classification folders keep it): not a DINOv2 "
                    f"checkpoint")
  in_memory = any(k.endswith(".attention.q_proj.weight") for k in found)
  return prefix, "in_memory" if in_memory else "saved"


def _zero_qkv_biases(params: dict, c: VisionConfig):
  """qkv_bias=false: our projections always have a bias, here zero."""
  for i in range(c.num_layers):
    attn = params["vision"][f"layers_{i}"]["attn"]
    for name in ("query", "key", "value"):
      attn[name]["bias"] = np.zeros((c.hidden_size,), np.float32)


def vision_config(path: str) -> VisionConfig:
  """The image tower's config, from config.json alone."""
  cfg_path = os.path.join(path, "config.json")
  return parse_config(jsonfile.read(cfg_path, "config.json"), cfg_path)


def read(path: str) -> Checkpoint:
  """A DINOv2 folder's image tower, params and preprocessing."""
  cfg_path = os.path.join(path, "config.json")
  raw = jsonfile.read(cfg_path, "config.json")
  vision = parse_config(raw, cfg_path)
  found, where = tensors.read(path, SINGLE, INDEX,
                              keep=lambda name: name not in SKIPPED)
  prefix, attention = _layout(found, path)
  with_bias = qkv_bias(raw)
  params = names.to_params(
      found, entries(vision, prefix, attention, with_bias), where)
  if not with_bias:
    _zero_qkv_biases(params, vision)
  mean, std = preprocessing.mean_std(path, "dinov2")
  return Checkpoint(
      family="dinov2", format=NAME, vision=vision, params=params,
      image_mean=mean, image_std=std,
      vision_only_reason=(f"DINOv2 has no text tower ({cfg_path}: "
                          f"model_type {raw.get('model_type')!r})"),
      disk_dtype=tensors.disk_dtype(found))
