"""MedBridge: K frozen experts, Focal Sampling, Query-Encoders, fusion, MoE.

For each image (B, H, W) in [0, 1] and each expert k:

  focal_sampling.views   global view + local crops at the expert's side
  QueryEncoder           frozen tower + Q query tokens per view -> (T, P_k)
  CrossViewFusion        self-attention over all views' tokens, max over views
  Head                   fused tokens -> per-label logits (B, L)

then `moe.Gate` weighs the K experts' logits from their pooled query vectors
(or they are averaged with MoE off). Parameters:

  expert_{k}/tower/...     the frozen VisionTower (loaded, never trained)
  expert_{k}/encoder/queries, expert_{k}/fusion/..., expert_{k}/head/...
  gate/...                 (only with MoE on and K > 1)

Typical use (see `build`, `init_params`, `partition`):

  model = medbridge.build(config, experts, labels)
  params = medbridge.init_params(model, jax.random.key(0), experts,
                                 config.data.image_size)
  trainable, frozen = partition.split(params)
  logits, aux = model.apply({"params": partition.merge(trainable, frozen)},
                            images, train=True, rngs={"focal": key})
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.experts import expert as expert_lib
from medbridge_jax.experts import zero_shot
from medbridge_jax.experts.vit import VisionConfig, VisionTower
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import fusion as fusion_lib
from medbridge_jax.model import heads
from medbridge_jax.model import moe
from medbridge_jax.model import query_encoder

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """What the model needs to know about one expert (hashable)."""
  vision: VisionConfig
  side: int  # Input side of the views (the checkpoint's image size).
  mean: Tuple[float, float, float]
  std: Tuple[float, float, float]
  directions: Optional[heads.TextDirections] = None  # Text init, or None.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every switch of the model (from `config.model`)."""
  dtype: Any = jnp.float32  # Compute dtype of the frozen towers.
  attention_impl: Optional[str] = None  # None | auto | xla | cudnn.
  num_local: int = 4  # Local views in training; 0 = focal sampling off.
  crop_size: int = 64
  zoom: float = 0.0  # > 0: crop side = expert side / zoom, per expert.
  eval_overlap: float = 0.25
  lung_bias: float = 0.0
  resize: str = "linear"
  train_windows: str = "random"  # random | sliding.
  num_queries: int = 4  # 0 = queries off (linear probe on pooled features).
  inject_layer: int = -2
  query_mode: str = "non_destructive"
  query_init_std: float = 0.02
  fusion_heads: int = 4
  fusion_layers: int = 1
  fusion_keep_global: bool = False
  moe: bool = True  # False: plain average of the experts' logits.
  gating: str = "soft"
  top_k: int = 1
  gate_hidden: int = 0

  def crop_for(self, side: int) -> int:
    """Crop side in stored pixels for an expert whose input side is `side`."""
    if self.zoom > 0:
      return max(1, int(round(side / self.zoom)))
    return self.crop_size


def normalize(views: Array, mean, std) -> Array:
  """(M, S, S) views in [0, 1] -> (M, S, S, 3) normalised pixels."""
  return expert_lib.normalize_pixels(views[..., None], mean, std)


class ExpertBranch(nn.Module):
  """One expert: views -> frozen tower + queries -> fusion -> head."""
  spec: ExpertSpec
  settings: Settings
  num_labels: int

  def setup(self):
    s = self.settings
    self.tower = VisionTower(self.spec.vision, dtype=s.dtype,
                             attention_impl=s.attention_impl)
    self.encoder = query_encoder.QueryEncoder(
        num_queries=s.num_queries, inject_layer=s.inject_layer,
        mode=s.query_mode, init_std=s.query_init_std)
    # Nothing to fuse with one view of one token: keep the linear probe pure.
    self.fuses = s.num_local > 0 or s.num_queries > 0
    if self.fuses:
      self.fusion = fusion_lib.CrossViewFusion(s.fusion_heads,
                                               s.fusion_layers,
                                               s.fusion_keep_global)
    self.head = heads.Head(self.num_labels, self.spec.directions)

  def __call__(self, images: Array, train: bool,
               key: Optional[Array]) -> Tuple[Array, Array]:
    """images (B, H, W) -> (logits (B, L), pooled query vector (B, P))."""
    s, side = self.settings, self.spec.side
    v = focal_sampling.views(
        images, side=side, crop=s.crop_for(side), num_local=s.num_local,
        train=train, key=key, overlap=s.eval_overlap, lung_bias=s.lung_bias,
        method=s.resize, train_windows=s.train_windows)
    b, n = v.shape[:2]
    pixels = normalize(v.reshape(b * n, side, side), self.spec.mean,
                       self.spec.std)
    tokens = self.encoder(self.tower, pixels)  # (B * N, T, P)
    tokens = tokens.reshape((b, n) + tokens.shape[1:])
    fused = self.fusion(tokens) if self.fuses else tokens[:, 0]
    logits = self.head(fused)
    # With fusion.keep_global the fused tokens are [max over local views;
    # global view]: the gate reads the first, fused, set of queries.
    return logits, query_encoder.pooled_queries(fused, s.num_queries)


