"""The checkpoint formats experts come in, and which one a folder holds.

Each format is a module with:

  NAME: str                      e.g. "hf_clip"
  EXPECTS: str                   what its folders hold, for messages
  detect(path, files) -> bool    does this folder look like ours?
  vision_config(path)            the image tower's VisionConfig, from the
                                 config files (no weights read)
  read(path) -> Checkpoint       configs, float32 params, preprocessing

`detect` looks only at file names and small JSON files; `read` reads the
weights (only the vision and text towers' tensors). `find(path)` returns the
format of a folder, or an error that says what was found and which format
it is closest to.
"""

import dataclasses
import importlib
import os
from typing import Any, Callable, Optional, Tuple

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError

# Tried in order; the first whose detect() is true reads the folder.
MODULES = ("hf_clip", "hf_dinov2", "hf_vlm", "open_clip")


@dataclasses.dataclass
class Checkpoint:
  """What a format reader found in a folder; `loader.load` builds the
  `Expert` from it."""
  family: str  # The model family, e.g. "clip", "siglip", "dinov2".
  format: str  # The reader's NAME.
  vision: Any  # vit.VisionConfig.
  params: dict  # {"vision": ..., ["text": ..., "logit_scale", ...]}.
  image_mean: Tuple[float, float, float]
  image_std: Tuple[float, float, float]
  text: Any = None  # The text tower's config, None for vision-only.
  # The linen text tower class taking (config, dtype, attention_impl).
  text_class: Any = None
  # (make_tokenizer, max_length) where the folder has a tokenizer.
  tokenizer: Optional[Tuple[Callable[[], Any], int]] = None
  # Why the expert has no text tower, for the user (None when it has one).
  vision_only_reason: Optional[str] = None
  disk_dtype: str = "float32"  # The dtype most weights are stored in.


def module(name: str):
  """The format module called `name`."""
  if name not in MODULES:
    raise UserError(f"unknown expert format {name!r}; expected one of "
                    f"{', '.join(MODULES)}")
  return importlib.import_module(f"medbridge_jax.experts.formats.{name}")


def find(path: str):
  """The format module that reads the folder `path`."""
  if not os.path.isdir(path):
    raise UserError(f"expert folder not found: {path}")
  files = frozenset(os.listdir(path))
  mods = [module(m) for m in MODULES]
  for m in mods:
    if m.detect(path, files):
      return m
  if "config.json" in files:
    model_type = jsonfile.read(os.path.join(path, "config.json"),
                               "config.json").get("model_type")
    known = sorted(t for m in mods for t in getattr(m, "MODEL_TYPES", ()))
    raise UserError(
        f"unknown model_type {model_type!r} in "
        f"{os.path.join(path, 'config.json')}; supported expert model types: "
        f"{', '.join(known)} (or an open_clip folder with "
        f"open_clip_config.json)")
  shown = ", ".join(sorted(files)[:8]) + (", ..." if len(files) > 8 else "")
  closest = _closest(files, mods)
  raise UserError(
      f"no supported expert format in {path} (found: {shown or 'nothing'}); "
      f"the closest is {closest.NAME}: {closest.EXPECTS}. Supported: "
      + "; ".join(f"{m.NAME} ({m.EXPECTS})" for m in mods))


def _closest(files, mods):
  """The format whose expected file names share most with `files`."""
  def score(m):
    return len(files & set(getattr(m, "FILES", ())))
  return max(mods, key=score)
