"""Loading a local expert folder, in any supported format, into an `Expert`.

The folder is read as its publisher lays it out; `formats.find` tells the
format from its files (see `experts/formats/`). Tensors are read with our
own safetensors reader (no torch); pickle checkpoints are refused.
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp

from medbridge_jax.experts import formats
from medbridge_jax.experts.expert import Expert
from medbridge_jax.experts.vit import VisionConfig, VisionTower


def _folder(path) -> str:
  return os.path.abspath(os.path.expanduser(str(path)))


def read(path) -> formats.Checkpoint:
  """The folder's `Checkpoint` (configs, float32 numpy params)."""
  path = _folder(path)
  return formats.find(path).read(path)


def vision_config(path) -> VisionConfig:
  """The folder's image-tower config, from its config files alone (no
  weights are read)."""
  path = _folder(path)
  return formats.find(path).vision_config(path)


def load(path, dtype=jnp.float32,
         attention_impl: Optional[str] = None) -> Expert:
  """An `Expert` from a local folder in any supported format.

  Args:
    path: the folder, as its publisher ships it (see `experts/formats/`).
    dtype: compute dtype (float32 or bfloat16); params stay float32.
    attention_impl: passed to jax.nn.dot_product_attention (None, "xla",
      "cudnn", "auto"); see layers.choose_attention.
  """
  path = _folder(path)
  found = read(path)
  text = None
  if found.text is not None:
    text = found.text_class(found.text, dtype, attention_impl)
  make_tokenizer, max_length = found.tokenizer or (None, 0)
  return Expert(
      name=os.path.basename(path), path=path, family=found.family,
      format=found.format, image_size=found.vision.image_size,
      image_mean=found.image_mean, image_std=found.image_std,
      vision=VisionTower(found.vision, dtype, attention_impl), text=text,
      params=jax.tree.map(jnp.asarray, found.params), max_length=max_length,
      make_tokenizer=make_tokenizer, disk_dtype=found.disk_dtype,
      vision_only_reason=found.vision_only_reason)
