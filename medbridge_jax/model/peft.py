"""Parameter-efficient adaptation of a frozen image tower: VPT and LoRA.

The baselines MedBridge is compared against. Each module maps normalised
NHWC pixels (B, S, S, C), at the expert's side, to the expert's image
features (B, P), i.e. what `VisionTower.__call__(pixels)[0]` gives, and
holds the frozen tower as a submodule named `tower`, so its params live at
`.../tower/...` as in MedBridge (partition rules freeze them by name):

  VptFeatures   visual prompt tuning (Jia et al. 2022): learnable prompt
                tokens carried through the frozen layers.
                  params: tower/..., prompts (M, D) shallow | (L, M, D) deep
                `prompted_features(tower, pixels, prompts, deep)` is its
                forward, for a tower that lives elsewhere.
  LoraFeatures  LoRA (Hu et al. 2021) on the attention projections of every
                encoder layer: W' = W + (alpha / rank) * A @ B.
                  params: tower/..., lora/layers_{i}/{target}/a (D, r),
                          lora/layers_{i}/{target}/b (r, D)

Every frozen layer runs with `differentiated=True` attention: a training
step backpropagates through all of them (see layers.choose_attention).

Params: the tower's loaded weights go at `tower/`; `init_params` creates the
method's own params around them:

  module = peft.LoraFeatures(expert.vision.config, rank=4, alpha=8.0)
  params = peft.init_params(module, key, expert.params["vision"],
                            expert.image_size)
  features = module.apply({"params": params}, pixels)
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError
from medbridge_jax.experts.vit import VisionConfig, VisionTower
from medbridge_jax.model import medbridge

Array = jax.Array
LORA_TARGETS = ("query", "key", "value", "out")
# LoRA's A init (loralib, peft): kaiming_uniform(a=sqrt(5)) over fan_in,
# i.e. U(-1/sqrt(D), 1/sqrt(D)).
LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class VptFeatures(nn.Module):
  """Visual prompt tuning: pixels (B, S, S, C) -> image features (B, P).

  Shallow (`deep=False`): M prompt tokens (param `prompts`, (M, D)) are
  inserted after the prefix (class) token of `tower.embed`'s output and go
  through every frozen layer. Deep: one set per layer (param `prompts`,
  (L, M, D)); before layer i the prompt tokens are replaced by set i, so
  the previous layer's prompt outputs are dropped. Prompts carry no
  position embedding (for CLIP they enter after the pre-norm).

  Pooling never sees the prompt tokens: they are cut off before
  `tower.pool` (CLIP pools the class token; SigLIP post-norms and pools
  the image tokens with its MAP head or mean). With M = 0 there is no
  param and the features are the frozen tower's, bit for bit.
  """
  vision: VisionConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  num_prompts: int = 8
  deep: bool = False
  init_std: float = 0.02

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    if self.num_prompts < 0:
      raise UserError(f"VPT num_prompts must be >= 0; got "
                      f"{self.num_prompts}")
    if self.init_std < 0:
      raise UserError(f"VPT init_std must be >= 0; got {self.init_std}")
    tower = VisionTower(self.vision, self.dtype, self.attention_impl,
                        name="tower")
    if self.num_prompts == 0:
      return prompted_features(tower, pixels, None, self.deep)
    shape = ((tower.num_layers,) if self.deep else ()) + (
        self.num_prompts, tower.hidden_size)
    prompts = self.param("prompts", nn.initializers.normal(self.init_std),
                         shape)
    return prompted_features(tower, pixels, prompts, self.deep)


def prompted_features(tower: VisionTower, pixels: Array,
                      prompts: Optional[Array], deep: bool) -> Array:
  """VPT's forward through a bound `tower`: image features (B, P).

  `prompts`: (M, D) shallow or (L, M, D) deep (see VptFeatures), or None
  for the frozen features (computed as `VisionTower.__call__` does, with
  differentiated attention). Usable with a tower that lives elsewhere,
  like the Query-Encoder's.
  """
  tokens = tower.embed(pixels)
  if prompts is None:
    return tower.pool(tower.encode(tokens, differentiated=True),
                      differentiated=True)
  n, d = tower.num_layers, tower.hidden_size
  want = ((n,) if deep else ()) + (prompts.shape[-2], d)
  if tuple(prompts.shape) != want:
    raise ValueError(f"prompts of shape {tuple(prompts.shape)} for a "
                     f"{'deep' if deep else 'shallow'} VPT; expected "
                     f"{want}")
  prompts = prompts.astype(tower.dtype)
  p, m = tower.num_prefix_tokens, prompts.shape[-2]
  b = tokens.shape[0]

  def with_prompts(x, layer_prompts):
    """x with the M prompt tokens inserted after the prefix tokens."""
    rows = jnp.broadcast_to(layer_prompts[None], (b, m, d))
    return jnp.concatenate([x[:, :p], rows, x[:, p:]], axis=1)

  x = with_prompts(tokens, prompts[0] if deep else prompts)
  for i in range(n):
    if deep and i > 0:
      x = with_prompts(drop_prompts(x, p, m), prompts[i])
    x = tower.encode(x, i, i + 1, differentiated=True)
  return tower.pool(drop_prompts(x, p, m), differentiated=True)


def drop_prompts(tokens: Array, num_prefix: int, num_prompts: int) -> Array:
  """(B, S + M, D) tokens without the M prompt tokens after the prefix."""
  return jnp.concatenate([tokens[:, :num_prefix],
                          tokens[:, num_prefix + num_prompts:]], axis=1)


class LoraFactors(nn.Module):
  """A (D_in, r) and B (r, D_out) of one projection; B starts at zero, so
  the adapted projection starts as the frozen one."""
  rank: int
  features_in: int
  features_out: int

  @nn.compact
  def __call__(self) -> Tuple[Array, Array]:
    a = self.param("a", LORA_A_INIT, (self.features_in, self.rank))
    b = self.param("b", nn.initializers.zeros,
                   (self.rank, self.features_out))
    return a, b


class LoraLayer(nn.Module):
  """The factors of one encoder layer: {target: (A, B)}."""
  rank: int
  hidden_size: int
  targets: Tuple[str, ...]

  @nn.compact
  def __call__(self) -> Dict[str, Tuple[Array, Array]]:
    d = self.hidden_size
    return {t: LoraFactors(self.rank, d, d, name=t)() for t in self.targets}


class LoraAdapters(nn.Module):
  """All layers' factors: [{target: (A, B)} for each encoder layer]."""
  num_layers: int
  hidden_size: int
  rank: int
  targets: Tuple[str, ...]

  @nn.compact
  def __call__(self) -> List[Dict[str, Tuple[Array, Array]]]:
    return [LoraLayer(self.rank, self.hidden_size, self.targets,
                      name=f"layers_{i}")()
            for i in range(self.num_layers)]


