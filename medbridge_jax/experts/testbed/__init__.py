"""The embedded default's test-bed experts, pre-trained once and shipped.

Pre-training (`experts.pretrain`) is deterministic only per platform: XLA's
CPU code differs between CPUs, so experts pre-trained on each machine would
differ, and so would every number measured with them. The folders under
this package were made once by `python -m medbridge_jax.experts.testbed`
(see `__main__.py`); `pretraining.json` in each says how, where and when.
`from_config` loads them in place whenever a spec, its seed and the
current pre-training recipe match one, so every machine gets the same
experts and no first run spends minutes pre-training.

Shipped: each of `default_config.RANDOM_EXPERT_SHAPES` (seed = its position,
as `from_config` numbers them) with `pretrain=PRETRAIN_STEPS`, on all
generic shapes and with `pretrain_shapes=heldout` (no blobs, no thin lines).
"""

import os
import re
from typing import Iterable, Optional

from medbridge_jax import default_config
from medbridge_jax import errors
from medbridge_jax import jsonfile
from medbridge_jax.experts import random_experts

ROOT = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("all", "heldout")  # pretrain_shapes of the shipped folders.


def shipped_specs(steps: Optional[int] = None) -> list[tuple[str, int]]:
  """(spec, seed) of every shipped folder; `steps` replaces PRETRAIN_STEPS."""
  steps = default_config.PRETRAIN_STEPS if steps is None else steps
  out = []
  for shapes in VARIANTS:
    for seed, shape in enumerate(default_config.RANDOM_EXPERT_SHAPES):
      spec = f"{shape},pretrain={steps}"
      out.append((spec if shapes == "all" else
                  f"{spec},pretrain_shapes={shapes}", seed))
  return out


def folder_name(spec: str, seed: int) -> str:
  """A file-system-safe folder name for expert `spec` with `seed`."""
  return re.sub(r"[^A-Za-z0-9=.-]+", "_", spec) + f"-seed{seed}"


def _read_record(path: str) -> Optional[dict]:
  try:
    return jsonfile.read(os.path.join(path, "pretraining.json"),
                         "pre-training record")
  except errors.UserError:
    return None


def find(spec: str, seed: int, root: str = ROOT) -> Optional[str]:
  """The shipped folder made from `spec` and `seed` by today's recipe.

  Specs are compared as parsed (key order and defaults do not matter); the
  recipe (`random_experts.pretraining_record`) must match too, so weights
  made by an older pre-training are never taken for today's. None if no
  shipped folder matches.
  """
  want = random_experts.parse_spec(spec)
  if not want[1]["pretrain"]:
    return None  # Plain random experts are written in a second.
  record = {k: v for k, v in random_experts.pretraining_record(
      spec, seed).items() if k != "spec"}
  for name in sorted(os.listdir(root)):
    if ".tmp-" in name:  # A folder random_experts.write is still making.
      continue
    path = os.path.join(root, name)
    got = _read_record(path) if os.path.isdir(path) else None
    if (got is not None and "spec" in got and
        random_experts.parse_spec(got["spec"]) == want and
        all(got.get(k) == v for k, v in record.items())):
      return path
  return None


def write(out: str, steps: Optional[int] = None,
          only: Iterable[str] = ()) -> list[str]:
  """Writes the shipped folders into `out`; returns their paths.

  `steps` replaces PRETRAIN_STEPS (a quick regeneration, for tests);
  `only` keeps the folders of those names.
  """
  only = set(only)
  paths = []
  for spec, seed in shipped_specs(steps):
    name = folder_name(spec, seed)
    if only and name not in only:
      continue
    paths.append(random_experts.write(os.path.join(out, name), spec, seed))
  return paths
