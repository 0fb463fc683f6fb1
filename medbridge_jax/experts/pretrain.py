"""A short generic pre-training that gives small random experts some sight.

Real foundation models see small things: their first layers hold edge,
blob and line detectors learnt from millions of images. A randomly
initialised ViT does not: a finding smaller than a patch is mixed linearly
into that patch's token with all the texture around it, and nothing in the
frozen layers pulls it out (trained on crops labelled by where a 3-4 px
nodule is, the one-expert MedBridge branch reaches AUROC 0.69;
benchmarks/focal_zoom.py). Then focal sampling has nothing to show, however
well MedBridge learns; that is a property of the test bed, not of the method.

So the embedded default's experts are pre-trained here (1,500 steps by
default) on a generic synthetic task that knows nothing of chest X-rays:
images of smooth multi-scale texture, soft shapes and step edges, with
small blobs (1-3 px radius) and thin lines (about 1 px wide) of either
polarity scattered over them. The whole vision tower learns to predict,
per patch token, whether a blob or a line lies in the patch, the patch's
mean and its 2x2 detail; and from the pooled image feature (the one the
expert's own pooling gives), whether the image holds any blob or line and
a 4x4 thumbnail of the image. The text tower stays random.

`pretrain(vision, params, steps, seed)` returns the vision params after
training; `random_experts.write` calls it for specs with `pretrain=STEPS`.
Deterministic for a given platform; the folder is written once and cached.
"""

from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medbridge_jax.experts.expert import FAMILY_MEAN_STD, normalize_pixels
from medbridge_jax.experts.vit import VisionConfig, VisionTower

Array = jax.Array
BATCH = 64
LEARNING_RATE = 1e-3
MAX_BLOBS = 4
MAX_LINES = 2
THUMB = 4  # Global target: a THUMB x THUMB thumbnail of the image.
TASK = ("generic synthetic images (multi-scale texture, soft shapes, step "
        "edges, small blobs of radius 1-3 px and thin lines, no chest "
        "X-rays); targets: per patch blob/line present, mean and 2x2 detail; "
        "per image any blob/line and a 4x4 thumbnail")


# ---- Generic images ---------------------------------------------------------