def check_lora(rank: int, alpha: float, targets: Sequence[str]) -> None:
  """Raises UserError naming a bad LoRA setting."""
  if rank < 1:
    raise UserError(f"LoRA rank must be >= 1; got {rank}")
  if not math.isfinite(alpha):
    raise UserError(f"LoRA alpha must be a finite number; got {alpha}")
  if not targets:
    raise UserError(f"LoRA targets must name at least one of {LORA_TARGETS}")
  for t in targets:
    if t not in LORA_TARGETS:
      raise UserError(f"LoRA target {t!r} is not one of {LORA_TARGETS}")
  if len(set(targets)) != len(targets):
    raise UserError(f"LoRA targets {tuple(targets)} name one twice")


def add_deltas(tower_params: Dict[str, Any], factors, scale: float
               ) -> Dict[str, Any]:
  """The tower params with scale * A @ B added to each adapted kernel.

  `factors[i][target] = (A, B)` adapts
  `tower_params["layers_{i}"]["attn"][target]["kernel"]`. A new tree: the
  given one is not modified.
  """
  out = dict(tower_params)
  for i, layer_factors in enumerate(factors):
    layer = dict(out[f"layers_{i}"])
    attn = dict(layer["attn"])
    for target, (a, b) in layer_factors.items():
      proj = dict(attn[target])
      # Full float32 products whatever the platform's default precision:
      # the factors are tiny, and the merged kernel must be W + s * A @ B.
      delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
      proj["kernel"] = proj["kernel"] + scale * delta
      attn[target] = proj
    layer["attn"] = attn
    out[f"layers_{i}"] = layer
  return out


class LoraFeatures(nn.Module):
  """LoRA on a frozen tower: pixels (B, S, S, C) -> image features (B, P).

  For every encoder layer i and each projection in `targets` (of query,
  key, value, out; the SigLIP pooling head is not adapted), the tower
  computes with kernel W + (alpha / rank) * A @ B, where A and B are params
  `lora/layers_{i}/{target}/a` (D, r), init U(+-1/sqrt(D)) as loralib, and
  `.../b` (r, D), init zero. The deltas are added to the kernels on the way
  into the tower (`nn.map_variables`), so the frozen params at `tower/`
  are never changed, not even by a mutable apply. With B = 0 the features
  are the frozen tower's.
  """
  vision: VisionConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  rank: int = 4
  alpha: float = 8.0
  targets: Tuple[str, ...] = ("query", "value")

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    check_lora(self.rank, self.alpha, self.targets)
    c = self.vision
    factors = LoraAdapters(c.num_layers, c.hidden_size, self.rank,
                           tuple(self.targets), name="lora")()
    scale = self.alpha / self.rank
    initializing = self.is_initializing()

    def adapt(variables):
      # In `init` the tower's params are being created: nothing to adapt
      # yet, and whatever goes in here is written back as the tower's.
      if initializing:
        return variables
      return dict(variables, params=add_deltas(variables["params"], factors,
                                               scale))

    tower = nn.map_variables(VisionTower, "params", trans_in_fn=adapt,
                             init=initializing)(
                                 c, self.dtype, self.attention_impl,
                                 name="tower")
    return tower(pixels, differentiated=True)[0]


def init_params(module: nn.Module, key: Array, tower_params: Dict[str, Any],
                side: int) -> Dict[str, Any]:
  """The module's params: `tower_params` (the loaded vision weights) at
  `tower/`, the method's own params initialised from `key`.

  `side` is the pixel side the module will see (any multiple of the patch
  size). A loaded tree that differs from the module's tower in any path or
  shape is an error naming the first difference.
  """
  c = module.vision
  pixels = jnp.zeros((1, side, side, c.num_channels), jnp.float32)
  abstract = jax.eval_shape(
      lambda k: module.init({"params": k}, pixels)["params"], key)
  tower_params = medbridge.check_loaded(abstract["tower"], tower_params,
                                       "tower")

  def init(k, tower):
    _, new = module.apply({"params": {"tower": tower}}, pixels,
                          rngs={"params": k}, mutable=["params"])
    return new["params"]

  return jax.jit(init)(key, tower_params)
