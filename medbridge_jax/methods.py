"""The adaptation methods a run can train: MedBridge and its baselines.

One switch, `config.method.name`, picks the model; everything around it
(data, train step, loss, evaluation, checkpoints, report) is the same for
every method, so their numbers compare. The contract:

  model = methods.build(config, experts, labels, prompt_embeddings)
  params = medbridge.init_params(model, key, experts, image_size)
  trainable, frozen = partition.split(
      params, methods.partition_rules(config, experts))
  logits, aux = model.apply({"params": params}, images, train=True,
                            rngs={"focal": key})  # as MedBridge's

`build` gives MedBridge itself for "medbridge" (`medbridge.build`,
unchanged) and a `baselines.Baseline` for the others; `describe(config)` is
the method in one line for logs and reports.
"""

from typing import Any, Optional, Sequence

import ml_collections

from medbridge_jax.model import baselines
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition

NAMES = ("medbridge",) + baselines.NAMES

# Baselines: the loaded towers (vision, and CoOp's text tower) stay frozen;
# everything the method adds trains.
BASELINE_RULES = (
    (r"^expert_\d+/(.+/)?(text_)?tower/", "frozen"),
    (r".*", "train"),
)


def build(config: ml_collections.ConfigDict, experts: Sequence[Any],
          labels: Sequence[str],
          prompt_embeddings: Optional[Sequence[Any]] = None):
  """The model of `config.method.name` for loaded `experts` and `labels`:
  a linen module with MedBridge's calling convention (`apply({"params": p},
  images (B, H, W) uint8, train=..., rngs=...) -> (logits (B, L) float32,
  aux)`, aux "gates", "expert_logits", "balance_loss"). `prompt_embeddings`
  as `medbridge.build` takes them."""
  _check(config)
  if config.method.name == "medbridge":
    return medbridge.build(config, experts, labels, prompt_embeddings)
  return baselines.build(config, experts, labels, prompt_embeddings)


def partition_rules(config: ml_collections.ConfigDict,
                    experts: Sequence[Any]) -> partition.Rules:
  """The rules that split the method's params into (trainable, frozen).

  medbridge: `partition.DEFAULT_RULES`. finetune: per expert, the last
  `config.method.finetune_last` blocks of its tower and what follows them
  (post-norm, projection or pooling head) train (-1: the whole tower), the
  rest of the tower is frozen. Every other baseline: the loaded towers
  (CoOp's text towers too) are frozen. Anything else the method adds
  trains.
  """
  _check(config)
  m = config.method
  if m.name == "medbridge":
    return partition.DEFAULT_RULES
  if m.name != "finetune":
    return BASELINE_RULES
  # config_check imports this module.
  from medbridge_jax import config_check  # pylint: disable=g-import-not-at-top
  rules = []
  for k, e in enumerate(experts):
    n = int(e.vision.config.num_layers)
    config_check.check_finetune_depth(m, n, f"expert {k} ({e.name})")
    tower = f"^expert_{k}/tower/"
    if m.finetune_last == -1:
      rules.append((tower, "train"))
      continue
    start = baselines.first_tuned_block(n, m.finetune_last)
    blocks = "|".join(str(i) for i in range(start, n))
    rules.append((f"{tower}layers_({blocks})/", "train"))
    rules.append((f"{tower}(post_norm|projection|head)/", "train"))
  return tuple(rules) + BASELINE_RULES


def describe(config: ml_collections.ConfigDict) -> str:
  """The method and its settings in one line."""
  _check(config)
  m, model = config.method, config.model
  if model.moe.enabled:
    combine = f"experts gated ({model.moe.gating})"
  else:
    combine = "experts averaged"
  if m.name == "medbridge":
    views = (f"global + {model.focal.num_local} local views"
             if model.focal.enabled else "global view")
    queries = (f"{model.queries.num_queries} queries"
               if model.queries.enabled else "no queries")
    fusion = "fusion" if model.fusion.enabled else "max over views"
    return f"medbridge: {views}, {queries}, {fusion}; {combine}"
  what = {
      "linear_probe": "linear probe on the frozen features",
      "clip_adapter": (f"CLIP-Adapter (bottleneck width / "
                       f"{m.adapter_reduction}, ratio {m.adapter_ratio:g})"
                       f" + linear classifier"),
      "vpt_shallow": (f"VPT-shallow ({m.vpt_prompts} prompt tokens) + "
                      f"linear classifier"),
      "vpt_deep": (f"VPT-deep ({m.vpt_prompts} prompt tokens per layer) + "
                   f"linear classifier"),
      "lora": (f"LoRA (rank {m.lora_rank}, alpha {m.lora_alpha:g}, on "
               f"{'/'.join(m.lora_targets)}) + linear classifier"),
      "coop": (f"CoOp (learned positive/negative prompt contexts, "
               f"{'one per label' if m.coop_class_specific else 'shared'})"),
      "finetune": ("full fine-tuning" if m.finetune_last == -1 else
                   f"fine-tuning of the last {m.finetune_last} blocks")
                  + " + linear classifier",
  }[m.name]
  return f"{m.name}: {what}; global view; {combine}"


def _check(config: ml_collections.ConfigDict) -> None:
  # config_check imports this module (NAMES): import it here, not above.
  from medbridge_jax import config_check  # pylint: disable=g-import-not-at-top
  config_check.check_method(config.method)
