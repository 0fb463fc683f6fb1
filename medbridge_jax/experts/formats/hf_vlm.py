"""The vision tower of a Hugging Face vision-language model folder.

LLaVA and LLaVA-NeXT (a CLIP vision tower, e.g. ViT-L/14-336), PaliGemma
and Gemma 3 / MedGemma (a SigLIP tower, saved without its pooling head):
`config.json` (model_type "llava", "llava_next", "paligemma", "gemma3")
with the tower in `vision_config`, safetensors shards with
`model.safetensors.index.json` (or one `model.safetensors`), and the image
processor's `preprocessor_config.json` (transformers 5 writes
`processor_config.json` instead, the image processor under
"image_processor").

Only the vision tower's tensors are read: shards holding only the language
model or the projector are never opened. The expert is vision-only.

Features: a CLIP tower's pooler output (the post-layernormed class token,
no projection); a SigLIP tower without its head: the mean of its
post-layernormed final tokens; with the head: its pooler output.
"""

import os
import re
from typing import List, Sequence, Tuple

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError
from medbridge_jax.errors import one_line
from medbridge_jax.experts import names
from medbridge_jax.experts import preprocessing
from medbridge_jax.experts import tensors
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.formats import Checkpoint
from medbridge_jax.experts.formats import hf_clip
from medbridge_jax.experts.names import Entry
from medbridge_jax.experts.vit import VisionConfig

NAME = "hf_vlm"
# model_type -> transformers' config class; they fill the defaults a
# published config.json leaves out (e.g. LLaVA's CLIP ViT-L/14-336).
CONFIG_CLASSES = {"llava": "LlavaConfig", "llava_next": "LlavaNextConfig",
                  "paligemma": "PaliGemmaConfig", "gemma3": "Gemma3Config"}
MODEL_TYPES = tuple(CONFIG_CLASSES)
# The vision tower's model_type -> our family.
TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# Language models alone, published next to their VLMs (MedGemma 27B text).
TEXT_ONLY = ("gemma3_text",)
EXPECTS = (f"config.json with model_type {', '.join(map(repr, MODEL_TYPES))}"
           f" (a CLIP or SigLIP vision tower) and model.safetensors.index.json"
           f" with its shards")
FILES = ("config.json", "model.safetensors.index.json",
         "preprocessor_config.json", "processor_config.json",
         "generation_config.json", "chat_template.json")
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# Where the tower's tensors live: "vision_tower.vision_model." in the hub's
# folders (and transformers 4 saves), "model.vision_tower.vision_model." in
# transformers 4.52+'s own module names, "vision_tower." in what
# transformers 5 saves (the CLIP/SigLIP vision model's prefix dropped).
PREFIX = re.compile(r"(model\.)?vision_tower\.(vision_model\.)?")
ANCHOR = "embeddings.patch_embedding.weight"


def detect(path: str, files) -> bool:
  if "config.json" not in files:
    return False
  raw = jsonfile.read(os.path.join(path, "config.json"), "config.json")
  return raw.get("model_type") in MODEL_TYPES + TEXT_ONLY


def parse_config(raw: dict, path: str) -> Tuple[str, VisionConfig]:
  """(model_type, the vision tower's VisionConfig) from config.json."""
  model_type = raw.get("model_type")
  if model_type in TEXT_ONLY:
    raise UserError(
        f"{path} describes a language model alone (model_type "
        f"{model_type!r}); an expert needs the vision tower: use the "
        f"vision-language folder (model_type 'gemma3', e.g. MedGemma 4B)")
  if model_type not in MODEL_TYPES:
    raise UserError(f"unsupported vision-language model_type "
                    f"{model_type!r} in {path}; expected one of "
                    f"{', '.join(MODEL_TYPES)}")
  tower = raw.get("vision_config", {})
  if not isinstance(tower, dict):
    raise UserError(f"vision_config in {path} must be a JSON object; got "
                    f"{tower!r}")
  # Checked before the parse: transformers would fail on it with a list
  # of every model type it knows.
  found = tower.get("model_type")
  if found is not None and found not in TOWERS:
    raise UserError(
        f"vision_config.model_type {found!r} in {path}: only CLIP and "
        f"SigLIP vision towers are supported ({', '.join(TOWERS)})")
  # The language model's config does not shape the tower; left out, a
  # language model transformers does not know cannot fail the parse.
  body = {k: v for k, v in raw.items() if k != "text_config"}
  with tokenizers.quiet_transformers() as transformers:
    try:
      cfg = getattr(transformers, CONFIG_CLASSES[model_type]).from_dict(body)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"invalid {model_type} config {path}: "
                      f"{one_line(e)[:300]}") from None
  v = cfg.vision_config
  family = TOWERS.get(v.model_type)
  if family is None:
    raise UserError(f"vision_config.model_type {v.model_type!r} in {path}: "
                    f"only {', '.join(TOWERS)} are supported")
  # No projection: the VLM's projector maps into its language model.
  return model_type, hf_clip.tower_config(v, family, 0, path)


