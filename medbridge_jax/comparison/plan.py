"""Which methods run, with which configs, in which sub-workdirs."""

from typing import Sequence

import ml_collections

from medbridge_jax.ablation import runs
from medbridge_jax.ablation import variants
from medbridge_jax import config_check
from medbridge_jax import errors
from medbridge_jax import methods

REFERENCE = "medbridge"  # Every method's paired differences are against it.


def check_names(names: Sequence[str]) -> list[str]:
  """The --methods names (all of `methods.NAMES` if none), checked, with
  the reference first (added when not named)."""
  known = list(methods.NAMES)
  names = list(names) or known
  for name in names:
    config_check.one_of("--methods", name, known)
  if len(set(names)) != len(names):
    raise errors.UserError(f"--methods names a method twice: "
                           f"{','.join(names)}")
  return [REFERENCE] + [n for n in names if n != REFERENCE]


def method_config(config: ml_collections.ConfigDict, name: str,
                  seed: int) -> ml_collections.ConfigDict:
  """A copy of `config` training method `name` with seed `seed`; the other
  config.method.* settings stay as given."""
  return variants.variant_config(
      config, variants.Variant(name, "", (("method.name", name),)), seed)


def descriptions(config: ml_collections.ConfigDict,
                 names: Sequence[str]) -> dict[str, str]:
  """name -> `methods.describe` of its config (what trains, its settings)."""
  return {n: methods.describe(method_config(config, n, int(config.seed)))
          for n in names}


def jobs(config: ml_collections.ConfigDict, workdir: str,
         names: Sequence[str], run_seeds: Sequence[int]) -> list[tuple]:
  """((name, seed), config, workdir/<name>/seed<seed>) for every method and
  seed, for `runs.train_all`: every method trains with the same seeds."""
  return [((n, s), method_config(config, n, s),
           runs.run_folder(workdir, n, s))
          for n in names for s in run_seeds]
