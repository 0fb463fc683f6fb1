"""Analytic FLOPs of a CLIP / SigLIP image tower's forward, per image.

A multiply-add counts as 2 FLOPs. Counted: the patch embedding (a matmul
of every patch, p*p*C values, with the D x (p*p*C) kernel), and in each of
the L layers

  attention projections  q, k, v and out: 4 matmuls (S, D) x (D, D)  8 S D^2
  attention mixing       Q K^T and softmax(.) V, all heads         4 S^2 D
  MLP                    fc1 (S, D) x (D, M) and fc2 back          4 S D M

with S tokens (patches + class token for CLIP). Not counted: LayerNorms,
softmax, activations, bias and position adds, and the pooling head (CLIP's
projection of one token, SigLIP's one-query MAP head): together well under
1% of ViT-B/16 (35.1 GFLOP per 224 px image; at the H200's 790 TFLOP/s
bf16 matmul ceiling that is about 22.5k images/s).
"""

from typing import Dict, Optional


def vit_forward_flops(config, side: Optional[int] = None) -> Dict[str, int]:
  """Per-image FLOPs of `config`'s (a `VisionConfig`) forward at `side` px.

  Returns the parts (patch_embedding, attention_projections,
  attention_mixing, mlp) and their "total".
  """
  side = int(side or config.image_size)
  p, d, m = config.patch_size, config.hidden_size, config.mlp_dim
  layers = config.num_layers
  patches = (side // p) ** 2
  s = patches + config.num_prefix_tokens
  parts = {
      "patch_embedding": 2 * patches * (p * p * config.num_channels) * d,
      "attention_projections": layers * 8 * s * d * d,
      "attention_mixing": layers * 4 * s * s * d,
      "mlp": layers * 4 * s * d * m,
  }
  parts["total"] = sum(parts.values())
  return parts
