"""MedBridge: K frozen experts, Focal Sampling, Query-Encoders, fusion, MoE.

For each image (B, H, W) in [0, 1] and each expert k:

  focal_sampling         global view + local crops, by default each at the
                         expert's own input side (native resolution); crop
                         centres drawn once per image, shared by experts
  QueryEncoder           frozen tower + Q query tokens per view -> (T, P_k)
  CrossViewFusion        self-attention over all views' tokens, max over views
                         (`fusion.enabled=False`: the max alone)
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

from medbridge_jax import default_config
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


class _Key:
  """A `Settings` attribute that is one `config.model` key, as given."""

  def __init__(self, key: str):
    self.key = key

  def __get__(self, settings, owner=None):
    if settings is None:
      return self
    node = settings.model
    for part in self.key.split("."):
      node = node[part]
    return node


def _default_model() -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict(
      default_config.get_default().model.to_dict())


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every switch of the model: `config.model`, frozen (hashable, so a
  linen attribute and static under jit).

  The values and their defaults live only in the config
  (default_config.py; `Settings()` holds the defaults). The attributes
  below name keys for the model; the three that are not plain keys apply
  the config's meaning: focal sampling off is no local view, queries off is
  no query, and `dtype` is the array dtype. Build it with
  `settings_from_config`, which checks the values first.
  """
  model: ml_collections.FrozenConfigDict = dataclasses.field(
      default_factory=_default_model)

  crop_size = _Key("focal.crop_size")  # 0 = each expert's own input side.
  global_view = _Key("focal.global_view")
  global_side = _Key("focal.global_side")  # 0 = each expert's own side.
  eval_overlap = _Key("focal.eval_overlap")
  lung_bias = _Key("focal.lung_bias")
  resize = _Key("focal.resize")
  train_windows = _Key("focal.train_windows")
  inject_layer = _Key("queries.inject_layer")
  query_mode = _Key("queries.mode")
  query_init_std = _Key("queries.init_std")
  fusion = _Key("fusion.enabled")
  fusion_heads = _Key("fusion.num_heads")
  fusion_layers = _Key("fusion.num_layers")
  fusion_keep_global = _Key("fusion.keep_global")
  moe = _Key("moe.enabled")
  gating = _Key("moe.gating")
  top_k = _Key("moe.top_k")
  gate_hidden = _Key("moe.gate_hidden")
  attention_impl = _Key("attention_impl")

  @property
  def dtype(self) -> Any:
    """Compute dtype of the frozen towers."""
    return DTYPES[self.model.compute_dtype]

  @property
  def num_local(self) -> int:
    """Local views in training; 0 with focal sampling off."""
    focal = self.model.focal
    return focal.num_local if focal.enabled else 0

  @property
  def num_queries(self) -> int:
    """Query tokens per expert; 0 with queries off (the linear probe)."""
    queries = self.model.queries
    return queries.num_queries if queries.enabled else 0

  def crop_for(self, side: int) -> int:
    """Crop side in stored pixels for an expert whose input side is `side`."""
    return focal_sampling.crop_side(self.crop_size, side)


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
    self.fuses = s.fusion and (s.num_local > 0 or s.num_queries > 0)
    if self.fuses:
      self.fusion = fusion_lib.CrossViewFusion(
          s.fusion_heads, s.fusion_layers, s.fusion_keep_global,
          has_global=s.global_view)
    self.head = heads.Head(self.num_labels, self.spec.directions)

  def encode(self, views: Array) -> Array:
    """(B, n, S, S) views of one side -> (B, n, T, P) tokens."""
    b, n, h, w = views.shape
    pixels = expert_lib.normalize_pixels(views.reshape(b * n, h, w, 1),
                                         self.spec.mean, self.spec.std)
    tokens = self.encoder(self.tower, pixels)  # (B * n, T, P)
    return tokens.reshape((b, n) + tokens.shape[1:])

  def __call__(self, images: Array, train: bool,
               centres: Optional[Array]) -> Tuple[Array, Array]:
    """images (B, H, W) -> (logits (B, L), pooled query vector (B, P)).

    `centres` (B, num_local, 2): the training crops' centres, shared by all
    experts (None in evaluation or with sliding training windows).
    """
    s, side = self.settings, self.spec.side
    groups = focal_sampling.view_groups(
        images, side=side, crop=s.crop_for(side), num_local=s.num_local,
        train=train, centres=centres, overlap=s.eval_overlap,
        method=s.resize, train_windows=s.train_windows,
        global_view=s.global_view, global_side=s.global_side)
    # A global view of another side cannot share a batch with the crops:
    # each side is its own pass through the tower (same queries), and the
    # tokens are joined in view order.
    tokens = jnp.concatenate([self.encode(g) for g in groups], axis=1)
    if self.is_mutable_collection("intermediates"):
      fused = self._fuse_and_sow_views(tokens)
    elif self.fuses:
      fused = self.fusion(tokens)
    else:
      fused = fusion_lib.max_over_views(tokens, s.fusion_keep_global)
    logits = self.head(fused)
    # With fusion.keep_global the fused tokens are [max over local views;
    # global view]: the gate reads the first, fused, set of queries.
    return logits, query_encoder.pooled_queries(fused, s.num_queries)

  def _fuse_and_sow_views(self, tokens: Array) -> Array:
    """The fused tokens, as `__call__` computes them, after sowing
    "view_logits" (B, N, L): the head on each view's own fused tokens,
    before the max over views (`model.evidence`).

    With `keep_global` (and N > 1) the head reads [view; global view], as
    it reads [max over local views; global view]. Only runs when the
    caller collects "intermediates": the default path never traces it.
    """
    s = self.settings
    if self.fuses:
      fused = self.fusion(tokens)
      views = self.fusion.get_variable("intermediates", "views")[-1]
    else:
      fused = fusion_lib.max_over_views(tokens, s.fusion_keep_global)
      views = jnp.asarray(tokens, jnp.float32)
    b, n = views.shape[:2]
    if s.fusion_keep_global and n > 1:
      views = jnp.concatenate(
          [views, jnp.broadcast_to(views[:, :1], views.shape)], axis=2)
    view_logits = self.head(views.reshape((b * n,) + views.shape[2:]))
    self.sow("intermediates", "view_logits", view_logits.reshape(b, n, -1))
    return fused