class MedBridge(nn.Module):
  """The full model over K experts; see the module docstring."""
  experts: Tuple[ExpertSpec, ...]
  num_labels: int
  settings: Settings = Settings()

  @nn.compact
  def __call__(self, images: Array, *, train: bool):
    """images (B, H, W) float32 in [0, 1] -> (logits (B, L) float32, aux).

    uint8 images (0..255) are accepted too and scaled on the device, which
    moves a quarter of the bytes from the host.

    aux: "gates" (B, K) or (B, K, L) for per-label gating, summing to 1 over
    K; "expert_logits" (B, K, L); "balance_loss" scalar (0 without a gate).
    Training draws crop positions from the rng stream "focal".
    """
    s = self.settings
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
      images = images.astype(jnp.float32) / 255.0
    images = images.astype(jnp.float32)
    if images.ndim != 3:
      raise UserError(f"images must be (batch, height, width); got "
                      f"{images.shape}")
    random_crops = s.num_local > 0 and s.train_windows == "random"
    key = self.make_rng("focal") if train and random_crops else None
    outs = [ExpertBranch(spec, s, self.num_labels, name=f"expert_{k}")(
        images, train, key) for k, spec in enumerate(self.experts)]
    expert_logits = jnp.stack([o[0] for o in outs], axis=1)  # (B, K, L)
    b, k = expert_logits.shape[:2]
    if s.moe and k > 1:
      gate = moe.Gate(k, self.num_labels, s.gating, s.top_k, s.gate_hidden,
                      name="gate")
      gates, balance = gate([o[1] for o in outs])
    else:
      gates = jnp.full((b, k), 1.0 / k, jnp.float32)
      balance = jnp.zeros((), jnp.float32)
    logits = moe.combine(gates, expert_logits).astype(jnp.float32)
    aux = {"gates": gates, "expert_logits": expert_logits,
           "balance_loss": balance}
    return logits, aux


def settings_from_config(model_config: ml_collections.ConfigDict) -> Settings:
  """`Settings` from `config.model`, with the ablation switches applied."""
  m = model_config
  if m.compute_dtype not in DTYPES:
    raise UserError(f"model.compute_dtype={m.compute_dtype!r}; expected one "
                    f"of {tuple(DTYPES)}")
  impl = m.attention_impl or None
  return Settings(
      dtype=DTYPES[m.compute_dtype],
      attention_impl=impl,
      num_local=int(m.focal.num_local) if m.focal.enabled else 0,
      crop_size=int(m.focal.crop_size),
      zoom=float(m.focal.zoom),
      eval_overlap=float(m.focal.eval_overlap),
      lung_bias=float(m.focal.lung_bias),
      resize=str(m.focal.resize),
      train_windows=str(m.focal.train_windows),
      num_queries=int(m.queries.num_queries) if m.queries.enabled else 0,
      inject_layer=int(m.queries.inject_layer),
      query_mode=str(m.queries.mode),
      query_init_std=float(m.queries.init_std),
      fusion_heads=int(m.fusion.num_heads),
      fusion_layers=int(m.fusion.num_layers),
      fusion_keep_global=bool(m.fusion.keep_global),
      moe=bool(m.moe.enabled),
      gating=str(m.moe.gating),
      top_k=int(m.moe.top_k),
      gate_hidden=int(m.moe.gate_hidden),
  )


