"""The map between Hugging Face tensor names and our params pytree.

One table, built from the tower configs, drives both directions: loading a
checkpoint (`to_params`: every tensor used, every shape checked, the error
names the key) and writing one (`from_params`, used by `random_experts`).

Layout changes: Linear weights are (out, in) in PyTorch and (in, out) kernels
here; conv weights (out, in, kh, kw) become (kh, kw, in, out); LayerNorm
`weight` is our `scale`; SigLIP's packed `in_proj_weight` (3D, D) becomes the
head's separate query/key/value kernels.
"""

import dataclasses
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.experts.text import TextConfig
from medbridge_jax.experts.vit import VisionConfig

Path = Tuple[str, ...]

# Buffers older transformers saved with the weights; they hold nothing the
# model needs (0..N-1), so they are accepted and skipped.
IGNORED_SUFFIXES = ("embeddings.position_ids",)


@dataclasses.dataclass(frozen=True)
class Entry:
  hf_name: str
  hf_shape: Tuple[int, ...]
  paths: Tuple[Path, ...]  # Our param paths (three for a packed qkv).
  kind: str  # copy | linear | conv | qkv_weight | qkv_bias.


def _linear(hf: str, ours: Path, d_in: int, d_out: int, bias=True):
  out = [Entry(hf + ".weight", (d_out, d_in), (ours + ("kernel",),),
               "linear")]
  if bias:
    out.append(Entry(hf + ".bias", (d_out,), (ours + ("bias",),), "copy"))
  return out


def _norm(hf: str, ours: Path, d: int):
  return [Entry(hf + ".weight", (d,), (ours + ("scale",),), "copy"),
          Entry(hf + ".bias", (d,), (ours + ("bias",),), "copy")]


def _mlp(hf: str, ours: Path, d: int, mlp: int):
  return (_linear(hf + ".fc1", ours + ("fc1",), d, mlp) +
          _linear(hf + ".fc2", ours + ("fc2",), mlp, d))


def _layers(hf: str, ours: Path, n: int, d: int, mlp: int):
  out = []
  for i in range(n):
    h, o = f"{hf}.encoder.layers.{i}", ours + (f"layers_{i}",)
    for proj, name in (("q", "query"), ("k", "key"), ("v", "value"),
                       ("out", "out")):
      out += _linear(f"{h}.self_attn.{proj}_proj", o + ("attn", name), d, d)
    out += _norm(h + ".layer_norm1", o + ("norm1",), d)
    out += _norm(h + ".layer_norm2", o + ("norm2",), d)
    out += _mlp(h + ".mlp", o + ("mlp",), d, mlp)
  return out


def vision_entries(c: VisionConfig) -> List[Entry]:
  d, p, v = c.hidden_size, c.patch_size, ("vision",)
  e = "vision_model.embeddings"
  num_pos = c.grid * c.grid + c.num_prefix_tokens
  out = [Entry(e + ".patch_embedding.weight", (d, c.num_channels, p, p),
               (v + ("patch_embed", "kernel"),), "conv"),
         Entry(e + ".position_embedding.weight", (num_pos, d),
               (v + ("position_embedding",),), "copy")]
  if c.family == "clip":
    out += [Entry(e + ".class_embedding", (d,), (v + ("class_embedding",),),
                  "copy")]
    out += _norm("vision_model.pre_layrnorm", v + ("pre_norm",), d)
  else:
    out += [Entry(e + ".patch_embedding.bias", (d,),
                  (v + ("patch_embed", "bias"),), "copy")]
  out += _layers("vision_model", v, c.num_layers, d, c.mlp_dim)
  out += _norm("vision_model.post_layernorm", v + ("post_norm",), d)
  if c.family == "clip" and c.projection_dim:
    out += _linear("visual_projection", v + ("projection",), d,
                   c.projection_dim, bias=False)
  if c.family == "siglip" and c.use_head:
    h, o = "vision_model.head", v + ("head",)
    qkv = tuple(o + (n, "kernel") for n in ("query", "key", "value"))
    qkv_b = tuple(o + (n, "bias") for n in ("query", "key", "value"))
    out += [Entry(h + ".probe", (1, 1, d), (o + ("probe",),), "copy"),
            Entry(h + ".attention.in_proj_weight", (3 * d, d), qkv,
                  "qkv_weight"),
            Entry(h + ".attention.in_proj_bias", (3 * d,), qkv_b, "qkv_bias")]
    out += _linear(h + ".attention.out_proj", o + ("out",), d, d)
    out += _norm(h + ".layernorm", o + ("norm",), d)
    out += _mlp(h + ".mlp", o + ("mlp",), d, c.mlp_dim)
  return out


def text_entries(c: TextConfig) -> List[Entry]:
  d, t = c.hidden_size, ("text",)
  e = "text_model.embeddings"
  out = [Entry(e + ".token_embedding.weight", (c.vocab_size, d),
               (t + ("token_embedding",),), "copy"),
         Entry(e + ".position_embedding.weight", (c.max_length, d),
               (t + ("position_embedding",),), "copy")]
  out += _layers("text_model", t, c.num_layers, d, c.mlp_dim)
  out += _norm("text_model.final_layer_norm", t + ("final_norm",), d)
  if c.family == "clip":
    out += _linear("text_projection", t + ("projection",), d,
                   c.projection_dim, bias=False)
  else:
    out += _linear("text_model.head", t + ("projection",), d,
                   c.projection_dim)
  return out


def scalar_entries(family: str) -> List[Entry]:
  if family == "clip":
    return [Entry("logit_scale", (), (("logit_scale",),), "copy")]
  return [Entry("logit_scale", (1,), (("logit_scale",),), "copy"),
          Entry("logit_bias", (1,), (("logit_bias",),), "copy")]


def all_entries(vision: VisionConfig, text: TextConfig) -> List[Entry]:
  return (vision_entries(vision) + text_entries(text) +
          scalar_entries(vision.family))


def _set(tree: dict, path: Path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Path):
  for k in path:
    tree = tree[k]
  return tree


def to_params(tensors: Mapping[str, np.ndarray], entries: Iterable[Entry],
              where: Mapping[str, str] = None) -> dict:
  """Our float32 params from HF tensors; every key and shape checked.

  `where` maps a tensor name to the file it came from, for the messages.
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
                    f"it does not belong to the model config.json describes")
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
          f"has shape {tuple(a.shape)}; config.json implies {e.hf_shape}")
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
