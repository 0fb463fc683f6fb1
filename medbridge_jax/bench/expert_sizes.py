"""Parameters and weight memory of the published experts we load.

  python -m medbridge_jax.bench.expert_sizes

For each published model (its architecture written out here from its
publisher's config; nothing is downloaded or read), the parameters of the
towers MedBridge loads, counted on our Flax towers with `jax.eval_shape`
(nothing is allocated), their size in bfloat16, and the patch tokens of
one view at the expert's input side. A markdown table on stdout.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.experts.bert import BertConfig, BertTower
from medbridge_jax.experts.text import TextConfig, TextTower
from medbridge_jax.experts.vit import VisionConfig, VisionTower


def _vit(family, width, layers, heads, mlp, patch, side, **kw):
  act = kw.pop("act", "gelu")
  eps = kw.pop("eps", 1e-5)
  return VisionConfig(family=family, hidden_size=width, num_layers=layers,
                      num_heads=heads, mlp_dim=mlp, patch_size=patch,
                      image_size=side, act=act, eps=eps, **kw)


def _text(family, vocab, width, layers, heads, mlp, length, proj):
  return TextConfig(family=family, vocab_size=vocab, hidden_size=width,
                    num_layers=layers, num_heads=heads, mlp_dim=mlp,
                    max_length=length, act="gelu", eps=1e-5,
                    projection_dim=proj)


@dataclasses.dataclass(frozen=True)
class Published:
  """One published model: what to download, how we read it, its towers."""
  name: str
  download: str  # The publisher's name for it (we never download).
  format: str  # Our reader (experts/formats).
  vision: VisionConfig
  text: Optional[Any] = None  # TextConfig, BertConfig or None.


# ViT-B/16 CLIP-style text: 49,408 BPE tokens, width 512, 12 layers.
_CLIP_TEXT_B = _text("clip", 49408, 512, 12, 8, 2048, 77, 512)
_CLIP_TEXT_L = _text("clip", 49408, 768, 12, 12, 3072, 77, 768)
_SO400M = dict(width=1152, layers=27, heads=16, mlp=4304, patch=14)

PUBLISHED = (
    Published("CLIP ViT-B/16", "openai/clip-vit-base-patch16", "hf_clip",
              _vit("clip", 768, 12, 12, 3072, 16, 224, projection_dim=512),
              _CLIP_TEXT_B),
    Published("CLIP ViT-L/14-336", "openai/clip-vit-large-patch14-336",
              "hf_clip",
              _vit("clip", 1024, 24, 16, 4096, 14, 336, projection_dim=768),
              _CLIP_TEXT_L),
    Published("CheXzero (OpenAI CLIP ViT-B/32)",
              "CheXzero's best_64_5e-4_original_22000_0.864.pt (convert)",
              "open_clip",
              _vit("clip", 768, 12, 12, 3072, 32, 224, projection_dim=512),
              _CLIP_TEXT_B),
    Published("open_clip ViT-B/16 (LAION-2B)",
              "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip",
              _vit("clip", 768, 12, 12, 3072, 16, 224, projection_dim=512),
              _CLIP_TEXT_B),
    Published("BiomedCLIP", "microsoft/BiomedCLIP-PubMedBERT_256-"
              "vit_base_patch16_224 (convert the .bin)", "open_clip",
              _vit("timm_vit", 768, 12, 12, 3072, 16, 224, eps=1e-6,
                   projection_dim=512, class_token=True, pre_norm=False,
                   patch_bias=True, pooling="class"),
              BertConfig(vocab_size=30522, hidden_size=768, num_layers=12,
                         num_heads=12, mlp_dim=3072, max_length=512,
                         projection="mlp", projection_dim=512)),
    Published("SigLIP B/16-224", "google/siglip-base-patch16-224", "hf_clip",
              _vit("siglip", 768, 12, 12, 3072, 16, 224, eps=1e-6),
              _text("siglip", 32000, 768, 12, 12, 3072, 64, 768)),
    Published("SigLIP 2 B/16-224", "google/siglip2-base-patch16-224",
              "hf_clip",
              _vit("siglip", 768, 12, 12, 3072, 16, 224, eps=1e-6),
              _text("siglip", 256000, 768, 12, 12, 3072, 64, 768)),
    Published("SigLIP So400m/14-384", "google/siglip-so400m-patch14-384",
              "hf_clip", _vit("siglip", side=384, eps=1e-6, **_SO400M),
              _text("siglip", 32000, 1152, 27, 16, 4304, 64, 1152)),
    Published("MedSigLIP-448", "google/medsiglip-448", "hf_clip",
              _vit("siglip", side=448, eps=1e-6, **_SO400M),
              _text("siglip", 32000, 1152, 27, 16, 4304, 64, 1152)),
    Published("RAD-DINO", "microsoft/rad-dino", "hf_dinov2",
              _vit("dinov2", 768, 12, 12, 3072, 14, 518, eps=1e-6,
                   class_token=True, pre_norm=False, patch_bias=True,
                   pooling="class", layer_scale=True)),
    Published("DINOv2-L/14", "facebook/dinov2-large", "hf_dinov2",
              _vit("dinov2", 1024, 24, 16, 4096, 14, 518, eps=1e-6,
                   class_token=True, pre_norm=False, patch_bias=True,
                   pooling="class", layer_scale=True)),
    Published("LLaVA-1.5 vision tower", "llava-hf/llava-1.5-7b-hf", "hf_vlm",
              _vit("clip", 1024, 24, 16, 4096, 14, 336)),
    Published("PaliGemma vision tower", "google/paligemma-3b-pt-224",
              "hf_vlm", _vit("siglip", side=224, eps=1e-6, use_head=False,
                             **_SO400M)),
    Published("MedGemma 4B vision tower", "google/medgemma-4b-it", "hf_vlm",
              _vit("siglip", side=896, eps=1e-6, use_head=False, **_SO400M)),
)


def count(module, *inputs) -> int:
  """Parameters of a linen module, from shapes alone."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *inputs)["params"])
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def sizes(p: Published) -> dict:
  """Vision and text parameters, bfloat16 MiB and tokens per view of `p`."""
  v = p.vision
  pixels = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.float32)
  vision = count(VisionTower(v), pixels)
  text = 0
  if p.text is not None:
    ids = jnp.zeros((1, p.text.max_length), jnp.int32)
    tower = BertTower if isinstance(p.text, BertConfig) else TextTower
    text = count(tower(p.text), ids)
  return {"vision": vision, "text": text,
          "bf16_mib": (vision + text) * 2 / 2**20,
          "tokens": v.grid * v.grid + v.num_prefix_tokens}


def table() -> str:
  rows = ["| expert | download (by hand) | reader | input side | tokens per "
          "view | vision params | text params | weights in bf16 |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for p in PUBLISHED:
    s = sizes(p)
    text = f"{s['text'] / 1e6:.0f} M" if s["text"] else "none"
    rows.append(
        f"| {p.name} | `{p.download}` | {p.format} | {p.vision.image_size} | "
        f"{s['tokens']} | {s['vision'] / 1e6:.0f} M | {text} | "
        f"{s['bf16_mib']:,.0f} MiB |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table())
