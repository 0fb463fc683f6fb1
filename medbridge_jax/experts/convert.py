"""Pickled CLIP checkpoints -> a safetensors open_clip folder we load.

  python -m medbridge_jax.experts.convert SRC DST
      [--mean=a,b,c --std=a,b,c] [--tokenizer=DIR]

SRC: an OpenAI-CLIP `.pt` (a plain state dict such as CheXzero's, or a
TorchScript archive like OpenAI's own releases), or an open_clip
`open_clip_pytorch_model.bin` (SRC may be the folder that holds it with
its `open_clip_config.json`). DST: a new folder with
`open_clip_model.safetensors`, `open_clip_config.json` and, where given,
the tokenizer files: `experts.load(DST)` reads it (formats/open_clip.py).

Unpickling can run code: convert only files you trust, once. The state dict
is read with `torch.load(weights_only=True)`, which refuses anything but
tensors and containers (TorchScript archives go through `torch.jit.load`).
`experts.load` itself never unpickles. A state dict without an open_clip
config is OpenAI's CLIP: its architecture is read from the tensor shapes as
OpenAI's `build_model` does (QuickGELU, 64-wide heads). The pixel mean/std
come from --mean/--std, else the source config's `preprocess_cfg`; a source
without them (CheXzero normalised with its own data set's statistics) needs
both flags.
"""

import argparse
import os
import shutil
import sys
import zipfile
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from medbridge_jax import errors
from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError
from medbridge_jax.experts import preprocessing
from medbridge_jax.experts import tokenizers
from medbridge_jax.experts.formats import open_clip

PROGRAM = "medbridge_jax.experts.convert"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Tokenizer files copied with --tokenizer (and from an open_clip folder).
TOKENIZER_FILES = tokenizers.FILES + ("special_tokens_map.json",
                                      "added_tokens.json")
# Non-weights OpenAI's TorchScript models carry; its build_model drops them.
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64  # OpenAI's build_model: heads = width // 64.
# Buffers a scripted model lists with its weights; the model rebuilds them.
BUFFERS = ("attn_mask",)


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("converting pickled checkpoints needs PyTorch: "
                    "pip install torch (the converted folder loads "
                    "without it)") from None
  return torch


def _is_torchscript(file: str) -> bool:
  """TorchScript archives are zips with a code/ folder (state dicts saved
  by torch.save are zips without one)."""
  if not zipfile.is_zipfile(file):
    return False
  with zipfile.ZipFile(file) as z:
    return any(n.split("/")[1:2] == ["code"] for n in z.namelist())


def load_state_dict(file: str) -> Dict[str, "torch.Tensor"]:
  """The tensors of a pickled checkpoint, without its wrappers."""
  torch = _torch()
  try:
    if _is_torchscript(file):
      found = torch.jit.load(file, map_location="cpu").state_dict()
    else:
      found = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"cannot read {file} as a PyTorch checkpoint: "
                    f"{errors.one_line(e)}") from None
  # Training checkpoints wrap the weights: {"state_dict": ..., "epoch": ...}.
  for key in ("state_dict", "model"):
    if isinstance(found, dict) and isinstance(found.get(key), dict):
      found = found[key]
  if not isinstance(found, dict) or not found:
    raise UserError(f"{file} holds no state dict (a name -> tensor mapping)")
  if all(k.startswith("module.") for k in found):  # DataParallel's prefix.
    found = {k[len("module."):]: v for k, v in found.items()}
  found = {k: v for k, v in found.items() if k not in OPENAI_EXTRAS
           and k.rsplit(".", 1)[-1] not in BUFFERS}
  for k, v in found.items():
    if not isinstance(v, torch.Tensor):
      raise UserError(f"{file}: entry {k!r} is a {type(v).__name__}, not a "
                      f"tensor")
  return found


