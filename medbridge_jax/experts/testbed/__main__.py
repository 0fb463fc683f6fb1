"""Regenerates the shipped test-bed experts (see `experts.testbed`).

  python -m medbridge_jax.experts.testbed --out=DIR [--steps=N] [--only=NAME]

Writes one Hugging Face folder per shipped (spec, seed) into DIR, named as
in the package; copy them over medbridge_jax/experts/testbed/ to ship them.
Pre-training runs on the default JAX backend; the folders record it.
"""

import os

from absl import app
from absl import flags
from absl import logging

from medbridge_jax import cli
from medbridge_jax.errors import UserError
from medbridge_jax.experts import testbed

_OUT = flags.DEFINE_string("out", None, "Folder to write the experts into.",
                           required=True)
_STEPS = flags.DEFINE_integer(
    "steps", None, "Pre-training steps instead of PRETRAIN_STEPS (quick "
    "checks; the folders are then not the shipped ones).")
_ONLY = flags.DEFINE_list("only", [], "Folder names to write; all if empty.")


def main(argv):
  if len(argv) > 1:
    cli.fail("testbed", f"unexpected arguments: {' '.join(argv[1:])}")
  names = {testbed.folder_name(s, k) for s, k in
           testbed.shipped_specs(_STEPS.value)}
  unknown = sorted(set(_ONLY.value) - names)
  if unknown:
    cli.fail("testbed", f"--only={unknown[0]} is no shipped folder; they "
             f"are {', '.join(sorted(names))}")
  if _STEPS.value is not None and _STEPS.value < 1:
    cli.fail("testbed", f"--steps={_STEPS.value} must be 1 or more")
  try:
    for path in testbed.write(os.path.abspath(_OUT.value), _STEPS.value,
                              _ONLY.value):
      logging.info("Wrote %s", path)
  except UserError as e:
    cli.fail("testbed", str(e))


if __name__ == "__main__":
  app.run(main)
