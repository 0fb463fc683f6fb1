"""What is in an expert folder, and what MedBridge will make of it.

  python -m medbridge_jax.experts.inspect DIR [DIR ...]
      [--config=configs/in_domain.py[:variant]]

Prints, per folder: family, format, input side, patch, layers, width,
parameters (and their size in bfloat16), text tower, tokenizer, pixel
mean/std, dtype on disk, and the views MedBridge gives the expert under the
config (`data.image_size`, `model.focal`; the defaults without --config).
Reads the folder as `experts.load` does (vision and text towers only),
without JAX devices or compilation.
"""

import os
import sys
from typing import Any, List

from absl import app
import numpy as np
from ml_collections import config_flags

from medbridge_jax import cli
from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError

PROGRAM = "medbridge_jax.experts.inspect"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Task config whose data.image_size and model.focal decide "
    "the views (default: the built-in defaults).", lock_config=True)


def count(tree: Any) -> int:
  """Number of values in a nested dict of arrays."""
  if isinstance(tree, dict):
    return sum(count(v) for v in tree.values())
  return int(np.size(tree))


def tokenizer_name(path: str, found) -> str:
  """The tokenizer class the folder names, or why there is none."""
  if found.tokenizer is None:
    return "none"
  file = os.path.join(path, "tokenizer_config.json")
  name = None
  if os.path.isfile(file):
    name = jsonfile.read(file, "tokenizer config").get("tokenizer_class")
  return f"{name or 'from the folder files'}, max length {found.tokenizer[1]}"


def describe(path: str, config) -> List[str]:
  """The lines printed for one folder."""
  # Here, not above: --help and flag errors answer before JAX loads.
  from medbridge_jax.experts import loader  # pylint: disable=g-import-not-at-top
  from medbridge_jax.model import focal_sampling  # pylint: disable=g-import-not-at-top
  found = loader.read(path)
  v = found.vision
  vision_params = count(found.params["vision"])
  text_params = count(found.params.get("text", {}))
  total = count(found.params)
  views = focal_sampling.summary(focal_sampling.describe(
      int(config.data.image_size), [int(v.image_size)], config.model.focal))
  if found.text is None:
    text = f"no ({found.vision_only_reason})"
  else:
    text = (f"yes ({found.text.family}, {found.text.num_layers} layers, "
            f"width {found.text.hidden_size}, {text_params:,} parameters)")
  fmt = lambda xs: ", ".join(f"{x:.4g}" for x in xs)
  return [
      os.path.abspath(path),
      f"  family: {found.family}",
      f"  format: {found.format}",
      f"  input side: {v.image_size} px",
      f"  patch: {v.patch_size} px ({v.grid}x{v.grid} patches"
      + (f", {v.num_registers} registers" if v.num_registers else "") + ")",
      f"  layers: {v.num_layers}",
      f"  width: {v.hidden_size} ({v.num_heads} heads, MLP {v.mlp_dim})",
      f"  parameters: {total:,} (vision {vision_params:,}); "
      f"{total * 2 / 2**20:,.1f} MiB in bfloat16",
      f"  text tower: {text}",
      f"  tokenizer: {tokenizer_name(path, found)}",
      f"  pixel mean: {fmt(found.image_mean)}; std: {fmt(found.image_std)}",
      f"  dtype on disk: {found.disk_dtype}",
      f"  views: {views}",
  ]


def main(argv):
  folders = argv[1:]
  if not folders:
    cli.fail(PROGRAM, "give one or more expert folders: "
             "python -m medbridge_jax.experts.inspect DIR [DIR ...]")
  if _CONFIG.value is None:
    from medbridge_jax import default_config  # pylint: disable=g-import-not-at-top
    config = default_config.get_default()
  else:
    config = cli.load_config(PROGRAM, argv[:1], _CONFIG)
  failed = False
  for path in folders:
    try:
      print("\n".join(describe(path, config)))
    except UserError as e:
      print(f"{PROGRAM}: error: {e}", file=sys.stderr, flush=True)
      failed = True
  if failed:
    raise SystemExit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(PROGRAM, argv))
