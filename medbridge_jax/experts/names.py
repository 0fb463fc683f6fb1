"""The map between checkpoint tensor names and our params pytree.

Each format reader (`experts/formats/`) builds one table of `Entry`s from
the tower configs; the table drives both directions: loading a checkpoint
(`to_params`: every tensor used, every shape checked, the error names the
key) and writing one (`from_params`, used by `random_experts` and tests).

Layout changes: Linear weights are (out, in) in PyTorch and (in, out) kernels
here; conv weights (out, in, kh, kw) become (kh, kw, in, out); LayerNorm
`weight` is our `scale`; a packed `in_proj_weight` / `qkv.weight` (3D, D)
becomes separate query/key/value kernels.
"""

import dataclasses
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from medbridge_jax.errors import UserError

Path = Tuple[str, ...]

# Buffers older transformers saved with the weights; they hold nothing the
# model needs (0..N-1), so they are accepted and skipped.
IGNORED_SUFFIXES = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor on disk and where it goes in our params."""
  hf_name: str
  hf_shape: Tuple[int, ...]
  paths: Tuple[Path, ...]  # Our param paths (three for a packed qkv).
  kind: str  # copy | linear | conv | qkv_weight | qkv_bias.
  # Our shape where it differs from the converted one, e.g. a (1, 1, D)
  # class token on disk that is (D,) here.
  shape: Optional[Tuple[int, ...]] = None


def linear(hf: str, ours: Path, d_in: int, d_out: int, bias=True):
  """A PyTorch Linear: (out, in) weight -> (in, out) kernel, and its bias."""
  out = [Entry(hf + ".weight", (d_out, d_in), (ours + ("kernel",),),
               "linear")]
  if bias:
    out.append(Entry(hf + ".bias", (d_out,), (ours + ("bias",),), "copy"))
  return out


def norm(hf: str, ours: Path, d: int):
  """A LayerNorm: `weight` is our `scale`."""
  return [Entry(hf + ".weight", (d,), (ours + ("scale",),), "copy"),
          Entry(hf + ".bias", (d,), (ours + ("bias",),), "copy")]


def mlp(hf: str, ours: Path, d: int, hidden: int, fc=("fc1", "fc2")):
  """Two Linears `{hf}.{fc[0]}`, `{hf}.{fc[1]}` -> our Mlp's fc1, fc2."""
  return (linear(f"{hf}.{fc[0]}", ours + ("fc1",), d, hidden) +
          linear(f"{hf}.{fc[1]}", ours + ("fc2",), hidden, d))


def qkv(weight: str, bias: Optional[str], ours: Path, d: int,
        names=("query", "key", "value")):
  """A packed (3D, D) weight named `weight` (+ (3D,) `bias`, if named) ->
  three kernels (and biases) under `ours`."""
  out = [Entry(weight, (3 * d, d),
               tuple(ours + (n, "kernel") for n in names), "qkv_weight")]
  if bias:
    out.append(Entry(bias, (3 * d,), tuple(ours + (n, "bias") for n in names),
                     "qkv_bias"))
  return out


def _set(tree: dict, path: Path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Path):
  for k in path:
    tree = tree[k]
  return tree


def to_params(tensors: Mapping[str, np.ndarray], entries: Iterable[Entry],
              where: Mapping[str, str] = None,
              config_name: str = "config.json") -> dict:
  """Our float32 params from checkpoint tensors; every key and shape
  checked.

  `where` maps a tensor name to the file it came from, and `config_name` is
  the file that describes the model, for the messages.
  """
  where = where or {}
  entries = list(entries)
  expected = {e.hf_name for e in entries}
  unexpected = sorted(k for k in tensors if k not in expected
                      and not k.endswith(IGNORED_SUFFIXES))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise UserError(f"unexpected tensor {unexpected[0]!r} in "
                    f"{where.get(unexpected[0], 'the checkpoint')}{more}: "
                    f"it does not belong to the model {config_name} describes")
  missing = [e.hf_name for e in entries if e.hf_name not in tensors]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(f"missing tensor {missing[0]!r} in the checkpoint{more}")
  params: Dict = {}
  for e in entries:
    a = tensors[e.hf_name]
    if tuple(a.shape) != e.hf_shape:
      raise UserError(
          f"tensor {e.hf_name!r} in {where.get(e.hf_name, 'the checkpoint')} "
          f"has shape {tuple(a.shape)}; {config_name} implies {e.hf_shape}")
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
      raise UserError(f"tensor {e.hf_name!r} has dtype {a.dtype}; "
                      f"expected floating point")
    a = np.asarray(a, np.float32)
    if e.kind == "copy":
      values = [a]
    elif e.kind == "linear":
      values = [a.T]
    elif e.kind == "conv":
      values = [a.transpose(2, 3, 1, 0)]
    elif e.kind == "qkv_weight":
      values = [w.T for w in np.split(a, 3, axis=0)]
    elif e.kind == "qkv_bias":
      values = np.split(a, 3, axis=0)
    else:
      raise AssertionError(e.kind)
    if e.shape is not None:
      values = [v.reshape(e.shape) for v in values]
    for path, value in zip(e.paths, values):
      _set(params, path, np.array(value, order="C"))
  return params


def from_params(params: Mapping, entries: Iterable[Entry]
                ) -> Dict[str, np.ndarray]:
  """HF-named float32 numpy tensors from our params (inverse of to_params)."""
  out = {}
  for e in entries:
    vals = [np.asarray(_get(params, p), np.float32) for p in e.paths]
    if e.kind == "copy":
      a = vals[0]
    elif e.kind == "linear":
      a = vals[0].T
    elif e.kind == "conv":
      a = vals[0].transpose(3, 2, 0, 1)
    elif e.kind == "qkv_weight":
      a = np.concatenate([v.T for v in vals], axis=0)
    elif e.kind == "qkv_bias":
      a = np.concatenate(vals, axis=0)
    else:
      raise AssertionError(e.kind)
    out[e.hf_name] = np.array(a.reshape(e.hf_shape), order="C")
  return out