def openai_model_cfg(shapes: Mapping[str, Tuple[int, ...]],
                     where: str) -> dict:
  """open_clip's model_cfg of an OpenAI CLIP ViT state dict, from its
  tensor shapes as OpenAI's `clip.model.build_model` reads them."""
  def shape(name):
    if name not in shapes:
      raise UserError(f"{where} has no tensor {name!r}: not an OpenAI CLIP "
                      f"ViT state dict")
    return shapes[name]
  if any(k.startswith("visual.layer1.") for k in shapes):
    raise UserError(f"{where} holds an OpenAI CLIP ResNet image tower; only "
                    f"ViTs are supported")
  count = lambda prefix: len({k.split(".")[len(prefix.split("."))]
                              for k in shapes if k.startswith(prefix + ".")})
  width, _, patch, _ = shape("visual.conv1.weight")
  grid = round((shape("visual.positional_embedding")[0] - 1) ** 0.5)
  text_width = shape("ln_final.weight")[0]
  for what, w in (("image", width), ("text", text_width)):
    if w % HEAD_WIDTH:
      raise UserError(
          f"{where}: {what} width {w} is not a multiple of {HEAD_WIDTH}, "
          f"OpenAI CLIP's head width; give the folder with its "
          f"{open_clip.CONFIG} instead")
  return {
      "embed_dim": shape("text_projection")[1],
      "quick_gelu": True,
      "vision_cfg": {"image_size": patch * grid,
                     "layers": count("visual.transformer.resblocks"),
                     "width": width, "patch_size": patch},
      "text_cfg": {"context_length": shape("positional_embedding")[0],
                   "vocab_size": shape("token_embedding.weight")[0],
                   "width": text_width, "heads": text_width // HEAD_WIDTH,
                   "layers": count("transformer.resblocks")},
  }


def _source(src: str) -> Tuple[str, Optional[str]]:
  """(the pickle file, the folder holding its open_clip config or None)."""
  if os.path.isdir(src):
    file = os.path.join(src, open_clip.PICKLE)
    if not os.path.isfile(file):
      pickles = sorted(f for f in os.listdir(src)
                       if f.endswith(PICKLE_SUFFIXES))
      if len(pickles) != 1:
        raise UserError(f"{src} holds no {open_clip.PICKLE}" + (
            f" and several pickles ({', '.join(pickles)}): name one"
            if pickles else " and no other pickle checkpoint"))
      file = os.path.join(src, pickles[0])
  elif os.path.isfile(src):
    file = src
  else:
    raise UserError(f"checkpoint not found: {src}")
  folder = os.path.dirname(os.path.abspath(file))
  has_config = os.path.isfile(os.path.join(folder, open_clip.CONFIG))
  return file, folder if has_config else None


def parse_triple(text: Optional[str], flag: str):
  """--mean=a,b,c (or one number) -> 3 floats; None if not given."""
  if text is None:
    return None
  try:
    values = [float(x) for x in text.split(",")]
  except ValueError:
    raise UserError(f"{flag} must be numbers separated by commas; got "
                    f"{text!r}") from None
  return preprocessing.triple(values if len(values) > 1 else values[0],
                              flag, "the command line")


def _preprocess(source_cfg: Optional[dict], mean, std, src: str) -> dict:
  pp = dict((source_cfg or {}).get("preprocess_cfg") or {})
  if (mean is None) != (std is None):
    raise UserError("give --mean and --std together")
  if mean is not None:
    pp["mean"], pp["std"] = list(mean), list(std)
  if "mean" not in pp or "std" not in pp:
    raise UserError(
        f"{src} states no pixel mean/std: give --mean=a,b,c --std=a,b,c, "
        f"the statistics the model was trained with (CheXzero used its own "
        f"data set's, not CLIP's)")
  return pp


def _copy_tokenizer(folder: Optional[str], dst: str) -> List[str]:
  if folder is None:
    return []
  copied = []
  for name in TOKENIZER_FILES:
    file = os.path.join(folder, name)
    if os.path.isfile(file):
      shutil.copyfile(file, os.path.join(dst, name))
      copied.append(name)
  return copied


