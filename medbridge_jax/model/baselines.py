"""The adaptation methods MedBridge is compared with, as one linen model.

Every baseline reads each expert's whole image, resized (antialiased, with
`config.model.focal.resize`) to the expert's own input side: MedBridge's
global view, without local crops. Per expert k, on its normalised pixels:

  linear_probe  frozen tower -> image features f -> linear classifier
  clip_adapter  frozen tower -> f' = ratio MLP(f) + (1 - ratio) f
                (CLIP-Adapter) -> linear classifier
  vpt_shallow   tower with learnable prompt tokens at the input (VPT)
  vpt_deep      ... and a new set before every layer -> linear classifier
  lora          tower with LoRA on its attention projections -> classifier
  finetune      the tower, its last `finetune_last` blocks (and its
                post-norm, projection or pooling head) trained -> classifier
  coop          frozen tower -> f; learned positive / negative prompt
                contexts through the frozen text tower -> (L, 2, P) text
                features; logits as the expert scores prompt pairs

The linear classifier is MedBridge's head (`heads.Head`) over the one
feature token: text-initialised (`config.model.head.text_init`), it starts
at the expert's zero-shot classifier, as CoOp does. The experts are then
combined as MedBridge combines them (`medbridge.mix_experts`: the MoE gate
over the experts' features, or their average), with MedBridge's calling
convention and aux. Params per expert:

  expert_k/tower/...                  the vision tower (frozen, except the
                                      fine-tuned blocks)
  expert_k/peft/{tower/...,prompts}   VPT (model/peft.py)
  expert_k/peft/{tower/...,lora/...}  LoRA (model/peft.py)
  expert_k/adapter/{down,up}/kernel   CLIP-Adapter (model/clip_adapter.py)
  expert_k/prompts/{positive_context, negative_context, text_tower/...}
                                      CoOp (model/coop.py)
  expert_k/head/{kernel,bias}         the classifier (not with coop)
  gate/...                            with MoE on and K > 1
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medbridge_jax.errors import UserError
from medbridge_jax.experts import expert as expert_lib
from medbridge_jax.experts.vit import VisionTower
from medbridge_jax.model import clip_adapter
from medbridge_jax.model import coop
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import heads
from medbridge_jax.model import medbridge
from medbridge_jax.model import peft

Array = jax.Array
NAMES = ("linear_probe", "clip_adapter", "vpt_shallow", "vpt_deep", "lora",
         "coop", "finetune")


# `config.method`, frozen: hashable (a linen attribute, static under jit),
# its keys and defaults declared once, in default_config.py.
MethodSettings = ml_collections.FrozenConfigDict


@dataclasses.dataclass(frozen=True)
class Scales:
  """What `zero_shot.logits` reads of an expert, as plain floats."""
  logit_scale: float
  logit_bias: float


def first_tuned_block(num_layers: int, finetune_last: int) -> int:
  """Index of the first fine-tuned block (-1: all of them)."""
  return 0 if finetune_last == -1 else num_layers - finetune_last


class Branch(nn.Module):
  """One expert: images (B, H, W) in [0, 1] -> (logits (B, L), the
  classifier's input features (B, P), read by the gate)."""
  spec: medbridge.ExpertSpec
  method: MethodSettings
  settings: medbridge.Settings
  num_labels: int
  prompts: Optional[coop.PromptSpec] = None  # coop only.
  scales: Optional[Scales] = None  # coop only.

  @nn.compact
  def __call__(self, images: Array) -> Tuple[Array, Array]:
    s, m, spec = self.settings, self.method, self.spec
    view = focal_sampling.resize(images, spec.side, s.resize)
    pixels = expert_lib.normalize_pixels(view[..., None], spec.mean, spec.std)
    kw = dict(dtype=s.dtype, attention_impl=s.attention_impl)
    if m.name in ("vpt_shallow", "vpt_deep"):
      feats = peft.VptFeatures(spec.vision, num_prompts=m.vpt_prompts,
                               deep=m.name == "vpt_deep", name="peft",
                               **kw)(pixels)
    elif m.name == "lora":
      feats = peft.LoraFeatures(spec.vision, rank=m.lora_rank,
                                alpha=m.lora_alpha,
                                targets=tuple(m.lora_targets), name="peft",
                                **kw)(pixels)
    elif m.name == "finetune":
      tower = VisionTower(spec.vision, name="tower", **kw)
      n = spec.vision.num_layers
      start = first_tuned_block(n, m.finetune_last)
      # The frozen blocks need no backward: the kernel the platform runs
      # fastest forward; the tuned ones, and the pooling, one with a
      # backward (layers.choose_attention).
      x = tower.encode(tower.embed(pixels), 0, start)
      x = tower.encode(x, start, n, differentiated=True)
      feats = tower.pool(x, differentiated=True)
    elif m.name in ("linear_probe", "clip_adapter", "coop"):
      tower = VisionTower(spec.vision, name="tower", **kw)
      feats = jax.lax.stop_gradient(tower(pixels)[0])
    else:
      raise UserError(f"config.method.name={m.name!r} is not a baseline "
                      f"(one of {NAMES})")
    feats = jnp.asarray(feats, jnp.float32)
    if m.name == "coop":
      learner = coop.PromptLearner(self.prompts, m.coop_class_specific,
                                   name="prompts", **kw)
      return coop.label_logits(feats, learner(), self.scales), feats
    if m.name == "clip_adapter":
      feats = clip_adapter.ClipAdapter(m.adapter_reduction, m.adapter_ratio,
                                       name="adapter")(feats)
    head = heads.Head(self.num_labels, spec.directions, name="head")
    return head(feats[:, None]), feats


class Baseline(nn.Module):
  """K experts adapted by one baseline method; see the module docstring."""
  experts: Tuple[medbridge.ExpertSpec, ...]
  num_labels: int
  method: MethodSettings
  settings: medbridge.Settings = medbridge.Settings()
  prompts: Tuple[Optional[coop.PromptSpec], ...] = ()  # Per expert (coop).
  scales: Tuple[Optional[Scales], ...] = ()  # Per expert (coop).

  @nn.compact
  def __call__(self, images: Array, *, train: bool):
    """images (B, H, W) uint8, or float in [0, 1] -> (logits (B, L), aux).

    aux as `MedBridge.__call__`'s. `train` changes nothing (no random views,
    no dropout); it is taken for the common calling convention.
    """
    del train
    images = expert_lib.unit_range(images)
    if images.ndim != 3:
      raise UserError(f"images must be (batch, height, width); got "
                      f"{images.shape}")
    k = len(self.experts)
    prompts = self.prompts or (None,) * k
    scales = self.scales or (None,) * k
    outs = [Branch(spec, self.method, self.settings, self.num_labels,
                   prompts[i], scales[i], name=f"expert_{i}")(images)
            for i, spec in enumerate(self.experts)]
    return medbridge.mix_experts(outs, self.num_labels, self.settings)


def build(config: ml_collections.ConfigDict, experts: Sequence[Any],
          labels: Sequence[str],
          prompt_embeddings: Optional[Sequence[Any]] = None) -> Baseline:
  """The baseline `config.method.name` for loaded `experts` and `labels`
  (arguments as `medbridge.build`'s). CoOp tokenises its prompts
  (`config.zero_shot.positive/negative`) here, on the host."""
  # config_check imports methods, which imports this module.
  from medbridge_jax import config_check  # pylint: disable=g-import-not-at-top
  medbridge.check_nonempty(experts, labels)
  config_check.check_method(config.method)
  # A copy: a FrozenConfigDict made from a ConfigDict would keep the live,
  # mutable original.
  method = MethodSettings(config.method.to_dict())
  if method.name not in NAMES:
    raise UserError(f"config.method.name={method.name!r} is not a baseline "
                    f"(one of {NAMES})")
  settings = medbridge.settings_from_config(config.model)
  for k, e in enumerate(experts):
    config_check.check_finetune_depth(config.method,
                                      int(e.vision.config.num_layers),
                                      f"expert {k} ({e.name})")
  prompts, scales = (), ()
  if method.name == "coop":
    for e in experts:
      e.require_text("CoOp (config.method.name='coop')")
    z = config.zero_shot
    prompts = tuple(coop.prepare(e, list(labels), z.positive, z.negative)
                    for e in experts)
    scales = tuple(Scales(float(e.logit_scale), float(e.logit_bias))
                   for e in experts)
    # CoOp scores with the learned prompts, not a head: no text
    # directions to compute.
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.head.text_init = False
  specs = medbridge.expert_specs(config, experts, labels, prompt_embeddings)
  return Baseline(specs, len(labels), method, settings, prompts, scales)
