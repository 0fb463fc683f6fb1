"""The grid's variants: the task config with a few switches changed."""

import copy
import dataclasses
import os
from typing import Optional

from absl import logging
import ml_collections

from medbridge_jax.ablation import tokens
from medbridge_jax import errors
from medbridge_jax.experts import from_config
from medbridge_jax.experts import random_experts

REFERENCE = "full"  # Every variant's paired differences are against it.
# random_experts spec item of the held-out-shapes pre-training (no disks, no
# thin lines: experts.pretrain).
HELDOUT_ITEM = "pretrain_shapes=heldout"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the grid: a name, what it changes, the config overrides."""
  name: str
  description: str
  # ((dotted config key, value), ...), or the special keys "single_expert"
  # (keep expert k only) and "random_experts_item" (add to every spec).
  overrides: tuple


@dataclasses.dataclass(frozen=True)
class Fact:
  """An override value that depends on the config: `_facts(config)[name]`."""
  name: str


# Rows (name, what changes, overrides) in table order. "What changes" is a
# str.format template over `_facts`; a `Fact` value is filled in the same way.
SWITCHES = (
    ("full", "MedBridge: global + local views, queries, fusion, MoE", ()),
    ("global_only", "focal sampling off (global view only)",
     (("model.focal.enabled", False),)),
    ("local_only", "local views only ({num_local} crops in training), no "
     "global view", (("model.focal.global_view", False),)),
    ("hires_global", "global view only, at {side} px: {hires} patch tokens "
     "per training image against full's {tokens} (1 + {num_local} views)",
     (("model.focal.enabled", False),
      ("model.focal.global_side", Fact("side")))),
    # MoE off too: a gate over the experts would make it non-linear.
    ("linear_probe", "text-initialised linear probe on the pooled global "
     "features (no focal, queries, fusion, gate)",
     (("model.focal.enabled", False),
      ("model.queries.enabled", False),
      ("model.fusion.enabled", False),
      ("model.moe.enabled", False))),
    ("no_queries", "queries off (pooled features of the views)",
     (("model.queries.enabled", False),)),
    ("no_moe", "MoE off (plain average of the experts)",
     (("model.moe.enabled", False),)),
)
# After the single-expert rows.
SHARED_CROP = (
    "shared_crop", "one crop side for all experts, {crop} px ({resized}), "
    "against each expert's native side",
    (("model.focal.crop_size", Fact("crop")),))
# Last; for pre-trained random experts only.
HELDOUT_PRETRAINING = (
    "heldout_pretraining", "experts pre-trained without the findings' "
    "shapes (no disks, no thin lines)",
    (("random_experts_item", HELDOUT_ITEM),))


def for_config(config: ml_collections.ConfigDict) -> dict[str, Variant]:
  """The grid for `config`, in table order: name -> Variant.

  `single_k` keeps only expert k. Random experts are generated per position
  (their seed is the index), so the single-expert run is pointed at the very
  folder the full model loads as expert k: the same frozen weights.
  `heldout_pretraining` exists for pre-trained random experts only, and only
  where experts.random_experts knows `HELDOUT_ITEM`.
  """
  facts = _facts(config)
  out = ([_variant(row, facts) for row in SWITCHES]
         + _single_experts(config) + [_variant(SHARED_CROP, facts)]
         + [_variant(row, facts) for row in _heldout_rows(config)])
  return {v.name: v for v in out}


def _facts(config: ml_collections.ConfigDict) -> dict:
  """What the descriptions and `Fact` overrides name, from the experts."""
  geometry = tokens.expert_geometry(config)
  side = tokens.matched_global_side(config)
  crop = max(s for s, _ in geometry)
  resized = [f"expert {k} ({s} px) reads them x{s / crop:.2f}"
             for k, (s, _) in enumerate(geometry) if s != crop]
  return dict(side=side, hires=sum((side // p) ** 2 for _, p in geometry),
              tokens=tokens.training_tokens(config), crop=crop,
              num_local=int(config.model.focal.num_local),
              resized="; ".join(resized) or "all read it natively")


def _variant(row: tuple, facts: dict) -> Variant:
  name, description, overrides = row
  return Variant(name, description.format(**facts), tuple(
      (k, facts[v.name] if isinstance(v, Fact) else v)
      for k, v in overrides))


def _single_experts(config: ml_collections.ConfigDict) -> list[Variant]:
  """single_k for each expert k, where there are several."""
  if config.experts:
    names = [os.path.basename(os.path.normpath(p)) for p in
             from_config.as_list(config.experts, "config.experts")]
  else:
    names = [s.split(":", 1)[0] + " (random)"
             for s in from_config.as_list(config.random_experts,
                                            "config.random_experts")]
  if len(names) < 2:
    return []
  return [Variant(f"single_{k}", f"expert {k} alone: {name}",
                  (("single_expert", k),)) for k, name in enumerate(names)]


def _heldout_rows(config: ml_collections.ConfigDict) -> list[tuple]:
  """[HELDOUT_PRETRAINING] where every random expert is pre-trained and
  knows HELDOUT_ITEM, else []."""
  if config.experts:
    return []
  specs = from_config.as_list(config.random_experts,
                                "config.random_experts")
  pretrained = all(random_experts.parse_spec(s)[1]["pretrain"]
                   for s in specs)
  if pretrained and all(_heldout_supported(s) for s in specs):
    return [HELDOUT_PRETRAINING]
  if pretrained:
    logging.warning("Ablation: no heldout_pretraining variant (this "
                    "experts.random_experts does not know %r).",
                    HELDOUT_ITEM)
  return []


def _heldout_supported(spec: str) -> bool:
  try:
    random_experts.parse_spec(f"{spec},{HELDOUT_ITEM}")
  except errors.UserError:
    return False
  return True


def set_key(c: ml_collections.ConfigDict, key: str, value) -> None:
  """c.<dotted key> = value."""
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


def variant_config(config: ml_collections.ConfigDict, variant: Variant,
                   seed: Optional[int] = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the variant's overrides (and `seed`) applied."""
  c = copy.deepcopy(config)
  for key, value in variant.overrides:
    if key == "single_expert":
      _keep_one_expert(c, value)
    elif key == "random_experts_item":
      c.random_experts = tuple(
          f"{s},{value}" for s in from_config.as_list(
              c.random_experts, "config.random_experts"))
    else:
      set_key(c, key, value)
  if seed is not None:
    c.seed = int(seed)
  return c


def _keep_one_expert(c: ml_collections.ConfigDict, k: int) -> None:
  if c.experts:
    c.experts = (from_config.as_list(c.experts, "config.experts")[k],)
  else:
    spec = from_config.as_list(c.random_experts, "config.random_experts")[k]
    c.experts = (from_config.random_expert_folder(spec, k),)