class MedBridge(nn.Module):
  """The full model over K experts; see the module docstring."""
  experts: Tuple[ExpertSpec, ...]
  num_labels: int
  settings: Settings = Settings()

  @nn.compact
  def __call__(self, images: Array, *, train: bool):
    """images (B, H, W) uint8, or float in [0, 1] -> (logits (B, L), aux).

    Callers pass the pipeline's uint8 batches as they are: they are scaled
    on the device (`expert.unit_range`).

    aux: "gates" (B, K) or (B, K, L) for per-label gating, summing to 1 over
    K; "expert_logits" (B, K, L); "balance_loss" scalar (0 without a gate).
    Training draws crop positions from the rng stream "focal".
    """
    s = self.settings
    images = expert_lib.unit_range(images)
    if images.ndim != 3:
      raise UserError(f"images must be (batch, height, width); got "
                      f"{images.shape}")
    random_crops = s.num_local > 0 and s.train_windows == "random"
    centres = None
    if train and random_crops:
      # One draw per image for all experts: each places its own crop side
      # around the same centres, drawn where the largest crop fits.
      b, h, w = images.shape
      largest = max(s.crop_for(spec.side) for spec in self.experts)
      centres = focal_sampling.random_centres(
          self.make_rng("focal"), b, s.num_local, h, w, s.lung_bias, largest)
    outs = [ExpertBranch(spec, s, self.num_labels, name=f"expert_{k}")(
        images, train, centres) for k, spec in enumerate(self.experts)]
    return mix_experts(outs, self.num_labels, s)


