"""The smallest real training run, shared by the end-to-end tests.

`tiny_config(**overrides)` is the runlocal variant made cheaper still
(2-layer experts, 128 px images, 40 patients); `as_flags` gives the same
overrides as command-line flags; `private_cache` points MEDBRIDGE_CACHE at
a fresh folder for one test module (use it inside a module-scoped fixture);
`edited_expert` moves one tower weight of an expert folder for a while.
"""

import contextlib
import os
import shutil

import numpy as np

from configs import in_domain
from medbridge_jax import experts
from medbridge_jax.experts import random_experts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "random_experts": ("clip:width=32,layers=2,heads=2,patch=8,image=32",
                       "siglip:width=32,layers=2,heads=2,patch=8,image=32"),
    "data.image_size": 128,
    "data.synthetic.num_patients": 40,
    "model.queries.inject_layer": -1,
    "eval.bootstrap": 5,
}


def tiny_config(**overrides):
  """runlocal with TINY and then `overrides` ({"dotted.key": value})."""
  c = in_domain.get_config("runlocal")
  for key, value in {**TINY, **overrides}.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def as_flags(**overrides):
  """TINY and `overrides` as --config.<key>=<value> flags."""
  out = []
  for key, value in {**TINY, **overrides}.items():
    out.append(f"--config.{key}={value!r}" if isinstance(value, tuple)
               else f"--config.{key}={value}")
  return out


def private_cache(tmp_path_factory):
  """Yields a fresh cache folder set as MEDBRIDGE_CACHE, then restores it."""
  path = str(tmp_path_factory.mktemp("cache"))
  old = os.environ.get("MEDBRIDGE_CACHE")
  os.environ["MEDBRIDGE_CACHE"] = path
  yield path
  if old is None:
    del os.environ["MEDBRIDGE_CACHE"]
  else:
    os.environ["MEDBRIDGE_CACHE"] = old


@contextlib.contextmanager
def edited_expert(folder: str, keep_dir: str):
  """Within the block, one vision weight of the expert in `folder` is off by
  1e-3 (as an edited or re-pre-trained folder would be); restored after.
  `keep_dir` holds the original file meanwhile."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  file = os.path.join(folder, "model.safetensors")
  kept = os.path.join(keep_dir, "original.safetensors")
  shutil.copy(file, kept)
  weights = safetensors.numpy.load_file(file)
  name = next(k for k in sorted(weights) if k.startswith("vision_model.")
              and weights[k].ndim == 2)
  weights[name] = weights[name] + np.float32(1e-3)
  try:
    safetensors.numpy.save_file(weights, file)
    yield
  finally:
    shutil.copy(kept, file)


def random_experts_in(root, specs):
  """Writes test-bed experts `specs` (seed = position) under `root` and
  loads them."""
  out = []
  for i, spec in enumerate(specs):
    random_experts.write(os.path.join(str(root), f"e{i}"), spec, seed=i)
    out.append(experts.load(os.path.join(str(root), f"e{i}")))
  return out
