"""From `config.experts` / `config.random_experts` to loaded `Expert`s.

Real checkpoints are local Hugging Face folders named in `config.experts`.
When none are named, the small test-bed experts described by
`config.random_experts` are used: the embedded default's pre-trained ones
ship with the package (`experts.testbed`) and are loaded from there, the
same on every machine; any other spec is written once as a Hugging Face
folder into the cache (`cache.path("experts")`).
All load through the same `loader.load` real checkpoints use. Nothing here
touches the network.
"""

import os
import shutil
import tempfile
from typing import Sequence

from absl import logging
import ml_collections

from medbridge_jax import cache
from medbridge_jax import errors
from medbridge_jax.experts import loader
from medbridge_jax.experts import random_experts
from medbridge_jax.experts import testbed
from medbridge_jax.model import medbridge


def compute_dtype(config: ml_collections.ConfigDict):
  """The experts' compute dtype (config_check has vetted the name)."""
  return medbridge.DTYPES[config.model.compute_dtype]


def random_expert_folder(spec: str, seed: int) -> str:
  """The Hugging Face folder of test-bed expert `spec` with `seed`.

  The shipped folder when one was made from this spec, seed and recipe
  (`experts.testbed.find`), used in place: nothing is written, and a cached
  copy can never go stale when the shipped weights are regenerated.
  Otherwise the cached folder, written once: to a temporary folder renamed
  into place, so a run killed while writing never leaves a half folder that
  later runs would load.
  """
  shipped = testbed.find(spec, seed)
  if shipped:
    return shipped
  root = cache.path("experts")
  path = os.path.join(root, testbed.folder_name(spec, seed))
  if os.path.isdir(path):
    return path
  try:
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
  except OSError as e:
    raise errors.UserError(
        f"cannot write random experts into the cache {root}: {e.strerror} "
        f"(set MEDBRIDGE_CACHE to a writable folder)") from None
  try:
    random_experts.write(tmp, spec, seed)
    os.rename(tmp, path)
  except OSError:
    # Another process finished the same folder first; theirs is as good.
    if not os.path.isdir(path):
      raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return path


def expert_paths(config: ml_collections.ConfigDict) -> tuple[list[str], bool]:
  """(folders to load, whether they are generated random experts)."""
  if config.experts:
    paths = []
    for i, p in enumerate(as_list(config.experts, "config.experts")):
      full = os.path.abspath(os.path.expanduser(p))
      if not os.path.isdir(full):
        raise errors.UserError(
            f"expert folder not found: {p} (config.experts[{i}])")
      paths.append(full)
    return paths, False
  specs = as_list(config.random_experts, "config.random_experts")
  if not specs:
    raise errors.UserError(
        "no experts: set config.experts to expert folders (CLIP, SigLIP, "
        "open_clip, DINOv2, a VLM) or config.random_experts to specs")
  # Random experts stand in for fixed pretrained models: their seeds are their
  # positions, not config.seed, so every training seed sees the same experts.
  return [random_expert_folder(s, i) for i, s in enumerate(specs)], True


def as_list(value, name: str) -> list[str]:
  """`config.experts` / `config.random_experts` (named `name`) as a list."""
  if isinstance(value, str):
    # --config.experts=/a/path (one string) is a common way to pass one.
    value = [v for v in value.split(",") if v]
  if not isinstance(value, Sequence) or not all(
      isinstance(v, str) for v in value):
    raise errors.UserError(f"{name} must be a tuple of strings; got {value!r}")
  return list(value)


def announce(config: ml_collections.ConfigDict) -> None:
  """Says in one line, at start, when small test-bed experts stand in."""
  if config.experts:
    return
  specs = as_list(config.random_experts, "config.random_experts")
  pretrained = any(random_experts.parse_spec(s)[1]["pretrain"] for s in specs)
  # Seeds are positions, as in expert_paths.
  shipped = sum(testbed.find(s, i) is not None for i, s in enumerate(specs))
  where = []
  if shipped:
    where.append(f"{shipped} shipped with the package ({testbed.ROOT})")
  if shipped < len(specs):
    where.append(f"{len(specs) - shipped} written once to "
                 f"{cache.path('experts')}")
  logging.info(
      "No pretrained experts configured (config.experts): using %d small "
      "test-bed experts, not real weights (%s): randomly initialised%s; %s.",
      len(specs), "; ".join(specs),
      (", vision towers given pretrain=N steps of generic synthetic "
       "pre-training (shapes on textures; no chest X-rays)")
      if pretrained else "", ", ".join(where))


def load(config: ml_collections.ConfigDict) -> list:
  """The experts of `config`, loaded, computing in model.compute_dtype."""
  dtype = compute_dtype(config)
  paths, _ = expert_paths(config)
  return [loader.load(p, dtype=dtype) for p in paths]


def display_names(loaded: Sequence, real: bool) -> list[str]:
  """Short unique names for reports: the folder name, or "clip (random)"."""
  names = [e.name if real else f"{e.family} (random)" for e in loaded]
  return [f"{n} #{k}" if names.count(n) > 1 else n
          for k, n in enumerate(names)]
