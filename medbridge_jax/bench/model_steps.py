"""The device work the harness times, built from the project's own parts.

  forward  one frozen expert tower, pixels (B, side, side, 3) -> features,
           in the compute dtype with the frozen path's attention kernel;
  train    `train_step.make_train_step` (the real step: focal views, K experts'
           Query-Encoders, fusion, MoE, loss, backward, AdamW; or the
           baseline `config.method` names), jitted as
           `train.train_and_evaluate` jits it;
  eval     `evaluate.make_model_fn` (sliding-window views, probabilities);
  matmul   one large jitted matmul: the ceiling the others are held to.

Every input is placed on the device(s) before timing. The K experts of a
benchmark share one architecture (and, to save memory and set-up time, one
set of weights: the cost is the same).
"""

import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbridge_jax import default_config
from medbridge_jax import errors
from medbridge_jax import evaluate
from medbridge_jax import experts as experts_lib
from medbridge_jax import methods
from medbridge_jax.experts import from_config
from medbridge_jax import optim
from medbridge_jax import sharding
from medbridge_jax import train_state
from medbridge_jax import train_step as train_step_lib
from medbridge_jax.bench import timing
from medbridge_jax.data import synthetic_draw
from medbridge_jax.experts import layers
from medbridge_jax.experts.vit import VisionTower
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition

# Named architectures; anything else is a random-expert spec string.
EXPERTS = {
    # The default config's first expert's shape (no pre-training: the
    # weights do not change the cost).
    "tiny": default_config.RANDOM_EXPERT_SHAPES[0],
    # CLIP ViT-B/16 at 224 px (openai/clip-vit-base-patch16's shape).
    "vit_b16": "clip:width=768,layers=12,heads=12,patch=16,image=224,"
               "proj=512",
}
LABELS = synthetic_draw.LABELS  # The synthetic data's five findings.


def expert_spec(name: str) -> str:
  """The random-expert spec of a named architecture, or `name` itself."""
  if name in EXPERTS:
    return EXPERTS[name]
  if ":" not in name:
    raise errors.UserError(f"--expert={name!r}: use one of "
                           f"{', '.join(EXPERTS)} or a spec like "
                           f"'clip:width=64,layers=4,heads=4,patch=8,image=64'")
  return name


def make_config(spec: str, *, batch: int, dtype: str,
                views: Optional[int], num_experts: Optional[int],
                attention: str, image_size: Optional[int],
                method: str = "medbridge") -> ml_collections.ConfigDict:
  """The default config with the benchmark's choices applied.

  `views` (N, training views per image) and `num_experts` (K) default to
  the default config's. Heads start random (text_init off): their
  initialisation does not change a step's cost. `method`: a
  `methods.NAMES` entry (the baselines see one view per expert).
  """
  c = default_config.get_default()
  c.method.name = method
  c.model.compute_dtype = dtype
  c.model.attention_impl = attention
  c.model.head.text_init = False
  if views is not None:
    if views < 1:
      raise errors.UserError(f"--views={views} must be >= 1")
    c.model.focal.enabled = views > 1
    c.model.focal.num_local = max(0, views - 1)
  k = len(c.random_experts) if num_experts is None else num_experts
  if k < 1:
    raise errors.UserError(f"--experts={num_experts} must be >= 1")
  c.random_experts = (spec,) * k
  if image_size:
    c.data.image_size = image_size
  c.train.batch_size = batch
  c.eval.batch_size = batch
  return c


@dataclasses.dataclass
class Setup:
  """A built model (`methods.build`) with its parameters on the device(s)."""
  config: ml_collections.ConfigDict
  expert: Any  # experts.Expert (all K experts share it).
  model: Any  # MedBridge or a baseline.
  mesh: jax.sharding.Mesh
  trainable: dict
  frozen: dict

  @property
  def settings(self) -> medbridge.Settings:
    return self.model.settings

  @property
  def num_experts(self) -> int:
    return len(self.model.experts)

  @property
  def side(self) -> int:
    return int(self.expert.image_size)

  @property
  def batch(self) -> int:
    return int(self.config.train.batch_size)

  def num_views(self, train_mode: bool) -> int:
    """N: views per image and expert in a train or eval step."""
    if self.config.method.name != "medbridge":
      return 1  # The baselines' global view.
    s, size = self.settings, int(self.config.data.image_size)
    return focal_sampling.num_views(
        size, size, crop=s.crop_for(self.side), num_local=s.num_local,
        train=train_mode, overlap=s.eval_overlap,
        train_windows=s.train_windows, global_view=s.global_view)

  def attention(self, differentiated: bool) -> Optional[str]:
    """The kernel `layers.choose_attention` picks for this expert's path."""
    v = self.expert.vision.config
    return layers.choose_attention(
        self.settings.attention_impl, self.settings.dtype,
        v.hidden_size // v.num_heads, differentiated=differentiated,
        masked=False)


