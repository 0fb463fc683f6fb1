"""Tiny transformers vision-language checkpoints for tests (needs torch).

`vlm_folder(path, kind, ...)` builds a random LLaVA, LLaVA-NeXT (CLIP
vision tower, tiny Llama), PaliGemma (SigLIP tower, tiny Gemma) or Gemma 3
model with transformers (offline), gives every parameter random values
(see hf_fixtures), and saves it as transformers 5 does, in 50 KB shards
with an index, plus the image processor's config. `relayout` rewrites
such a folder's tensor names into the other layouts published folders use;
`corrupt` overwrites a file with garbage.
"""

import collections
import json
import os
import shutil

import numpy as np

import hf_fixtures
from medbridge_jax.experts import random_experts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

INDEX = "model.safetensors.index.json"
KINDS = ("llava", "llava_next", "paligemma", "gemma3")
# Each kind's image processor normalisation, unlike any family default, so
# a test sees where mean and std came from.
MEAN_STD = {"llava": ((0.11, 0.22, 0.33), (0.44, 0.55, 0.66)),
            "paligemma": ((0.3, 0.4, 0.5), (0.6, 0.7, 0.8)),
            "gemma3": ((0.45, 0.5, 0.55), (0.2, 0.25, 0.3))}
IMAGE_TOKEN = 99  # Inside the tiny vocabulary.
_LM = dict(vocab_size=100, hidden_size=32, intermediate_size=37,
           num_hidden_layers=2, num_attention_heads=4)

# Tensor-name prefixes of each layout, as (transformers 5 save, other).
LAYOUTS = {
    # Hub folders (and transformers 4 saves): the vision model keeps its
    # own "vision_model." prefix.
    "hub": (("vision_tower.", "vision_tower.vision_model."),),
    # transformers 4.52+'s module names, as a plain state_dict holds them.
    "modules": (("vision_tower.", "model.vision_tower.vision_model."),
                ("language_model.model.", "model.language_model."),
                ("language_model.lm_head.", "lm_head."),
                ("multi_modal_projector.", "model.multi_modal_projector."),
                ("image_newline", "model.image_newline")),
}


def vlm_folder(path, kind, *, hidden=32, layers=2, heads=4, mlp=37, patch=8,
               image=32, head=False, seed=0):
  """A tiny `kind` VLM saved at `path`; returns (path, torch model).

  `head`: the SigLIP tower keeps its attention-pooling head (the published
  PaliGemma and Gemma 3 towers have none).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  tower = dict(hidden_size=hidden, intermediate_size=mlp,
               num_hidden_layers=layers, num_attention_heads=heads,
               image_size=image, patch_size=patch)
  if kind in ("llava", "llava_next"):
    tower["model_type"] = "clip_vision_model"
    text = dict(_LM, model_type="llama", num_key_value_heads=2)
    extra = ({} if kind == "llava" else
             dict(image_grid_pinpoints=[[image, image], [image, 2 * image]]))
    cls = (tf.LlavaConfig if kind == "llava" else tf.LlavaNextConfig)
    cfg = cls(vision_config=tower, text_config=text,
              image_token_index=IMAGE_TOKEN, **extra)
    model_cls = (tf.LlavaForConditionalGeneration if kind == "llava"
                 else tf.LlavaNextForConditionalGeneration)
  elif kind in ("paligemma", "gemma3"):
    tower.update(model_type="siglip_vision_model", vision_use_head=head)
    text = dict(_LM, num_key_value_heads=1, head_dim=8)
    if kind == "paligemma":
      cfg = tf.PaliGemmaConfig(
          vision_config=tower, text_config=dict(text, model_type="gemma"),
          image_token_index=IMAGE_TOKEN, projection_dim=_LM["hidden_size"])
      model_cls = tf.PaliGemmaForConditionalGeneration
    else:
      cfg = tf.Gemma3Config(
          vision_config=tower,
          text_config=dict(text, model_type="gemma3_text"),
          image_token_index=IMAGE_TOKEN, mm_tokens_per_image=4)
      model_cls = tf.Gemma3ForConditionalGeneration
  else:
    raise ValueError(kind)
  torch.manual_seed(seed)
  model = hf_fixtures._randomize(  # pylint: disable=protected-access
      model_cls(cfg), seed)
  model.save_pretrained(path, max_shard_size="50KB")
  _processor(path, kind, image, patch)
  return path, model


def _processor(path, kind, image, patch):
  """The image processor's config as each kind's publishers ship it."""
  import transformers as tf  # pylint: disable=g-import-not-at-top
  if kind == "llava":
    # transformers 5's processor writes one processor_config.json, the
    # image processor's settings under "image_processor".
    random_experts.write_clip_tokenizer(path, 77)
    tok = tf.CLIPTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    mean, std = MEAN_STD[kind]
    tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(
            image_mean=list(mean), image_std=list(std),
            size={"shortest_edge": image}, crop_size=image),
        tokenizer=tok, patch_size=patch, image_token="<image>",
    ).save_pretrained(path)
  elif kind in ("paligemma", "gemma3"):
    # The hub's folders: the image processor's preprocessor_config.json.
    cls = (tf.SiglipImageProcessor if kind == "paligemma"
           else tf.Gemma3ImageProcessor)
    mean, std = MEAN_STD[kind]
    cls(image_mean=list(mean), image_std=list(std)).save_pretrained(path)
  # llava_next: no processor files (the family's defaults apply).


def weight_map(path) -> dict:
  with open(os.path.join(path, INDEX)) as f:
    return json.load(f)["weight_map"]


def shards(path) -> dict:
  """shard file name -> the set of tensor names it holds (from the index)."""
  out = collections.defaultdict(set)
  for name, shard in weight_map(path).items():
    out[shard].add(name)
  return dict(out)


def relayout(src, dst, layout):
  """A copy of the transformers 5 folder `src` at `dst` with its tensors
  renamed to `layout` (see LAYOUTS), in the shards and in the index."""
  from safetensors import numpy as stnp  # pylint: disable=g-import-not-at-top

  def rename(name):
    for old, new in LAYOUTS[layout]:
      if name.startswith(old):
        return new + name[len(old):]
    return name

  shutil.copytree(src, dst)
  for shard in shards(dst):
    file = os.path.join(dst, shard)
    stnp.save_file({rename(k): v for k, v in stnp.load_file(file).items()},
                   file, metadata={"format": "pt"})
  with open(os.path.join(dst, INDEX)) as f:
    index = json.load(f)
  index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
  with open(os.path.join(dst, INDEX), "w") as f:
    json.dump(index, f, indent=2)
  return dst


def corrupt(file, seed=0):
  """Overwrites `file` with garbage bytes of the same size."""
  size = os.path.getsize(file)
  with open(file, "wb") as f:
    f.write(np.random.RandomState(seed).bytes(size))