def _save(state: Mapping, file: str):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  # safetensors refuses tensors that share memory: give each its own.
  save_file({k: v.detach().contiguous().clone() for k, v in state.items()},
            file, metadata={"format": "pt"})


def convert(src: str, dst: str, mean=None, std=None,
            tokenizer: Optional[str] = None,
            log: Callable[[str], None] = print) -> List[str]:
  """Writes the open_clip folder `dst` from the pickled checkpoint `src`
  (see the module docstring); returns the files written."""
  file, config_folder = _source(src)
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise UserError(f"{dst} exists and is not an empty folder; give a new "
                    f"one")
  if tokenizer is not None and not os.path.isdir(tokenizer):
    raise UserError(f"tokenizer folder not found: {tokenizer}")
  source_cfg = None
  if config_folder:
    source_cfg = jsonfile.read(os.path.join(config_folder, open_clip.CONFIG),
                               open_clip.CONFIG)
  preprocess = _preprocess(source_cfg, mean, std, src)
  state = load_state_dict(file)
  if source_cfg and isinstance(source_cfg.get("model_cfg"), dict):
    model_cfg, how = source_cfg["model_cfg"], f"from {open_clip.CONFIG}"
  else:
    model_cfg = openai_model_cfg({k: tuple(v.shape) for k, v in state.items()},
                                 file)
    how = "OpenAI CLIP's, read from the tensor shapes (QuickGELU)"
  # Written aside and checked by our reader first: DST appears only whole.
  tmp = dst.rstrip(os.sep) + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _save(state, os.path.join(tmp, open_clip.SINGLE))
    jsonfile.write(os.path.join(tmp, open_clip.CONFIG),
                   {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    copied = _copy_tokenizer(tokenizer or config_folder, tmp)
    found = open_clip.read(tmp)  # What experts.load will make of it.
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(dst):
    os.rmdir(dst)  # Empty, checked above.
  os.replace(tmp, dst)
  v = found.vision
  log(f"{PROGRAM}: wrote {dst}")
  log(f"  {open_clip.SINGLE}: {len(state)} tensors from {file}")
  log(f"  {open_clip.CONFIG}: architecture {how}: ViT {v.num_layers} "
      f"layers, width {v.hidden_size}, patch {v.patch_size}, "
      f"{v.image_size} px; pixel mean {preprocess['mean']}, std "
      f"{preprocess['std']}")
  if found.text is None:
    log("  vision-only: no tokenizer files (give --tokenizer=DIR, e.g. a "
        "Hugging Face CLIP folder with vocab.json and merges.txt, for the "
        "text tower)")
  else:
    log(f"  tokenizer: {', '.join(copied)}")
  return [open_clip.SINGLE, open_clip.CONFIG] + copied


def main(argv: Optional[Sequence[str]] = None):
  parser = argparse.ArgumentParser(
      prog=f"python -m {PROGRAM}",
      description="Convert a pickled CLIP checkpoint (OpenAI .pt, open_clip "
      ".bin) into a safetensors folder experts.load reads.")
  parser.add_argument("src", help="the .pt / .bin file, or the open_clip "
                      "folder holding open_clip_pytorch_model.bin")
  parser.add_argument("dst", help="a new folder")
  parser.add_argument("--mean", help="pixel mean a,b,c (in [0, 1] units)")
  parser.add_argument("--std", help="pixel std a,b,c")
  parser.add_argument("--tokenizer", help="folder whose tokenizer files to "
                      "copy (vocab.json, merges.txt, ...)")
  args = parser.parse_args(argv)
  with errors.exit_on_user_error(PROGRAM):
    convert(args.src, args.dst, parse_triple(args.mean, "--mean"),
            parse_triple(args.std, "--std"), args.tokenizer)


if __name__ == "__main__":
  main(sys.argv[1:])
