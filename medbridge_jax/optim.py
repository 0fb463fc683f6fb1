"""The optimizer: AdamW with linear warm-up, cosine decay and gradient clipping.

It is built for, and only ever sees, the trainable parameters: the frozen
experts have no optimizer state. Gradient accumulation is not an optimizer
wrapper here; the train step scans over micro-batches and applies this
optimizer once per step, so `config.train.steps` counts optimizer updates and
the schedule needs no rescaling.

Weight decay is decoupled (AdamW) and pulls a parameter toward zero, so it
only touches parameters for which zero is a sensible place to be pulled:
the feature-mixing matrices that start random or at zero (fusion attention
and MLP kernels: toward the identity fusion they start as; gate kernels:
toward equal gates). It leaves alone what carries meaning in its value:
query tokens (decayed, the Q queries would shrink toward one and the same
token), view-type embeddings, biases and norm scales, the heads (a
text-initialised head is the zero-shot classifier; decay would pull it away)
and the towers where a method trains them (fine-tuning: pre-trained
values). Of the baselines' own parameters, CLIP-Adapter's MLP and LoRA's
factors decay (zero is the frozen model they start near); VPT's prompt
tokens and CoOp's contexts do not. The rule is by parameter path, like the
partition rules: a trainable parameter no rule covers is an error.
"""

import jax
import ml_collections
import optax

from medbridge_jax import errors
from medbridge_jax.model import partition


def schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> lr linearly over warmup_steps, then cosine to 0 at `steps`."""
  if train.steps < 1:
    raise errors.UserError(f"config.train.steps={train.steps} must be >= 1")
  if not 0 <= train.warmup_steps < train.steps:
    raise errors.UserError(
        f"config.train.warmup_steps={train.warmup_steps} must be in "
        f"[0, config.train.steps={train.steps})")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.lr, warmup_steps=train.warmup_steps,
      decay_steps=train.steps, end_value=0.0)


DECAY_ACTIONS = ("decay", "keep")
# (regex on the parameter path, "decay" | "keep"); the first match decides.
DECAY_RULES = (
    # Loaded towers (also where a method fine-tunes them, nested in a
    # method's module, or CoOp's text tower): pre-trained values.
    (r"^expert_\d+/(.+/)?(text_)?tower/", "keep"),
    (r"/(bias|scale)$", "keep"),
    (r"^expert_\d+/fusion/block_\d+/(attn/(query|key|value|out)|fc1|fc2)"
     r"/kernel$", "decay"),
    (r"^gate/(hidden|logits)/kernel$", "decay"),
    (r"^expert_\d+/encoder/queries$", "keep"),
    (r"^expert_\d+/fusion/view_type$", "keep"),
    (r"^expert_\d+/head/kernel$", "keep"),
    # The baselines (methods.py). CLIP-Adapter's MLP and LoRA's factors
    # decay toward zero, i.e. toward the frozen features the method starts
    # near; VPT prompts and CoOp contexts are tokens (decayed, they would
    # lose what they are: the context words' embeddings CoOp starts from).
    (r"^expert_\d+/adapter/(down|up)/kernel$", "decay"),
    (r"^expert_\d+/peft/lora/layers_\d+/\w+/(a|b)$", "decay"),
    (r"^expert_\d+/peft/prompts$", "keep"),
    (r"^expert_\d+/prompts/(positive|negative)_context$", "keep"),
)


def decay_mask(params, rules: partition.Rules = DECAY_RULES):
  """A tree like `params` of bools: True where weight decay applies."""
  actions = partition.match(params, rules, DECAY_ACTIONS, "weight-decay")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: actions[partition.path_string(path)] == "decay", params)


def make(train: ml_collections.ConfigDict,
         decay_rules: partition.Rules = DECAY_RULES
         ) -> optax.GradientTransformation:
  """The optimizer of `config.train`: clip -> AdamW(schedule), decaying the
  parameters `decay_rules` say "decay" to."""
  parts = []
  if train.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train.grad_clip))
  parts.append(optax.adamw(schedule(train), weight_decay=train.weight_decay,
                           mask=lambda p: decay_mask(p, decay_rules)))
  return optax.chain(*parts)