def build(config: ml_collections.ConfigDict, seed: int = 0) -> Setup:
  """Loads the (cached) random expert and builds the method around it."""
  spec = config.random_experts[0]
  path = from_config.random_expert_folder(spec, 0)
  expert = experts_lib.load(path, dtype=from_config.compute_dtype(config))
  k = len(config.random_experts)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(int(config.train.batch_size), mesh, "--batch")
  crop = medbridge.settings_from_config(config.model).crop_for(
      int(expert.image_size))
  if crop > int(config.data.image_size):
    raise errors.UserError(f"--image_size={config.data.image_size} is smaller "
                           f"than the crop side {crop}")
  model = methods.build(config, [expert] * k, LABELS)
  params = medbridge.init_params(model, jax.random.key(seed), [expert] * k,
                                 int(config.data.image_size),
                                 sharding.replicated(mesh))
  trainable, frozen = partition.split(
      params, methods.partition_rules(config, [expert] * k))
  return Setup(config, expert, model, mesh, trainable, frozen)


Call = Callable[[], Any]


def forward(setup: Setup) -> Call:
  """One frozen tower's forward on B views, as MedBridge runs its stream."""
  s = setup.settings
  tower = VisionTower(setup.expert.vision.config, dtype=s.dtype,
                      attention_impl=s.attention_impl)
  # The loaded weights (a method may train some of the tower's own).
  params = jax.device_put(setup.expert.params["vision"],
                          sharding.replicated(setup.mesh))
  pixels = timing.random_array(
      (setup.batch, setup.side, setup.side, 3), jnp.float32,
      sharding.batch_sharding(setup.mesh))
  fn = jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])
  return lambda: fn(params, pixels)


def _images(setup: Setup, seed: int) -> jax.Array:
  size = int(setup.config.data.image_size)
  return timing.random_array((setup.batch, size, size), jnp.uint8,
                             sharding.batch_sharding(setup.mesh), seed)


def train_step(setup: Setup) -> Call:
  """The project's train step on one device-resident batch, state donated."""
  c, mesh = setup.config, setup.mesh
  replicated = sharding.replicated(mesh)
  tx, schedule = optim.make(c.train), optim.schedule(c.train)
  # A copy: the step donates its state, the eval step keeps `trainable`.
  params = jax.tree.map(lambda x: x.copy(), setup.trainable)
  state = train_state.create(params, tx, replicated)
  step = jax.jit(
      train_step_lib.make_train_step(setup.model, tx, schedule, c, mesh),
      donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda _: replicated, state), replicated))
  bs = sharding.batch_sharding(mesh)
  shape = (setup.batch, len(LABELS))
  targets = np.random.default_rng(2).integers(0, 2, shape)
  batch = dict(image=_images(setup, 1),
               targets=jax.device_put(targets.astype(np.float32), bs),
               mask=jax.device_put(np.ones(shape, np.float32), bs))
  holder = [state]

  def call():
    holder[0], metrics = step(holder[0], setup.frozen, batch, None)
    return holder[0], metrics

  return call


def eval_step(setup: Setup) -> Call:
  """The project's evaluation function (all sliding windows) on one batch."""
  fn = evaluate.make_model_fn(setup.model)
  images = _images(setup, 3)
  return lambda: fn(setup.trainable, setup.frozen, images)


def matmul(n: int, dtype) -> Tuple[Call, int]:
  """(call, FLOPs per call) of an (n, n) x (n, n) jitted matmul."""
  device = jax.local_devices()[0]
  a = timing.random_array((n, n), dtype, device, 4)
  b = timing.random_array((n, n), dtype, device, 5)
  fn = jax.jit(jnp.matmul)
  return (lambda: fn(a, b)), 2 * n ** 3
