"""The checkpoint's own tokenizer, through transformers.

CLIP: byte-level BPE from `vocab.json` + `merges.txt` (or `tokenizer.json`).
SigLIP: sentencepiece from `spiece.model` (needs the `sentencepiece`
package). Files are checked when the expert loads; the tokenizer itself is
built on first use.
"""

import os
from typing import Any, Callable, Tuple

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError


def _max_length(path: str, max_positions: int) -> int:
  """tokenizer_config.json's model_max_length, capped by the positions."""
  file = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(file):
    n = jsonfile.read(file, "tokenizer config").get("model_max_length")
    if isinstance(n, int) and 0 < n <= max_positions:
      return n
  return max_positions


def for_folder(path: str, family: str, max_positions: int
               ) -> Tuple[Callable[[], Any], int]:
  """(make_tokenizer, max_length) for the folder; checks files now."""
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if family == "clip":
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
      raise UserError(f"CLIP tokenizer files missing in {path}: need "
                      f"vocab.json and merges.txt (or tokenizer.json)")
    cls_name = "CLIPTokenizer"
  else:
    if not has("spiece.model"):
      raise UserError(f"SigLIP tokenizer file spiece.model missing in {path}")
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise UserError("SigLIP tokenizers need the sentencepiece package: "
                      "pip install sentencepiece") from None
    cls_name = "SiglipTokenizer"

  def make():
    import transformers  # pylint: disable=g-import-not-at-top
    try:
      return getattr(transformers, cls_name).from_pretrained(
          path, local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot build the {family} tokenizer from {path}: "
                      f"{e}") from None

  return make, _max_length(path, max_positions)