def mix_experts(outs: Sequence[Tuple[Array, Array]], num_labels: int,
                settings: Settings) -> Tuple[Array, dict]:
  """(logits (B, L) float32, aux) from K experts' (logits, pooled vector).

  With MoE on and K > 1 a `moe.Gate` named "gate" (a submodule of the
  calling module: call this inside a compact method) weighs the experts
  from their pooled vectors; otherwise they are averaged. aux as
  `MedBridge.__call__` returns it.
  """
  s = settings
  expert_logits = jnp.stack([o[0] for o in outs], axis=1)  # (B, K, L)
  b, k = expert_logits.shape[:2]
  if s.moe and k > 1:
    gate = moe.Gate(k, num_labels, s.gating, s.top_k, s.gate_hidden,
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
  """`Settings` of `config.model`, after checking it (config_check)."""
  # config_check imports this module (DTYPES): import it here, not above.
  from medbridge_jax import config_check  # pylint: disable=g-import-not-at-top
  config_check.check_model(model_config)
  # A copy: a FrozenConfigDict made from a ConfigDict keeps it, and would
  # compare and hash by the live, mutable original.
  return Settings(ml_collections.FrozenConfigDict(model_config.to_dict()))


def build(config: ml_collections.ConfigDict, experts: Sequence[Any],
          labels: Sequence[str],
          prompt_embeddings: Optional[Sequence[Any]] = None) -> MedBridge:
  """The MedBridge module for loaded `experts` and `labels`.

  Args:
    config: the full config (reads `model`, `zero_shot.positive/negative`).
    experts: loaded `experts.Expert`s, in order (expert_0, expert_1, ...).
    labels: label names; L = len(labels).
    prompt_embeddings: per expert (L, 2, P) normalised text features of the
      positive / negative label prompts (None for a vision-only expert).
      None with `model.head.text_init`: computed here with
      `experts.zero_shot.prompt_embeddings`.
  """
  check_nonempty(experts, labels)
  settings = settings_from_config(config.model)
  check_views(config, experts)
  specs = expert_specs(config, experts, labels, prompt_embeddings)
  return MedBridge(specs, len(labels), settings)


def expert_specs(config: ml_collections.ConfigDict, experts: Sequence[Any],
                 labels: Sequence[str],
                 prompt_embeddings: Optional[Sequence[Any]] = None
                 ) -> Tuple[ExpertSpec, ...]:
  """Each expert's `ExpertSpec`, with the text-initialised head directions
  when `config.model.head.text_init` (see `build` for the arguments).

  A vision-only expert has no prompts: its head starts at zero, as every
  head does without text initialisation.
  """
  check_nonempty(experts, labels)
  text_init = bool(config.model.head.text_init)
  if text_init and prompt_embeddings is None:
    prompt_embeddings = label_prompts(config, experts, labels)
  if prompt_embeddings is not None and len(prompt_embeddings) != len(experts):
    raise ValueError(f"{len(prompt_embeddings)} prompt embeddings for "
                     f"{len(experts)} experts")
  specs = []
  for k, e in enumerate(experts):
    directions = None
    if text_init and prompt_embeddings[k] is not None:
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
  return tuple(specs)


def label_prompts(config: ml_collections.ConfigDict, experts: Sequence[Any],
                  labels: Sequence[str]) -> list:
  """Per expert, the (L, 2, P) label-prompt embeddings of the config's
  zero-shot prompts, or None for a vision-only expert."""
  z = config.zero_shot
  return [zero_shot.prompt_embeddings(e, list(labels), z.positive,
                                      z.negative) if e.has_text else None
          for e in experts]


def check_nonempty(experts: Sequence[Any], labels: Sequence[str]) -> None:
  """UserError when there is no expert or no label to build a model for."""
  if not experts:
    raise UserError("no experts: give config.experts or random_experts")
  if not labels:
    raise UserError("no labels to train on")


def check_views(config: ml_collections.ConfigDict,
                experts: Sequence[Any]) -> None:
  """Raises UserError naming the `model.focal` key that cannot work with
  these experts on `data.image_size` images (see focal_sampling)."""
  focal = config.model.focal
  focal_sampling.check_config(int(config.data.image_size),
                              [int(e.image_size) for e in experts], focal)
  if focal.global_view and focal.global_side:
    for k, e in enumerate(experts):
      patch = int(e.vision.config.patch_size)
      if focal.global_side % patch:
        raise UserError(f"model.focal.global_side={focal.global_side} must "
                        f"be a multiple of expert {k}'s patch size {patch}")


def _shape(x) -> Tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def check_loaded(model_tree: Any, loaded: Any, what: str,
                 prefix: str = "") -> dict:
  """`loaded` as float32, after checking it against the model's subtree
  (arrays or ShapeDtypeStructs): every path and shape must match; the first
  difference is an error naming it (`what`: e.g. "tower"; `prefix` starts
  the message, e.g. "expert clip-vit: ")."""
  want = traverse_util.flatten_dict(dict(model_tree), sep="/")
  have = traverse_util.flatten_dict(dict(loaded), sep="/")
  for path in sorted(set(want) | set(have)):
    if path not in have:
      raise UserError(f"{prefix}{what} parameter {path!r} missing from the "
                      f"loaded weights")
    if path not in want:
      raise UserError(f"{prefix}loaded parameter {path!r} is not in the "
                      f"model's {what}")
    if _shape(have[path]) != _shape(want[path]):
      raise UserError(f"{prefix}{what} parameter {path!r} has shape "
                      f"{_shape(have[path])}, the model expects "
                      f"{_shape(want[path])}")
  return traverse_util.unflatten_dict(
      {p: jnp.asarray(v, jnp.float32) for p, v in have.items()}, sep="/")


# Subtrees of an expert's params that hold loaded weights, by module name:
# the vision tower (every method) and the text tower (learned prompts).
LOADED = {"tower": ("vision", "tower"), "text_tower": ("text", "text tower")}


def _loaded_subtrees(tree: Any, expert: Any) -> dict:
  """Every `tower` / `text_tower` subtree of `tree` (at any depth), holding
  the expert's loaded, checked weights; other params are left out."""
  out = {}
  for key, sub in tree.items():
    if key in LOADED:
      part, what = LOADED[key]
      out[key] = check_loaded(sub, expert.params[part], what,
                              f"expert {expert.name}: ")
    elif hasattr(sub, "items"):
      inner = _loaded_subtrees(sub, expert)
      if inner:
        out[key] = inner
  return out


def tower_params(abstract: dict, experts: Sequence[Any]) -> dict:
  """The loaded weights of every expert, where the model's `abstract`
  params hold them: each `expert_k/.../tower` subtree gets the expert's
  vision params, each `expert_k/.../text_tower` its text params (MedBridge:
  {"expert_k": {"tower": ...}}), each checked against the model's shapes.
  An expert subtree without a tower is an error."""
  out = {}
  for k, e in enumerate(experts):
    name = f"expert_{k}"
    if name not in abstract:
      raise ValueError(f"the model has no {name} for expert {e.name}")
    out[name] = _loaded_subtrees(abstract[name], e)
    if not out[name]:
      raise ValueError(f"the model's {name} holds no tower")
  return out


def abstract_params(model: nn.Module, image_size: int) -> dict:
  """The model's params as ShapeDtypeStructs, for images of side
  `image_size` (nothing is computed)."""
  images = jnp.zeros((1, image_size, image_size), jnp.float32)
  return jax.eval_shape(
      lambda k: model.init({"params": k}, images, train=False)["params"],
      jax.random.key(0))


def init_params(model: nn.Module, key: Array, experts: Sequence[Any],
                image_size: int, sharding: Optional[Any] = None) -> dict:
  """The params (the "params" collection) of MedBridge or of any model with
  its calling convention (`methods.build`): loaded towers (`tower_params`),
  the rest initialised randomly from `key`.

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
  towers = tower_params(abstract, experts)
  if sharding is not None:
    towers = jax.device_put(towers, sharding)

  def init(k, towers):
    _, new = model.apply({"params": towers}, images, train=False,
                         rngs={"params": k}, mutable=["params"])
    return new["params"]

  out_shardings = (None if sharding is None
                   else jax.tree.map(lambda _: sharding, abstract))
  return jax.jit(init, out_shardings=out_shardings)(key, towers)