def weight_names(path: str) -> Tuple[Sequence[str], str]:
  """(every tensor name, the file that lists them), no weights read."""
  single = os.path.join(path, SINGLE)
  if os.path.isfile(single):
    return list(tensors.header(single)[0]), single
  index = os.path.join(path, INDEX)
  if not os.path.isfile(index):
    tensors.refuse_pickles(path, f"{INDEX} with its shards, or {SINGLE}")
  weight_map = jsonfile.read(index, "safetensors index").get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserError(f"{index} has no 'weight_map'")
  return list(weight_map), index


def tower_prefix(all_names: Sequence[str], source: str) -> str:
  """The key prefix of the vision model's tensors, e.g.
  "vision_tower.vision_model."."""
  found = set()
  for name in all_names:
    m = PREFIX.match(name)
    if m and name[m.end():] == ANCHOR:
      found.add(m.group(0))
  if len(found) > 1:
    raise UserError(f"{source} holds two vision towers "
                    f"({', '.join(sorted(found))}); expected one")
  if not found:
    tops = sorted({n.split(".")[0] for n in all_names})
    shown = ", ".join(tops[:6]) + (", ..." if len(tops) > 6 else "")
    raise UserError(
        f"{source} holds no vision tower tensors (found tensors under: "
        f"{shown}); expected '[model.]vision_tower.[vision_model.]{ANCHOR}'"
        f" and the rest of a CLIP or SigLIP vision model")
  return found.pop()


def check_head(vision: VisionConfig, all_names: Sequence[str], prefix: str,
               source: str, cfg_path: str):
  """A SigLIP tower's MAP head: config.json and the tensors must agree."""
  if vision.family != "siglip":
    return
  has_head = any(n.startswith(prefix + "head.") for n in all_names)
  if vision.use_head and not has_head:
    raise UserError(
        f"{cfg_path}: vision_config has the pooling head (vision_use_head "
        f"is true, transformers' default when absent) but {source} holds no "
        f"'{prefix}head.*' tensors; set \"vision_use_head\": false")
  if has_head and not vision.use_head:
    raise UserError(
        f"{cfg_path}: vision_config has vision_use_head false but {source} "
        f"holds the pooling head '{prefix}head.*'; set "
        f"\"vision_use_head\": true")


def tower_entries(vision: VisionConfig, prefix: str) -> List[Entry]:
  """hf_clip's vision-tower entries under the folder's `prefix`."""
  return hf_clip.vision_entries(vision, root=prefix)


def vision_config(path: str) -> VisionConfig:
  """The vision tower's config, from config.json alone."""
  cfg_path = os.path.join(path, "config.json")
  return parse_config(jsonfile.read(cfg_path, "config.json"), cfg_path)[1]


def read(path: str) -> Checkpoint:
  """A VLM folder's vision tower as a vision-only checkpoint."""
  cfg_path = os.path.join(path, "config.json")
  model_type, vision = parse_config(jsonfile.read(cfg_path, "config.json"),
                                    cfg_path)
  all_names, source = weight_names(path)
  prefix = tower_prefix(all_names, source)
  check_head(vision, all_names, prefix, source, cfg_path)
  found, where = tensors.read(path, SINGLE, INDEX,
                              lambda name: name.startswith(prefix))
  params = names.to_params(found, tower_entries(vision, prefix), where)
  mean, std = preprocessing.mean_std(path, vision.family)
  return Checkpoint(
      family=vision.family, format=NAME, vision=vision, params=params,
      image_mean=mean, image_std=std,
      vision_only_reason=(
          f"{cfg_path} is a {model_type} vision-language model: its text "
          f"side is a language model, which MedBridge does not use"),
      disk_dtype=tensors.disk_dtype(found))
