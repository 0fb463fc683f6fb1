"""Reading checkpoint tensors from safetensors files, without torch.

A folder holds one `*.safetensors` file or shards listed by an index
(`*.safetensors.index.json`, transformers' layout). `read` takes only the
tensors a reader keeps and opens only the shards that hold them: a VLM's
language model (tens of GB) is never read for its vision tower. Pickle
checkpoints are refused: unpickling can run arbitrary code
(`python -m medbridge_jax.experts.convert` turns them into safetensors).
"""

import collections
import json
import os
import struct
from typing import Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from medbridge_jax import jsonfile
from medbridge_jax.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

Tensors = Dict[str, np.ndarray]


def refuse_pickles(path: str, expected: str):
  """The error for a folder without safetensors weights."""
  pickles = sorted(f for f in os.listdir(path)
                   if f.endswith(PICKLE_SUFFIXES)
                   or f.endswith(".bin.index.json"))
  if pickles:
    raise UserError(
        f"{path} holds only pickle weights ({pickles[0]}); they are refused "
        f"because unpickling can run arbitrary code. Convert them once where "
        f"you trust the file: python -m medbridge_jax.experts.convert "
        f"{os.path.join(path, pickles[0])} NEW_FOLDER")
  raise UserError(f"no weights in {path}: expected {expected}")


# safetensors' dtype names; bfloat16 through ml_dtypes (numpy has none).
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def header(file: str) -> Tuple[dict, int]:
  """(tensor name -> {"dtype", "shape", "data_offsets"}, data start)."""
  try:
    with open(file, "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      if not 0 < n <= os.path.getsize(file) - 8:
        raise ValueError(f"header length {n} does not fit the file")
      head = json.loads(f.read(n))
  except (OSError, ValueError, struct.error) as e:
    raise UserError(f"cannot read safetensors file {file}: {e}") from None
  head.pop("__metadata__", None)
  return head, 8 + n


def _read_file(file: str, keep: Callable[[str], bool]) -> Tensors:
  """The kept tensors of one file; only their bytes are read."""
  head, start = header(file)
  size = os.path.getsize(file)
  out = {}
  with open(file, "rb") as f:
    for name, info in head.items():
      if not keep(name):
        continue
      try:
        dtype = np.dtype(DTYPES[info["dtype"]])
        shape = tuple(int(x) for x in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise UserError(f"tensor {name!r} in {file}: unreadable entry "
                        f"{info!r} in the safetensors header") from None
      count = int(np.prod(shape, dtype=np.int64))
      if end - begin != count * dtype.itemsize or start + end > size:
        raise UserError(f"tensor {name!r} in {file}: its bytes "
                        f"[{begin}, {end}) do not hold {info['dtype']} "
                        f"{list(shape)} inside the file (truncated?)")
      f.seek(start + begin)
      out[name] = np.frombuffer(f.read(end - begin), dtype).reshape(shape)
  return out


def file_dtypes(file: str) -> Dict[str, str]:
  """Tensor name -> safetensors dtype name, from the header alone."""
  return {k: v.get("dtype", "?") for k, v in header(file)[0].items()}


def read(path: str, single: str, index: str,
         keep: Optional[Callable[[str], bool]] = None,
         ) -> Tuple[Tensors, Dict[str, str]]:
  """The kept tensors of a folder and, per name, the file that holds it.

  Args:
    path: the folder.
    single: the one-file name (e.g. "model.safetensors").
    index: the sharded layout's index (e.g. "model.safetensors.index.json").
    keep: which tensor names to read (all by default).
  """
  keep = keep or (lambda name: True)
  file = os.path.join(path, single)
  if os.path.isfile(file):
    tensors = _read_file(file, keep)
    return tensors, {k: file for k in tensors}
  index_file = os.path.join(path, index)
  if not os.path.isfile(index_file):
    refuse_pickles(path, f"{single}, or {index} with its shards")
  weight_map = jsonfile.read(index_file, "safetensors index").get(
      "weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserError(f"{index_file} has no 'weight_map'")
  wanted = collections.defaultdict(set)
  for name, shard in weight_map.items():
    if keep(name):
      wanted[shard].add(name)
  tensors, where = {}, {}
  for shard in sorted(wanted):
    file = os.path.join(path, shard)
    if not os.path.isfile(file):
      raise UserError(f"shard {shard} listed in {index_file} is missing")
    got = _read_file(file, lambda k, s=wanted[shard]: k in s)
    for name in sorted(wanted[shard] - set(got)):
      raise UserError(f"tensor {name!r} is mapped to {shard} by {index_file} "
                      f"but that shard does not hold it")
    for k, a in got.items():
      tensors[k], where[k] = a, file
  return tensors, where


def disk_dtype(tensors: Tensors) -> str:
  """The dtype most of the tensors' elements are stored in."""
  sizes = collections.Counter()
  for a in tensors.values():
    sizes[str(a.dtype)] += a.size
  return sizes.most_common(1)[0][0] if sizes else "none"
