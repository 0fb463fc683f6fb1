"""The checkpoint's own tokenizer, through transformers.

CLIP: byte-level BPE from `vocab.json` + `merges.txt` (or `tokenizer.json`).
SigLIP: sentencepiece from `spiece.model` (needs the `sentencepiece`
package); SigLIP 2 and others: whatever `tokenizer_config.json` names, with
`tokenizer.json` / `tokenizer.model`. Files are checked when the expert
loads; the tokenizer itself is built on first use. A folder with no
tokenizer file at all gives None: the expert is vision-only.
"""

import contextlib
import os
from typing import Any, Callable, Optional, Tuple

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError

Tokenizer = Tuple[Callable[[], Any], int]

# Any of these means the publisher meant to ship a tokenizer.
FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json",
         "merges.txt", "spiece.model", "tokenizer.model", "vocab.txt")


@contextlib.contextmanager
def quiet_transformers():
  """Mutes transformers' warnings about its own default sub-configs."""
  # transformers takes seconds to import: only when a config is parsed.
  import transformers  # pylint: disable=g-import-not-at-top
  level = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()
  try:
    yield transformers
  finally:
    transformers.logging.set_verbosity(level)


def max_length(path: str, max_positions: int) -> int:
  """tokenizer_config.json's model_max_length, capped by the positions."""
  file = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(file):
    n = jsonfile.read(file, "tokenizer config").get("model_max_length")
    if isinstance(n, int) and 0 < n <= max_positions:
      return n
  return max_positions


def _maker(path: str, cls_name: str, what: str) -> Callable[[], Any]:
  def make():
    import transformers  # pylint: disable=g-import-not-at-top
    try:
      return getattr(transformers, cls_name).from_pretrained(
          path, local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"cannot build the {what} tokenizer from {path}: "
                      f"{e}") from None
  return make


def _needs_sentencepiece(what: str):
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise UserError(f"{what} tokenizers need the sentencepiece package: "
                    f"pip install sentencepiece") from None


def auto(path: str, max_positions: int, what: str) -> Optional[Tokenizer]:
  """The tokenizer `tokenizer_config.json` / `tokenizer.json` describes
  (transformers' AutoTokenizer), or None without either file."""
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if not (has("tokenizer_config.json") or has("tokenizer.json")):
    return None
  if has("tokenizer.model") and not has("tokenizer.json"):
    _needs_sentencepiece(what)
  return _maker(path, "AutoTokenizer", what), max_length(path, max_positions)


def for_folder(path: str, family: str, max_positions: int
               ) -> Optional[Tokenizer]:
  """(make_tokenizer, max_length) for a CLIP or SigLIP folder, or None
  when it has no tokenizer file at all; checks the files now."""
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if not any(has(f) for f in FILES):
    return None
  if family == "clip":
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
      raise UserError(f"CLIP tokenizer files missing in {path}: need "
                      f"vocab.json and merges.txt (or tokenizer.json)")
    return _maker(path, "CLIPTokenizer", family), max_length(
        path, max_positions)
  if has("spiece.model"):
    _needs_sentencepiece("SigLIP")
    return _maker(path, "SiglipTokenizer", family), max_length(
        path, max_positions)
  # SigLIP 2 ships Gemma's tokenizer (tokenizer.json, tokenizer.model).
  found = None
  if has("tokenizer.json") or has("tokenizer.model"):
    found = auto(path, max_positions, family)
  if found is None:
    raise UserError(f"SigLIP tokenizer file spiece.model missing in {path} "
                    f"(or tokenizer.json with tokenizer_config.json, as "
                    f"SigLIP 2 ships)")
  return found