def build(config: ml_collections.ConfigDict, experts: Sequence[Any],
          labels: Sequence[str],
          prompt_embeddings: Optional[Sequence[Any]] = None) -> MedBridge:
  """The MedBridge module for loaded `experts` and `labels`.

  Args:
    config: the full config (reads `model`, `zero_shot.positive/negative`).
    experts: loaded `experts.Expert`s, in order (expert_0, expert_1, ...).
    labels: label names; L = len(labels).
    prompt_embeddings: per expert (L, 2, P) normalised text features of the
      positive / negative label prompts. None with `model.head.text_init`:
      computed here with `experts.zero_shot.prompt_embeddings`.
  """
  if not experts:
    raise UserError("no experts: give config.experts or random_experts")
  if not labels:
    raise UserError("no labels to train on")
  settings = settings_from_config(config.model)
  text_init = bool(config.model.head.text_init)
  if text_init and prompt_embeddings is None:
    prompt_embeddings = [
        zero_shot.prompt_embeddings(e, list(labels), config.zero_shot.positive,
                                    config.zero_shot.negative)
        for e in experts]
  if prompt_embeddings is not None and len(prompt_embeddings) != len(experts):
    raise ValueError(f"{len(prompt_embeddings)} prompt embeddings for "
                     f"{len(experts)} experts")
  specs = []
  for k, e in enumerate(experts):
    directions = None
    if text_init:
      rows = heads.text_directions(prompt_embeddings[k],
                                   float(e.logit_scale))
      if rows.shape[0] != len(labels):
        raise ValueError(f"prompt embeddings of expert {k} have "
                         f"{rows.shape[0]} labels, expected {len(labels)}")
      directions = heads.TextDirections(rows)
    specs.append(ExpertSpec(
        vision=e.vision.config, side=int(e.image_size),
        mean=tuple(float(x) for x in e.image_mean),
        std=tuple(float(x) for x in e.image_std), directions=directions))
  return MedBridge(tuple(specs), len(labels), settings)


def _shape(x) -> Tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def check_tower(model_tower: Any, expert: Any) -> dict:
  """The expert's vision params as float32, after checking them against the
  model's tower subtree (arrays or ShapeDtypeStructs): every path and shape
  must match; the first difference is an error naming it."""
  want = traverse_util.flatten_dict(dict(model_tower), sep="/")
  have = traverse_util.flatten_dict(dict(expert.params["vision"]), sep="/")
  for path in sorted(set(want) | set(have)):
    if path not in have:
      raise UserError(f"expert {expert.name}: tower parameter {path!r} "
                      f"missing from the loaded weights")
    if path not in want:
      raise UserError(f"expert {expert.name}: loaded parameter {path!r} is "
                      f"not in the model's tower")
    if _shape(have[path]) != _shape(want[path]):
      raise UserError(f"expert {expert.name}: tower parameter {path!r} has "
                      f"shape {_shape(have[path])}, the model expects "
                      f"{_shape(want[path])}")
  return traverse_util.unflatten_dict(
      {p: jnp.asarray(v, jnp.float32) for p, v in have.items()}, sep="/")


def abstract_params(model: MedBridge, image_size: int) -> dict:
  """The model's params as ShapeDtypeStructs, for images of side
  `image_size` (nothing is computed)."""
  images = jnp.zeros((1, image_size, image_size), jnp.float32)
  return jax.eval_shape(
      lambda k: model.init({"params": k}, images, train=False)["params"],
      jax.random.key(0))


def init_params(model: MedBridge, key: Array, experts: Sequence[Any],
                image_size: int, sharding: Optional[Any] = None) -> dict:
  """MedBridge params (the "params" collection): loaded towers, the rest
  initialised randomly from `key`.

  `image_size` is the stored image side H = W. The towers are never
  randomly initialised: their loaded weights are checked against the
  model's abstract params, then handed to a jitted, mutable apply that only
  creates the missing (MedBridge) params; XLA drops the unused forward. It
  runs in evaluation mode: the same parameters as training mode, with no
  random crops to compile. `sharding` (e.g. replicated over a mesh) lays
  every param out directly where it will live.
  """
  if len(experts) != len(model.experts):
    raise ValueError(f"{len(experts)} experts for a model of "
                     f"{len(model.experts)}")
  images = jnp.zeros((1, image_size, image_size), jnp.float32)
  abstract = abstract_params(model, image_size)
  towers = [check_tower(abstract[f"expert_{k}"]["tower"], e)
            for k, e in enumerate(experts)]
  if sharding is not None:
    towers = jax.device_put(towers, sharding)

  def init(k, towers):
    given = {"params": {f"expert_{k}": {"tower": t}
                        for k, t in enumerate(towers)}}
    _, new = model.apply(given, images, train=False, rngs={"params": k},
                         mutable=["params"])
    return new["params"]

  out_shardings = (None if sharding is None
                   else jax.tree.map(lambda _: sharding, abstract))
  return jax.jit(init, out_shardings=out_shardings)(key, towers)
