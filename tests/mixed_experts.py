"""Three small experts of different families and formats, for end-to-end
runs: a CLIP-like Hugging Face folder, a DINOv2-like one (vision only) and
an open_clip folder with a timm ViT trunk and a BERT text tower (the
BiomedCLIP layout). Random weights; each folder is written in its
publisher's layout and read back by `experts.load` like a real one.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from medbridge_jax.experts import bert
from medbridge_jax.experts import names
from medbridge_jax.experts import random_experts
from medbridge_jax.experts.formats import open_clip
from medbridge_jax.experts.vit import VisionTower

SIDE = 32  # Every expert's input side.
CLIP = "clip:width=32,layers=2,heads=2,patch=8,image=32"
# A timm ViT name our reader parses (tiny: width 192, depth 12, 3 heads),
# at a 32 px side with 8 px patches.
TIMM = "vit_tiny_patch8_32"
WORDS = ("a", "chest", "x", "-", "ray", "showing", "with", "no", "nodule",
         "mass", "effusion", "pneumothorax", "cardiomegaly", "finding",
         "lung", "lesion", "pleural", "atelectasis", "consolidation")


def clip_folder(path: str) -> str:
  return random_experts.write(path, CLIP, 0)


def dinov2_folder(path: str) -> str:
  """A tiny transformers Dinov2Model, saved as the hub's folders are."""
  import transformers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(1)
  model = transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      mlp_ratio=4, patch_size=8, image_size=SIDE, layerscale_value=0.5))
  model.save_pretrained(path)
  return path


def _bert_tokenizer(path: str):
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = os.path.join(path, "vocab.txt")
  with open(vocab, "w") as f:
    f.write("\n".join(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
                      + WORDS) + "\n")
  transformers.BertTokenizer(vocab, model_max_length=32).save_pretrained(path)
  return len(WORDS) + 5


def open_clip_timm_bert_folder(path: str, seed: int = 2) -> str:
  """open_clip_config.json + open_clip_model.safetensors + BERT tokenizer
  files: a timm ViT trunk and a BERT text tower, as BiomedCLIP ships."""
  os.makedirs(path, exist_ok=True)
  vocab_size = _bert_tokenizer(path)
  with open(os.path.join(path, open_clip.CONFIG), "w") as f:
    json.dump({"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": TIMM, "timm_pool": "",
                       "timm_proj": "linear", "image_size": SIDE},
        "text_cfg": {"hf_model_name": "tiny-bert",
                     "hf_tokenizer_name": "tiny-bert",
                     "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 32}},
               "preprocess_cfg": {"mean": [0.5, 0.5, 0.5],
                                  "std": [0.25, 0.25, 0.25]}}, f)
  layout, _ = open_clip.parse(path)
  # 64 wide: BERT's 64-wide heads are what the reader assumes without a
  # BERT config.json.
  text = bert.BertConfig(vocab_size=vocab_size, hidden_size=64, num_layers=1,
                         num_heads=1, mlp_dim=128, max_length=32,
                         projection="mlp", projection_dim=32, pooling="cls")
  key = jax.random.key(seed)
  params = {
      "vision": VisionTower(layout.vision).init(
          key, jnp.zeros((1, SIDE, SIDE, 3)))["params"],
      "text": bert.BertTower(text).init(
          key, jnp.zeros((1, 32), jnp.int32))["params"],
      "logit_scale": np.asarray(np.log(1 / 0.07), np.float32)}
  entries = (open_clip.timm_vision_entries(layout.vision)
             + bert.bert_entries(text, open_clip.BERT_PREFIX,
                                 open_clip.BERT_PROJ)
             + [names.Entry("logit_scale", (), (("logit_scale",),), "copy")])
  save_file(names.from_params(jax.tree.map(np.asarray, params), entries),
            os.path.join(path, open_clip.SINGLE))
  return path
