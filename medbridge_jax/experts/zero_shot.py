"""Zero-shot multi-label classification with label prompts (CheXzero style).

Each label gets a positive and a negative prompt ("a chest x-ray showing
{label}" / "a chest x-ray with no {label}"). An image's logit for each prompt
is the checkpoint's own: cosine similarity times exp(logit_scale), plus
SigLIP's logit_bias. The label's probability is the softmax over its pair,
taken at the positive prompt. This is the "before adaptation" baseline.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError

POSITIVE = "a chest x-ray showing {label}"
NEGATIVE = "a chest x-ray with no {label}"


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def prompts(labels: Sequence[str], positive: str = POSITIVE,
            negative: str = NEGATIVE) -> list:
  """[pos(label0), neg(label0), pos(label1), ...] as strings."""
  for name, template in (("positive", positive), ("negative", negative)):
    if "{label}" not in template:
      raise UserError(f"zero-shot {name} prompt {template!r} has no {{label}}")
  if isinstance(labels, str) or not labels:
    raise UserError(f"zero-shot labels must be a non-empty list of names; "
                    f"got {labels!r}")
  return [t.format(label=label) for label in labels
          for t in (positive, negative)]


def prompt_embeddings(expert, labels: Sequence[str], positive: str = POSITIVE,
                      negative: str = NEGATIVE) -> jax.Array:
  """(L, 2, P) L2-normalised text features: [:, 0] positive, [:, 1] negative."""
  feats = expert.encode_text(prompts(labels, positive, negative))
  feats = _l2_normalize(feats)
  return feats.reshape(len(labels), 2, feats.shape[-1])


def logits(image_features: jax.Array, prompt_embeds: jax.Array,
           expert) -> jax.Array:
  """(B, L, 2) image-prompt logits exactly as the checkpoint scores pairs."""
  img = _l2_normalize(image_features)
  if img.shape[-1] != prompt_embeds.shape[-1]:
    raise UserError(f"image features of width {img.shape[-1]} do not match "
                    f"prompt embeddings of width {prompt_embeds.shape[-1]}")
  sims = jnp.einsum("bp,lkp->blk", img, prompt_embeds,
                    precision=jax.lax.Precision.HIGHEST)
  return sims * expert.logit_scale + expert.logit_bias


def probabilities(image_features: jax.Array, prompt_embeds: jax.Array,
                  expert) -> jax.Array:
  """(B, L) probability of each label: softmax over (positive, negative)."""
  return jax.nn.softmax(logits(image_features, prompt_embeds, expert),
                        axis=-1)[..., 0]
