"""The published experts' sizes: our towers count what the references hold.

The references are built on PyTorch's meta device from the same published
architecture (nothing allocated), and their parameters counted.
"""

import pytest

from medbridge_jax.bench import expert_sizes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _published(name):
  return next(p for p in expert_sizes.PUBLISHED if p.name == name)


def _count(model) -> int:
  return sum(p.numel() for p in model.parameters())


def _meta(build):
  with torch.device("meta"):
    return build()


def test_clip_and_siglip_equal_transformers():
  clip = _meta(lambda: transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12,
                         patch_size=16, image_size=224),
      text_config=dict(hidden_size=512, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=8),
      projection_dim=512)))
  s = expert_sizes.sizes(_published("CLIP ViT-B/16"))
  # Ours has no logit_scale in the towers; the reference has one scalar.
  assert s["vision"] + s["text"] == _count(clip) - 1
  so400m = _meta(lambda: transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=dict(hidden_size=1152, intermediate_size=4304,
                         num_hidden_layers=27, num_attention_heads=16,
                         patch_size=14, image_size=384),
      text_config=dict(hidden_size=1152, intermediate_size=4304,
                       num_hidden_layers=27, num_attention_heads=16,
                       vocab_size=32000, projection_size=1152))))
  s = expert_sizes.sizes(_published("SigLIP So400m/14-384"))
  assert s["vision"] + s["text"] == _count(so400m) - 2  # scale and bias
  assert s["tokens"] == 27 * 27


def test_dinov2_equals_transformers():
  dino = _meta(lambda: transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
      patch_size=14, image_size=518)))
  s = expert_sizes.sizes(_published("DINOv2-L/14"))
  # The reference also holds the (unused) mask token.
  assert s["vision"] == _count(dino) - 1024
  assert s["text"] == 0 and s["tokens"] == 37 * 37 + 1

