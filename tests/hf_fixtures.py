"""Tiny transformers CLIP / SigLIP checkpoints for tests (needs torch).

`clip_folder(path, ...)` and `siglip_folder(path, ...)` build a random
`CLIPModel` / `SiglipModel` with transformers (offline), give every tensor
random values (HF's init leaves LayerNorms at 1/0 and biases at 0, which
would hide mapping mistakes), and `save_pretrained` it with the tokenizer
files of `medbridge_jax.experts.random_experts` and a preprocessor config.
Return (path, model) with the torch model in eval mode.
"""

import json
import os

from medbridge_jax.experts import random_experts

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _randomize(model, seed: int):
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      scale = 0.2 if p.ndim <= 1 else 1.0 / max(p.shape[-1], 1) ** 0.5
      noise = torch.randn(p.shape, generator=g) * scale
      if name.endswith(("layer_norm1.weight", "layer_norm2.weight",
                        "layernorm.weight", "pre_layrnorm.weight",
                        "post_layernorm.weight", "final_layer_norm.weight")):
        noise = noise + 1.0
      if name == "logit_scale":
        noise = torch.full(p.shape, 2.3)
      p.copy_(noise)
  return model.eval()


def _preprocessor(path, family, image):
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump(random_experts.preprocessor_config(family, image), f)


def clip_folder(path, *, hidden=32, layers=2, heads=4, mlp=37, patch=8,
                image=32, proj=24, text_hidden=32, text_layers=2,
                text_heads=4, text_len=77, seed=0, act="quick_gelu"):
  """A tiny CLIPModel saved at `path`; returns (path, torch model)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  tok = random_experts.write_clip_tokenizer(path, text_len)
  cfg = transformers.CLIPConfig(
      text_config=dict(
          vocab_size=tok["vocab_size"], hidden_size=text_hidden,
          intermediate_size=mlp, num_hidden_layers=text_layers,
          num_attention_heads=text_heads, max_position_embeddings=text_len,
          bos_token_id=tok["bos"], eos_token_id=tok["eos"],
          pad_token_id=tok["pad"], hidden_act=act),
      vision_config=dict(
          hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
          num_attention_heads=heads, image_size=image, patch_size=patch,
          hidden_act=act),
      projection_dim=proj)
  torch.manual_seed(seed)
  model = _randomize(transformers.CLIPModel(cfg), seed)
  model.save_pretrained(path)
  _preprocessor(path, "clip", image)
  return path, model


def siglip_folder(path, *, hidden=32, layers=2, heads=4, mlp=37, patch=8,
                  image=32, text_hidden=32, text_layers=2, text_heads=4,
                  text_len=64, seed=0, act="gelu_pytorch_tanh"):
  """A tiny SiglipModel (with its MAP head) saved at `path`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  tok = random_experts.write_siglip_tokenizer(path, text_len)
  cfg = transformers.SiglipConfig(
      text_config=dict(
          vocab_size=tok["vocab_size"], hidden_size=text_hidden,
          intermediate_size=mlp, num_hidden_layers=text_layers,
          num_attention_heads=text_heads, max_position_embeddings=text_len,
          eos_token_id=tok["eos"], pad_token_id=tok["pad"], bos_token_id=None,
          projection_size=hidden, hidden_act=act),
      vision_config=dict(
          hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
          num_attention_heads=heads, image_size=image, patch_size=patch,
          vision_use_head=True, hidden_act=act))
  torch.manual_seed(seed)
  model = _randomize(transformers.SiglipModel(cfg), seed)
  model.save_pretrained(path)
  _preprocessor(path, "siglip", image)
  return path, model