def _smooth_noise(key: Array, batch: int, side: int, feature: int) -> Array:
  """(B, S, S) unit-scale smooth noise with features of about `feature` px."""
  cells = max(2, side // feature)
  white = jax.random.normal(key, (batch, cells, cells))
  return jax.image.resize(white, (batch, side, side), "cubic")


def _grid(side: int) -> Tuple[Array, Array]:
  """Pixel-centre coordinates (S, S) rows and columns."""
  r = jnp.arange(side, dtype=jnp.float32) + 0.5
  return r[:, None] * jnp.ones((1, side)), jnp.ones((side, 1)) * r[None, :]


def generic_images(key: Array, batch: int, side: int) -> Dict[str, Array]:
  """A batch of generic images and where their small things are.

  Returns "image" (B, S, S) in [0, 1], "blobs" and "lines" (B, S, S)
  coverage maps in [0, 1], "num_blobs" and "num_lines" (B,).
  """
  keys = iter(jax.random.split(key, 64))
  u = lambda lo, hi, shape=(): jax.random.uniform(next(keys), (batch,) + shape,
                                                  minval=lo, maxval=hi)
  rows, cols = _grid(side)
  img = u(0.25, 0.75)[:, None, None] * jnp.ones((batch, side, side))
  # Multi-scale texture: 2 px grain up to half-image undulation.
  for feature, amp in ((2, 0.03), (4, 0.06), (8, 0.06), (16, 0.08),
                       (32, 0.1)):
    img += u(0.0, amp)[:, None, None] * _smooth_noise(next(keys), batch,
                                                      side, feature)
  # Soft ellipses (organ-like shapes) and one step edge.
  for _ in range(3):
    cy, cx = u(0, side), u(0, side)
    ry, rx = u(0.08, 0.4) * side, u(0.08, 0.4) * side
    soft = u(0.5, 4.0)
    d = jnp.sqrt(((rows - cy[:, None, None]) / ry[:, None, None]) ** 2 +
                 ((cols - cx[:, None, None]) / rx[:, None, None]) ** 2)
    shape = jax.nn.sigmoid((1.0 - d) * ry[:, None, None] / soft[:, None, None])
    img += u(-0.25, 0.25)[:, None, None] * shape
  angle = u(0, 2 * np.pi)
  offset = u(-0.4, 0.4) * side
  t = ((rows - side / 2) * jnp.sin(angle)[:, None, None] +
       (cols - side / 2) * jnp.cos(angle)[:, None, None] -
       offset[:, None, None])
  img += u(-0.15, 0.15)[:, None, None] * jax.nn.sigmoid(
      t / u(0.3, 3.0)[:, None, None])

  # Small blobs: sharp disks of radius 1-3 px, either polarity.
  num_blobs = jax.random.randint(next(keys), (batch,), 0, MAX_BLOBS + 1)
  num_blobs = jnp.where(u(0, 1) < 0.4, 0, num_blobs)
  margin = 3.0
  by, bx = u(margin, side - margin, (MAX_BLOBS,)), u(margin, side - margin,
                                                     (MAX_BLOBS,))
  radius = u(1.0, 3.0, (MAX_BLOBS,))
  sign = jnp.where(u(0, 1, (MAX_BLOBS,)) < 0.75, 1.0, -1.0)
  contrast = sign * u(0.1, 0.45, (MAX_BLOBS,))
  on = jnp.arange(MAX_BLOBS)[None] < num_blobs[:, None]
  dist = jnp.sqrt((rows[None, None] - by[..., None, None]) ** 2 +
                  (cols[None, None] - bx[..., None, None]) ** 2)
  cover = jnp.clip(radius[..., None, None] - dist + 0.5, 0.0, 1.0)
  cover = cover * on[..., None, None]
  img += jnp.sum(contrast[..., None, None] * cover, axis=1)
  blobs = jnp.max(cover, axis=1)

  # Thin lines: segments about 1 px wide, either polarity.
  num_lines = jnp.where(u(0, 1) < 0.6, 0,
                        jax.random.randint(next(keys), (batch,), 1,
                                           MAX_LINES + 1))
  ly, lx = u(0, side, (MAX_LINES,)), u(0, side, (MAX_LINES,))
  la = u(0, np.pi, (MAX_LINES,))
  half = u(0.15, 0.6, (MAX_LINES,)) * side
  width = u(0.7, 1.6, (MAX_LINES,))
  lsign = jnp.where(u(0, 1, (MAX_LINES,)) < 0.5, 1.0, -1.0)
  lcontrast = lsign * u(0.1, 0.35, (MAX_LINES,))
  dy, dx = rows[None, None] - ly[..., None, None], cols[None, None] - lx[
      ..., None, None]
  along = dy * jnp.sin(la)[..., None, None] + dx * jnp.cos(la)[..., None,
                                                              None]
  across = dy * jnp.cos(la)[..., None, None] - dx * jnp.sin(la)[..., None,
                                                               None]
  lcover = jnp.clip(width[..., None, None] / 2 - jnp.abs(across) + 0.5, 0, 1)
  lcover = lcover * (jnp.abs(along) < half[..., None, None])
  lcover = lcover * (jnp.arange(MAX_LINES)[None] < num_lines[:, None])[
      ..., None, None]
  img += jnp.sum(lcontrast[..., None, None] * lcover, axis=1)
  lines = jnp.max(lcover, axis=1)

  img += u(0.003, 0.03)[:, None, None] * jax.random.normal(
      next(keys), (batch, side, side))
  return {"image": jnp.clip(img, 0.0, 1.0), "blobs": blobs, "lines": lines,
          "num_blobs": num_blobs, "num_lines": num_lines}


def _patches(x: Array, patch: int) -> Array:
  """(B, S, S) -> (B, G*G, patch, patch), row-major like the ViT's tokens."""
  b, s, _ = x.shape
  g = s // patch
  x = x.reshape(b, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
  return x.reshape(b, g * g, patch, patch)


def targets(batch: Dict[str, Array], patch: int) -> Dict[str, Array]:
  """Per-token and per-image targets of `generic_images` output."""
  img = batch["image"]
  pix = _patches(img, patch)
  b, t = pix.shape[:2]
  half = patch // 2
  quads = pix.reshape(b, t, 2, half, 2, half).mean(axis=(3, 5)).reshape(
      b, t, 4)
  mean = pix.mean(axis=(2, 3))
  s = img.shape[-1]
  thumb = img.reshape(b, THUMB, s // THUMB, THUMB, s // THUMB).mean(
      axis=(2, 4)).reshape(b, THUMB * THUMB)
  return {
      "token_blob": (_patches(batch["blobs"], patch).max(axis=(2, 3)) > 0.5
                     ).astype(jnp.float32),
      "token_line": (_patches(batch["lines"], patch).max(axis=(2, 3)) > 0.5
                     ).astype(jnp.float32),
      "token_values": jnp.concatenate(
          [mean[..., None], 4.0 * (quads - mean[..., None])], axis=-1),
      "image_flags": jnp.stack([batch["num_blobs"] > 0,
                                batch["num_lines"] > 0], -1).astype(
                                    jnp.float32),
      "image_values": thumb,
  }


# ---- The pre-training model and loop ----------------------------------------

class Pretrainer(nn.Module):
  """The vision tower plus small read-outs for the generic targets."""
  vision: VisionConfig

  @nn.compact
  def __call__(self, pixels: Array) -> Dict[str, Array]:
    tower = VisionTower(self.vision, name="tower")
    x = tower.encode(tower.embed(pixels))
    pooled = tower.pool(x)
    tokens = nn.LayerNorm(name="token_norm")(
        x[:, self.vision.num_prefix_tokens:])
    token_out = nn.Dense(2 + 5, name="token_head")(tokens)
    image_out = nn.Dense(2 + THUMB * THUMB, name="image_head")(
        nn.LayerNorm(name="image_norm")(pooled))
    return {"token_logits": token_out[..., :2],
            "token_values": token_out[..., 2:],
            "image_logits": image_out[..., :2],
            "image_values": image_out[..., 2:]}


def normalize(images: Array, family: str) -> Array:
  """(B, S, S) in [0, 1] -> (B, S, S, 3) as the family's processor does."""
  return normalize_pixels(images[..., None], *FAMILY_MEAN_STD[family])


def losses(out: Dict[str, Array], t: Dict[str, Array]) -> Dict[str, Array]:
  bce = optax.sigmoid_binary_cross_entropy
  token_flags = jnp.stack([t["token_blob"], t["token_line"]], -1)
  return {
      "token_flags": bce(out["token_logits"], token_flags).mean(),
      "token_values": jnp.mean(
          jnp.square(out["token_values"] - 10.0 * t["token_values"])),
      "image_flags": bce(out["image_logits"], t["image_flags"]).mean(),
      "image_values": jnp.mean(
          jnp.square(out["image_values"] - 10.0 * t["image_values"])),
  }


def train(vision: VisionConfig, params: dict, steps: int, seed: int,
          log: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Tuple[Pretrainer, dict, Dict[str, float]]:
  """Trains the vision tower `params` (our layout) and the read-outs.

  Returns (the Pretrainer module, all its params, the loss terms averaged
  over the last 20 steps). `log(step, loss terms)` is called every 100
  steps and at the last one, if given.
  """
  model = Pretrainer(vision)
  side, patch = vision.image_size, vision.patch_size
  init_key, data_key = jax.random.split(jax.random.key(seed))
  dummy = jnp.zeros((1, side, side, 3), jnp.float32)
  variables = dict(model.init(init_key, dummy)["params"])
  variables["tower"] = jax.tree.map(jnp.asarray, params)
  warmup = min(100, max(1, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, LEARNING_RATE, warmup, max(steps, warmup + 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=1e-4))
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, key):
    batch = generic_images(key, BATCH, side)
    t = targets(batch, patch)
    pixels = normalize(batch["image"], vision.family)

    def loss_fn(v):
      terms = losses(model.apply({"params": v}, pixels), t)
      return sum(terms.values()), terms

    grads, terms = jax.grad(loss_fn, has_aux=True)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, terms

  recent = []
  for i in range(steps):
    variables, opt_state, terms = step(variables, opt_state,
                                       jax.random.fold_in(data_key, i))
    if i >= steps - 20 or (log is not None and
                           (i % 100 == 0 or i == steps - 1)):
      terms = {k: float(v) for k, v in jax.device_get(terms).items()}
      if i >= steps - 20:
        recent.append(terms)
      if log is not None and (i % 100 == 0 or i == steps - 1):
        log(i, terms)
  final = {k: float(np.mean([r[k] for r in recent])) for k in recent[0]
           } if recent else {}
  return model, jax.device_get(variables), final


def pretrain(vision: VisionConfig, params: dict, steps: int, seed: int,
             log: Optional[Callable[[int, Dict[str, float]], None]] = None
             ) -> Tuple[dict, Dict[str, float]]:
  """(the pre-trained vision tower params, final loss terms); see `train`."""
  _, variables, final = train(vision, params, steps, seed, log)
  return variables["tower"], final
