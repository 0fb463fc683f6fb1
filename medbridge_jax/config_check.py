"""Every config mistake that needs no data and no experts, found at load.

`check(config)` raises `UserError` for the first problem: a key the schema
(`default_config.get_default()`) lacks or a value of the wrong type, a name
outside its enum (with the nearest valid name), a number out of its range,
or two fields that cannot go together. The command line runs it right after
the config is loaded (`cli.load_config`), before data is generated or
experts are loaded; `medbridge.settings_from_config` runs `check_model` on
`config.model`, so a model is never built from an unchecked one.

The valid names come from the modules that use them (`vit.MODES`,
`focal_sampling.RESIZE_METHODS`, `registry.known()`...): a mode added there
is valid here at once. This module holds only the rules no other module
states as data; each says where the rule comes from.
"""

import difflib
import inspect
import math
from typing import Any, Callable, Optional, Sequence

import ml_collections

from medbridge_jax import default_config
from medbridge_jax import methods
from medbridge_jax.experts import from_config
from medbridge_jax.data import labels as labels_lib
from medbridge_jax.data import pipeline
from medbridge_jax.data import registry
from medbridge_jax.data import synthetic
from medbridge_jax.data import synthetic_draw
from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts import random_experts
from medbridge_jax.experts import vit
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import losses
from medbridge_jax.model import medbridge
from medbridge_jax.model import moe
from medbridge_jax.model import peft
from medbridge_jax.model import query_encoder



def _model_enums() -> tuple:
  """(key under config.model, valid names) of every model enum."""
  return (
      ("compute_dtype", tuple(medbridge.DTYPES)),
      ("attention_impl", layers.ATTENTION_IMPLS),
      ("focal.resize", focal_sampling.RESIZE_METHODS),
      ("focal.train_windows", focal_sampling.TRAIN_WINDOWS),
      ("queries.mode", vit.MODES),
      ("moe.gating", moe.GATINGS),
  )


def _enums() -> tuple:
  """(key under config, valid names) of every enum outside config.model."""
  return (
      ("data.uncertain_policy", labels_lib.UNCERTAIN_POLICIES),
      ("data.blank_policy", labels_lib.BLANK_POLICIES),
      ("data.on_bad_image", pipeline.BAD_IMAGE_POLICIES),
      ("data.synthetic.variant", synthetic_draw.VARIANTS),
      ("loss.kind", losses.KINDS),
      ("loss.class_weights", losses.CLASS_WEIGHTS),
  )


def _finite(v) -> bool:
  return math.isfinite(v)


