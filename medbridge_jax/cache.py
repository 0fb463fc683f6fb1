"""Where the project keeps what it makes once and reuses.

One folder, `$MEDBRIDGE_CACHE` (default ~/.cache/medbridge_jax), with a
sub-folder per kind: "data" (generated synthetic data sets), "experts"
(test-bed experts not shipped with the package) and "jax_compilation"
(XLA's persistent compilation cache). Deleting it loses nothing but time.
"""

import os


def root() -> str:
  """The cache folder, read from the environment at each call (tests and
  notebooks point it elsewhere after import)."""
  return os.path.abspath(os.path.expanduser(
      os.environ.get("MEDBRIDGE_CACHE") or "~/.cache/medbridge_jax"))


def path(kind: str) -> str:
  """The sub-folder for `kind`: "data", "experts" or "jax_compilation"."""
  return os.path.join(root(), kind)
