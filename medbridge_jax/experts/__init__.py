"""Frozen foundation-model experts in Flax, loaded from their publishers'
folders (Hugging Face CLIP / SigLIP / DINOv2 / VLMs, open_clip).

  expert = experts.load("/path/to/clip-vit-base-patch16")
  feats = expert.image_features(expert.normalize_pixels(images01))

Modules: vit (image tower), text (text tower), layers (shared blocks),
positions (position-table resizing), names (tensor-name maps), tensors
(safetensors reading), formats/ (one reader per checkpoint format), loader,
tokenizers, preprocessing (pixel mean/std), expert (the `Expert` object),
random_experts (small random HF folders), zero_shot.
"""

from medbridge_jax.experts import random_experts
from medbridge_jax.experts import zero_shot
from medbridge_jax.experts.expert import Expert
from medbridge_jax.experts.loader import load
from medbridge_jax.experts.text import TextConfig, TextTower
from medbridge_jax.experts.vit import VisionConfig, VisionTower

__all__ = ["Expert", "TextConfig", "TextTower", "VisionConfig",
           "VisionTower", "load", "random_experts", "zero_shot"]