# (key, rule, what the rule says): numbers that must hold whatever else the
# config says. Finite numbers only (nan compares false to everything).
_MODEL_RANGES = (
    ("queries.num_queries", lambda v: v >= 0, ">= 0 (0 = no queries)"),
    ("queries.init_std", lambda v: _finite(v) and v > 0, "> 0"),
    ("fusion.num_layers", lambda v: v >= 0, ">= 0"),
    ("moe.top_k", lambda v: v >= 1, ">= 1"),
    ("moe.balance_loss", lambda v: _finite(v) and v >= 0, ">= 0"),
    ("moe.gate_hidden", lambda v: v >= 0, ">= 0 (0 = a linear gate)"),
)
# config.method's knobs (methods.py, model/baselines.py, model/peft.py).
_METHOD_RANGES = (
    ("adapter_reduction", lambda v: v >= 1, ">= 1"),
    ("adapter_ratio", lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    ("vpt_prompts", lambda v: v >= 1, ">= 1"),
    ("lora_rank", lambda v: v >= 1, ">= 1"),
    ("lora_alpha", lambda v: _finite(v) and v > 0, "> 0"),
    ("finetune_last", lambda v: v == -1 or v >= 1,
     "-1 (every block) or >= 1"),
)
_RANGES = (
    ("seed", lambda v: v >= 0, ">= 0"),
    ("data.image_size", lambda v: v >= 1, ">= 1"),
    ("data.train_fraction", lambda v: _finite(v) and 0 < v <= 1,
     "in (0, 1]"),
    ("data.num_workers", lambda v: v >= 0, ">= 0 (0 = in the main process)"),
    ("data.synthetic.seed", lambda v: v >= 0, ">= 0"),
    ("loss.gamma_pos", lambda v: _finite(v) and v >= 0, ">= 0"),
    ("loss.gamma_neg", lambda v: _finite(v) and v >= 0, ">= 0"),
    ("loss.clip", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.grad_accum", lambda v: v >= 1, ">= 1"),
    ("train.lr", lambda v: _finite(v) and v > 0, "> 0"),
    ("train.weight_decay", lambda v: _finite(v) and v >= 0, ">= 0"),
    ("train.grad_clip", lambda v: _finite(v) and v >= 0, ">= 0 (0 = off)"),
    ("train.log_every", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("train.eval_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("train.checkpoint_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
    ("train.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("eval.batch_size", lambda v: v >= 1, ">= 1"),
    ("eval.bootstrap", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("mesh.data", lambda v: v == -1 or v >= 1, "-1 (all devices) or >= 1"),
)


def check(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for the first mistake in `config` (see the module
  docstring); touches no file, data set or device."""
  _check_schema(config, default_config.get_default(), "config")
  _check_model(config.model)
  check_method(config.method)
  for key, names in _enums():
    one_of(f"config.{key}", _get(config, key), names)
  for key, rule, says in _RANGES:
    in_range(f"config.{key}", _get(config, key), rule, says)
  _check_data(config)
  geometry = _random_expert_geometry(config)
  _check_top_k(config.model.moe,
               len(geometry) if geometry is not None
               else len(from_config.as_list(config.experts,
                                              "config.experts")))
  # The focal rules need the experts' input sides: those of random experts
  # are in their specs; real experts are checked again when loaded.
  sides = [g["image"] for g in geometry or ()]
  focal_sampling.check_config(int(config.data.image_size), sides,
                              config.model.focal)
  for k, g in enumerate(geometry or ()):
    check_finetune_depth(config.method, g["layers"],
                          f"config.random_experts[{k}]")
    try:
      query_encoder.resolve_layer(int(config.model.queries.inject_layer),
                                  g["layers"])
    except UserError as e:
      raise UserError(f"{e} (config.random_experts[{k}])") from None
  train = config.train
  if train.batch_size % train.grad_accum:
    raise UserError(f"config.train.batch_size={train.batch_size} is not "
                    f"divisible by config.train.grad_accum="
                    f"{train.grad_accum}")
  # optim.schedule: warm-up then a cosine decay that needs steps left.
  if not 0 <= train.warmup_steps < train.steps:
    raise UserError(f"config.train.warmup_steps={train.warmup_steps} must be "
                    f"in [0, config.train.steps={train.steps})")
  _check_prompts(config.zero_shot)


def check_model(model_config: ml_collections.ConfigDict) -> None:
  """`check`'s rules that need only `config.model` (not the focal sizes,
  which need the images' and the experts' sides: `focal_sampling`)."""
  _check_schema(model_config, default_config.get_default().model,
                "config.model")
  _check_model(model_config)


def _check_model(m: ml_collections.ConfigDict) -> None:
  for key, names in _model_enums():
    one_of(f"config.model.{key}", _get(m, key), names)
  for key, rule, says in _MODEL_RANGES:
    in_range(f"config.model.{key}", _get(m, key), rule, says)
  if m.fusion.enabled:
    in_range("config.model.fusion.num_heads", m.fusion.num_heads,
             lambda v: v >= 1,
             ">= 1 (config.model.fusion.enabled=False turns fusion off)")
  if m.fusion.keep_global and not m.focal.global_view:
    raise UserError("config.model.fusion.keep_global=True needs a global "
                    "view (config.model.focal.global_view=True)")


def check_method(m: ml_collections.ConfigDict) -> None:
  """`config.method`'s rules: schema, the method's name, every knob's
  range (all knobs, whichever method is chosen: a typo waits for no one)."""
  _check_schema(m, default_config.get_default().method, "config.method")
  one_of("config.method.name", m.name, methods.NAMES)
  for key, rule, says in _METHOD_RANGES:
    in_range(f"config.method.{key}", m[key], rule, says)
  targets = m.lora_targets
  if isinstance(targets, str) or not targets:
    raise UserError(f"config.method.lora_targets={targets!r} must be a "
                    f"tuple of one or more of {peft.LORA_TARGETS}")
  for t in targets:
    one_of("config.method.lora_targets entry", t, peft.LORA_TARGETS)
  if len(set(targets)) != len(targets):
    raise UserError(f"config.method.lora_targets={tuple(targets)!r} names "
                    f"a projection twice")


def check_finetune_depth(m: ml_collections.ConfigDict, num_layers: int,
                          where: str) -> None:
  # methods.partition_rules: the last finetune_last blocks of each tower.
  if m.name == "finetune" and m.finetune_last > num_layers:
    raise UserError(f"config.method.finetune_last={m.finetune_last} is more "
                    f"than the {num_layers} blocks of {where} (-1 fine-tunes "
                    f"every block)")


# ---------------------------------------------------------------------------
# Helpers: one line per mistake, naming the key.


def one_of(key: str, value: Any, names: Sequence[Any]) -> None:
  """UserError unless `value` is one of `names`; suggests the nearest."""
  if value in tuple(names):
    return
  near = difflib.get_close_matches(str(value), [str(n) for n in names], n=1)
  hint = f" (did you mean {near[0]!r}?)" if near else ""
  raise UserError(f"{key}={value!r} is not one of "
                  f"{', '.join(repr(n) for n in names)}{hint}")


def in_range(key: str, value: Any, rule: Callable[[Any], bool],
             says: str) -> None:
  """UserError unless `rule(value)`; `says` is the rule in words."""
  if not rule(value):
    raise UserError(f"{key}={value!r} must be {says}")


def _get(node: Any, key: str) -> Any:
  for part in key.split("."):
    node = node[part]
  return node


def _is_node(value: Any) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _type_ok(value: Any, default: Any) -> bool:
  """Whether `value` has the type the schema's `default` has (an int is a
  float; a list or, for lists of names, one string is a tuple)."""
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list, str))
  return isinstance(value, type(default))


_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a number",
               str: "a string", tuple: "a tuple"}


def _check_schema(node: Any, schema: Any, prefix: str) -> None:
  """UserError for a key the schema lacks or has no more, or a value of
  another type than the schema's default."""
  have, want = list(node.keys()), list(schema.keys())
  for key in have:
    if key not in want:
      near = difflib.get_close_matches(key, want, n=1)
      hint = f" (did you mean {prefix}.{near[0]}?)" if near else ""
      raise UserError(f"unknown config key {prefix}.{key}{hint}")
  for key in want:
    if key not in have:
      raise UserError(f"config key {prefix}.{key} is missing (the config "
                      f"must start from default_config.get_default())")
    value, default = node[key], schema[key]
    if _is_node(default):
      if not _is_node(value):
        raise UserError(f"{prefix}.{key}={value!r} must be a group of keys")
      _check_schema(value, default, f"{prefix}.{key}")
    elif not _type_ok(value, default):
      raise UserError(f"{prefix}.{key}={value!r} must be "
                      f"{_TYPE_WORDS.get(type(default), type(default))}, "
                      f"like its default {default!r}")


# ---------------------------------------------------------------------------
# Data.


def _names(value: Any, key: str) -> list:
  """A tuple of distinct non-empty strings, as a list."""
  if isinstance(value, str) or not all(
      isinstance(v, str) and v for v in value):
    raise UserError(f"{key}={value!r} must be a tuple of names")
  twice = sorted({v for v in value if list(value).count(v) > 1})
  if twice:
    raise UserError(f"{key} names {twice[0]!r} twice")
  return list(value)


def _dataset(name: str, root: str, key: str) -> tuple[str, str]:
  """(registry name, synthetic variant or "") of a data set name, checked
  as `data.resolve` reads it ("synthetic:nih" is a generated variant)."""
  base, _, variant = name.partition(":")
  valid = registry.known() + tuple(f"synthetic:{v}"
                                   for v in synthetic_draw.VARIANTS)
  if base not in registry.known() or (variant and base != "synthetic"):
    one_of(key, name, valid)
  if variant:
    one_of(key, name, tuple(f"synthetic:{v}" for v in synthetic_draw.VARIANTS))
    if root:
      raise UserError(f"{key}={name!r} names generated data: it takes no "
                      f"root (got {root!r})")
  return base, variant


def _reader_splits(base: str, variant: str, root: str,
                   d: ml_collections.ConfigDict) -> Optional[tuple]:
  """The split names the data set's reader takes, if its module lists them
  (`SPLITS`); generated synthetic data is read by its layout's reader."""
  if base == "synthetic":
    if root:
      return None  # A folder's layout decides its reader.
    base = variant or d.synthetic.variant
  module = inspect.getmodule(registry.reader(base))
  return getattr(module, "SPLITS", None)


def _check_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  base, variant = _dataset(d.dataset, d.root, "config.data.dataset")
  splits = _reader_splits(base, variant, d.root, d)
  roles = ("train_split", "valid_split", "test_split")
  for role in roles:
    if splits is not None:
      one_of(f"config.data.{role}", d[role], splits)
    elif not d[role]:
      raise UserError(f"config.data.{role} is empty")
  # Train on one split, pick checkpoints on another, report on a third:
  # data.resolve finds shared patients only after reading the data.
  for i, a in enumerate(roles):
    for b in roles[i + 1:]:
      if d[a] == d[b]:
        raise UserError(f"config.data.{a} and config.data.{b} are both "
                        f"{d[a]!r}: training, validation and test need "
                        f"three splits")
  generated = base == "synthetic" and not d.root
  if isinstance(d.test_datasets, str):
    raise UserError(f"config.data.test_datasets={d.test_datasets!r} must be "
                    f"a tuple of (dataset, root, split) triples")
  for i, item in enumerate(d.test_datasets):
    key = f"config.data.test_datasets[{i}]"
    if (isinstance(item, str) or len(item) != 3
        or not all(isinstance(v, str) for v in item)):
      raise UserError(f"{key}={item!r} is not (dataset, root, split)")
    name, root, split = item
    t_base, t_variant = _dataset(name, root, key)
    t_splits = _reader_splits(t_base, t_variant, root, d)
    if t_splits is not None:
      one_of(f"{key} split", split, t_splits)
    generated = generated or (t_base == "synthetic" and not root)
  if generated:
    # synthetic.ensure's limits, and its dose knobs.
    in_range("config.data.image_size", d.image_size,
             lambda v: v >= synthetic.MIN_IMAGE_SIZE,
             f">= {synthetic.MIN_IMAGE_SIZE} for generated synthetic data")
    in_range("config.data.synthetic.num_patients", d.synthetic.num_patients,
             lambda v: v >= synthetic.MIN_PATIENTS,
             f">= {synthetic.MIN_PATIENTS}")
    synthetic_draw.check_dose(d.synthetic.focal_scale,
                              d.synthetic.focal_contrast)
  chosen = _names(d.labels, "config.data.labels")
  known = chosen
  if not known and base == "synthetic" and not variant and not d.root:
    known = list(synthetic.label_names(d.synthetic.variant))
  mean = _names(config.eval.mean_labels, "config.eval.mean_labels")
  for name in mean if known else ():
    # metrics.label_indices matches the run's label names exactly.
    one_of("config.eval.mean_labels entry", name, known)


# ---------------------------------------------------------------------------
# Experts and prompts.


def _random_expert_geometry(config: ml_collections.ConfigDict
                            ) -> Optional[list]:
  """The parsed specs of the random experts in use (None with real ones)."""
  if from_config.as_list(config.experts, "config.experts"):
    return None
  specs = from_config.as_list(config.random_experts,
                                "config.random_experts")
  if not specs:
    raise UserError("no experts: set config.experts to expert folders "
                    "(CLIP, SigLIP, open_clip, DINOv2, a VLM) or "
                    "config.random_experts to specs")
  out = []
  for k, spec in enumerate(specs):
    try:
      out.append(random_experts.parse_spec(spec)[1])
    except UserError as e:
      raise UserError(f"config.random_experts[{k}]: {e}") from None
  return out


def _check_top_k(moe_config: ml_collections.ConfigDict, k: int) -> None:
  # moe.Gate: top_k gating keeps 1..K experts (no gate with one expert).
  if (moe_config.enabled and moe_config.gating == "top_k" and k > 1
      and moe_config.top_k > k):
    raise UserError(f"config.model.moe.top_k={moe_config.top_k} must be in "
                    f"[1, {k}] (the number of experts)")


def _check_prompts(zero_shot_config: ml_collections.ConfigDict) -> None:
  # experts.zero_shot.prompts formats each label into both prompts.
  for key in ("positive", "negative"):
    template = zero_shot_config[key]
    ok = "{label}" in template
    try:
      template.format(label="x")
    except (KeyError, IndexError, ValueError):
      ok = False
    if not ok:
      raise UserError(f"config.zero_shot.{key}={template!r} must hold "
                      f"{{label}} (and no other {{...}})")
