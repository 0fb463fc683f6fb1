"""Compute matching: the experts' input geometry and patch tokens per image."""

import math

import ml_collections

from medbridge_jax import errors
from medbridge_jax.experts import from_config
from medbridge_jax.experts import loader
from medbridge_jax.experts import random_experts


def expert_geometry(config: ml_collections.ConfigDict
                    ) -> list[tuple[int, int]]:
  """(input side, patch size) of each expert, without loading weights."""
  out = []
  if config.experts:
    for path in from_config.expert_paths(config)[0]:
      vision = loader.vision_config(path)
      out.append((vision.image_size, vision.patch_size))
  else:
    for spec in from_config.as_list(config.random_experts,
                                      "config.random_experts"):
      _, v = random_experts.parse_spec(spec)
      out.append((v["image"], v["patch"]))
  return out


def training_tokens(config: ml_collections.ConfigDict) -> int:
  """Patch tokens per image in a training step of `config`, all experts."""
  f = config.model.focal
  total = 0
  for side, patch in expert_geometry(config):
    if f.enabled:
      total += int(f.num_local) * (side // patch) ** 2
    if f.global_view or not f.enabled:  # Focal off keeps the global view.
      total += ((int(f.global_side) or side) // patch) ** 2
  return total


def matched_global_side(config: ml_collections.ConfigDict) -> int:
  """The whole-image side whose single view per expert costs full's tokens.

  Compute is matched on patch tokens per training image over all experts:
  full reads 1 + num_local views of each expert's own side; the returned
  side G (a multiple of every expert's patch, at most data.image_size) is
  the one whose one view per expert gives the nearest token count (the
  smaller G on a tie). Default: 5 x 64 + 5 x 36 = 500 tokens; G = 128
  gives 2 x 256 = 512.
  """
  geometry = expert_geometry(config)
  target = training_tokens(config)
  step = math.lcm(*(p for _, p in geometry))
  sides = range(step, int(config.data.image_size) + 1, step)
  if not sides:
    raise errors.UserError(
        f"data.image_size={config.data.image_size} is smaller than the "
        f"experts' patch ({step} px): no whole-image view to match")
  return min(sides, key=lambda g: (abs(sum((g // p) ** 2
                                           for _, p in geometry) - target), g))
