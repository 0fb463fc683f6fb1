"""Which parameters train and which stay frozen, by regex rules.

A rule is `(regex, action)` with action "train" or "frozen"; a parameter's
path is its keys joined by "/" (e.g. "expert_0/tower/layers_3/mlp/fc1/kernel"
inside the "params" collection). The first rule whose regex `re.search`es the
path decides. A parameter no rule covers is an error naming it, so a new
module can never be trained or frozen by accident (big_vision's habit).

The optimizer only ever sees `trainable`; `frozen` is passed to the model
unchanged, so it gets no gradient, no optimizer state and no update.
"""

import re
from typing import Any, Dict, Sequence, Tuple

from flax import traverse_util
import numpy as np

from medbridge_jax.errors import UserError

Rules = Sequence[Tuple[str, str]]
ACTIONS = ("train", "frozen")

# The frozen experts' towers stay as loaded; everything MedBridge adds trains.
DEFAULT_RULES = (
    (r"^expert_\d+/tower/", "frozen"),
    (r".*", "train"),
)


def _flat(params) -> Dict[str, Any]:
  return traverse_util.flatten_dict(dict(params), sep="/")


def path_string(key_path) -> str:
  """The rules' "a/b/c" path of a `jax.tree_util` key path into a nested
  dict of parameters."""
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def match(params, rules: Rules, actions: Sequence[str],
          what: str) -> Dict[str, str]:
  """{path: action} for every parameter, by the first rule whose regex
  `re.search`es its path; a rule with an action not in `actions`, or a
  parameter no rule covers, is an error naming it (`what` names the rules
  in the message, e.g. "partition")."""
  compiled = []
  for pattern, action in rules:
    if action not in actions:
      raise UserError(f"{what} rule {pattern!r} has action {action!r}; "
                      f"expected one of {tuple(actions)}")
    compiled.append((re.compile(pattern), action))
  out = {}
  for path in _flat(params):
    for regex, action in compiled:
      if regex.search(path):
        out[path] = action
        break
    else:
      raise UserError(f"parameter {path!r} matches no {what} rule")
  return out


def decide(params, rules: Rules = DEFAULT_RULES) -> Dict[str, str]:
  """{path: "train" | "frozen"} for every parameter; errors on gaps."""
  return match(params, rules, ACTIONS, "partition")


def split(params, rules: Rules = DEFAULT_RULES) -> Tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding disjoint parameters."""
  actions = decide(params, rules)
  flat = _flat(params)
  parts = {a: {p: v for p, v in flat.items() if actions[p] == a}
           for a in ACTIONS}
  return tuple(traverse_util.unflatten_dict(parts[a], sep="/")
               for a in ACTIONS)


def merge(trainable, frozen) -> dict:
  """The full parameter tree back from `split`'s two halves."""
  flat = _flat(trainable)
  for path, value in _flat(frozen).items():
    if path in flat:
      raise ValueError(f"parameter {path!r} is both trainable and frozen")
    flat[path] = value
  return traverse_util.unflatten_dict(flat, sep="/")


def _size(x) -> int:
  return int(np.prod(np.shape(x)))


def count(params, rules: Rules = DEFAULT_RULES) -> Dict[str, int]:
  """{"train": n, "frozen": n} parameter (scalar) counts, for logging."""
  actions = decide(params, rules)
  out = {a: 0 for a in ACTIONS}
  for path, value in _flat(params).items():
    out[actions[path]] += _size(value)
  return out


def describe(params, rules: Rules = DEFAULT_RULES) -> str:
  """One log line: trainable vs frozen parameter counts."""
  n = count(params, rules)
  total = max(1, n["train"] + n["frozen"])
  share = 100 * n["train"] / total
  return (f"parameters: {n['train']:,} trainable ({share:.2f}%), "
          f"{n['frozen']:,} frozen")
