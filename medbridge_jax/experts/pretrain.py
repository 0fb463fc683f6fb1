"""A short generic pre-training that gives small random experts some sight.

Real foundation models see small things: their first layers hold edge,
blob and line detectors learnt from millions of images. A randomly
initialised ViT does not: a finding smaller than a patch is mixed linearly
into that patch's token with all the texture around it, and nothing in the
frozen layers pulls it out (trained on crops labelled by where a 3-4 px
nodule is, the one-expert MedBridge branch reaches AUROC 0.69;
python -m medbridge_jax.bench.focal_zoom). Then focal sampling has nothing
to show, however well MedBridge learns; that is a property of the test bed,
not of the method.

So the embedded default's experts are pre-trained here
(`default_config.PRETRAIN_STEPS` steps of batch BATCH) on a generic synthetic
task that knows nothing of chest X-rays:
images of smooth multi-scale texture, soft shapes and step edges, with
small blobs (1-3 px radius) and thin lines (about 1 px wide) of either
polarity scattered over them. The whole vision tower learns to predict,
per patch token, whether a blob, a line (or a square) lies in the patch,
the patch's mean and its 2x2 detail; and from the pooled image feature (the
one the expert's own pooling gives), whether the image holds any of them
and a 4x4 thumbnail of the image. The text tower stays random.

`shapes="heldout"` draws images that never show the synthetic findings'
shapes: no disks or blobs, no thin lines; soft rectangles instead of
ellipses, and small squares (5-8 px sides) as the small things to find.
It asks how much of what focal sampling gains needs the pre-training to
have seen the very shapes of the findings.

`pretrain(vision, params, steps, seed, shapes=...)` returns the vision
params after training; `random_experts.write` calls it for specs with
`pretrain=STEPS`. Deterministic only for a given platform (XLA's CPU code
differs between CPUs), which is why the default experts ship with the
package (`experts.testbed`).
"""

from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medbridge_jax.errors import UserError
from medbridge_jax.experts.expert import normalize_pixels
from medbridge_jax.experts.preprocessing import FAMILY_MEAN_STD
from medbridge_jax.experts.vit import VisionConfig, VisionTower

Array = jax.Array
# 1,500 steps of 64 images at 1e-3 (default_config.PRETRAIN_STEPS). A fifth
# of the images (600 steps of 32 at 3e-3) learnt the generic task as well
# but left the CLIP-like expert's 64 px nodule crops at AUROC 0.74 instead
# of 0.96 (python -m medbridge_jax.bench.focal_zoom --inject=-2 --queries=4
# --crops=64).
BATCH = 64
LEARNING_RATE = 1e-3
MAX_BLOBS = 4
MAX_LINES = 2
MAX_SQUARES = 4  # One per quadrant.
SQUARE_SIDES = (5.0, 8.0)  # Wide enough that no square looks like a blob.
THUMB = 4  # Global target: a THUMB x THUMB thumbnail of the image.
FLAGS = ("blob", "line", "square")  # Per patch and per image, in this order.
SHAPES = ("all", "heldout")
TASK = {
    "all": ("generic synthetic images (multi-scale texture, soft ellipses, "
            "step edges, small blobs of radius 1-3 px and thin lines, no "
            "chest X-rays); targets: per patch blob/line present, mean and "
            "2x2 detail; per image any blob/line and a 4x4 thumbnail"),
    "heldout": ("generic synthetic images without the findings' shapes "
                "(multi-scale texture, soft rectangles, step edges, small "
                "squares of 5-8 px sides; no blobs or disks, no thin lines, "
                "no chest X-rays); targets: per patch square present, mean "
                "and 2x2 detail; per image any square and a 4x4 thumbnail"),
}


def check_shapes(shapes: str) -> str:
  if shapes not in SHAPES:
    raise UserError(f"pretrain_shapes={shapes!r}: expected one of "
                    f"{', '.join(SHAPES)}")
  return shapes


def recipe(shapes: str = "all") -> Dict[str, object]:
  """What, besides spec and seed, decides the pre-trained weights."""
  return {"shapes": check_shapes(shapes), "task": TASK[shapes],
          "batch": BATCH, "learning_rate": LEARNING_RATE,
          "schedule": "warmup min(100, steps/10), cosine; adamw wd 1e-4, "
                      "clip 1.0"}


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


def generic_images(key: Array, batch: int, side: int,
                   shapes: str = "all") -> Dict[str, Array]:
  """A batch of generic images and where their small things are.

  Returns "image" (B, S, S) in [0, 1], "blobs", "lines" and "squares"
  (B, S, S) coverage maps in [0, 1], "num_blobs", "num_lines" and
  "num_squares" (B,). `shapes="all"` draws soft ellipses, blobs and lines
  (no squares); "heldout" soft rectangles and squares (no blobs or lines).
  """
  check_shapes(shapes)
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
  # Soft ellipses (organ-like shapes), or rectangles, and one step edge.
  for _ in range(3):
    cy, cx = u(0, side), u(0, side)
    ry, rx = u(0.08, 0.4) * side, u(0.08, 0.4) * side
    if shapes == "all":
      soft = u(0.5, 4.0)
      d = jnp.sqrt(((rows - cy[:, None, None]) / ry[:, None, None]) ** 2 +
                   ((cols - cx[:, None, None]) / rx[:, None, None]) ** 2)
      shape = jax.nn.sigmoid((1.0 - d) * ry[:, None, None] /
                             soft[:, None, None])
    else:
      # Large with a 1.5-3 px blur: a plateau, never a blob, and no sharp
      # edge that would cut a thin sliver off a square lying across it.
      ry, rx = jnp.maximum(ry, 0.15 * side), jnp.maximum(rx, 0.15 * side)
      soft = u(1.5, 3.0)[:, None, None]
      shape = jax.nn.sigmoid(jnp.minimum(
          ry[:, None, None] - jnp.abs(rows - cy[:, None, None]),
          rx[:, None, None] - jnp.abs(cols - cx[:, None, None])) / soft)
    img += u(-0.25, 0.25)[:, None, None] * shape
  angle = u(0, 2 * np.pi)
  offset = u(-0.4, 0.4) * side
  t = ((rows - side / 2) * jnp.sin(angle)[:, None, None] +
       (cols - side / 2) * jnp.cos(angle)[:, None, None] -
       offset[:, None, None])
  edge_blur = (0.3, 3.0) if shapes == "all" else (1.5, 3.0)
  img += u(-0.15, 0.15)[:, None, None] * jax.nn.sigmoid(
      t / u(*edge_blur)[:, None, None])
  if shapes == "all":
    img, small = _blobs_and_lines(img, u, keys, rows, cols, side)
  else:
    img, small = _squares(img, u, keys, rows, cols, side)
  img += u(0.003, 0.03)[:, None, None] * jax.random.normal(
      next(keys), (batch, side, side))
  return {"image": jnp.clip(img, 0.0, 1.0), **small}


def _blobs_and_lines(img, u, keys, rows, cols, side):
  """Adds small blobs and thin lines to `img`; (img, their maps)."""
  batch = img.shape[0]
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
  return img, {"blobs": blobs, "lines": lines,
               "squares": jnp.zeros_like(img), "num_blobs": num_blobs,
               "num_lines": num_lines,
               "num_squares": jnp.zeros_like(num_blobs)}


def _squares(img, u, keys, rows, cols, side):
  """Adds small axis-aligned squares to `img`; (img, their maps)."""
  batch = img.shape[0]
  num = jax.random.randint(next(keys), (batch,), 0, MAX_SQUARES + 1)
  num = jnp.where(u(0, 1) < 0.4, 0, num)
  half = u(*SQUARE_SIDES, (MAX_SQUARES,)) / 2
  # One square per quadrant, so that two never overlap: an overlap would
  # leave a thin sliver, a line-like thing this variant must not show.
  margin = SQUARE_SIDES[1] / 2 + 4  # Nor a sliver at the border.
  quadrant = side / 2
  corner = jnp.asarray([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.float32) * \
      quadrant
  cy = corner[:, 0] + u(margin, quadrant - margin, (MAX_SQUARES,))
  cx = corner[:, 1] + u(margin, quadrant - margin, (MAX_SQUARES,))
  sign = jnp.where(u(0, 1, (MAX_SQUARES,)) < 0.75, 1.0, -1.0)
  contrast = sign * u(0.1, 0.45, (MAX_SQUARES,))
  # Exact pixel coverage of an axis-aligned square: a product of 1-D ones.
  cover_1d = lambda x, c: jnp.clip(
      half[..., None, None] - jnp.abs(x[None, None] - c[..., None, None])
      + 0.5, 0.0, 1.0)
  cover = cover_1d(rows, cy) * cover_1d(cols, cx)
  cover = cover * (jnp.arange(MAX_SQUARES)[None] < num[:, None])[
      ..., None, None]
  img += jnp.sum(contrast[..., None, None] * cover, axis=1)
  zeros = jnp.zeros_like(img)
  return img, {"blobs": zeros, "lines": zeros,
               "squares": jnp.max(cover, axis=1),
               "num_blobs": jnp.zeros_like(num),
               "num_lines": jnp.zeros_like(num), "num_squares": num}


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
  flag = lambda m: (_patches(m, patch).max(axis=(2, 3)) > 0.5).astype(
      jnp.float32)
  return {
      "token_blob": flag(batch["blobs"]),
      "token_line": flag(batch["lines"]),
      "token_square": flag(batch["squares"]),
      "token_values": jnp.concatenate(
          [mean[..., None], 4.0 * (quads - mean[..., None])], axis=-1),
      "image_flags": jnp.stack([batch[f"num_{f}s"] > 0 for f in FLAGS],
                               -1).astype(jnp.float32),
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
    n = len(FLAGS)
    token_out = nn.Dense(n + 5, name="token_head")(tokens)
    image_out = nn.Dense(n + THUMB * THUMB, name="image_head")(
        nn.LayerNorm(name="image_norm")(pooled))
    return {"token_logits": token_out[..., :n],
            "token_values": token_out[..., n:],
            "image_logits": image_out[..., :n],
            "image_values": image_out[..., n:]}


def family_pixels(images: Array, family: str) -> Array:
  """(B, S, S) in [0, 1] -> (B, S, S, 3) as the family's processor does."""
  return normalize_pixels(images[..., None], *FAMILY_MEAN_STD[family])


def losses(out: Dict[str, Array], t: Dict[str, Array]) -> Dict[str, Array]:
  bce = optax.sigmoid_binary_cross_entropy
  token_flags = jnp.stack([t[f"token_{f}"] for f in FLAGS], -1)
  return {
      "token_flags": bce(out["token_logits"], token_flags).mean(),
      "token_values": jnp.mean(
          jnp.square(out["token_values"] - 10.0 * t["token_values"])),
      "image_flags": bce(out["image_logits"], t["image_flags"]).mean(),
      "image_values": jnp.mean(
          jnp.square(out["image_values"] - 10.0 * t["image_values"])),
  }


def train(vision: VisionConfig, params: dict, steps: int, seed: int,
          log: Optional[Callable[[int, Dict[str, float]], None]] = None,
          shapes: str = "all") -> Tuple[Pretrainer, dict, Dict[str, float]]:
  """Trains the vision tower `params` (our layout) and the read-outs.

  Returns (the Pretrainer module, all its params, the loss terms averaged
  over the last 20 steps). `log(step, loss terms)` is called every 100
  steps and at the last one, if given. `shapes` picks the images
  (`generic_images`).
  """
  check_shapes(shapes)
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
    batch = generic_images(key, BATCH, side, shapes)
    t = targets(batch, patch)
    pixels = family_pixels(batch["image"], vision.family)

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
             log: Optional[Callable[[int, Dict[str, float]], None]] = None,
             shapes: str = "all") -> Tuple[dict, Dict[str, float]]:
  """(the pre-trained vision tower params, final loss terms); see `train`."""
  _, variables, final = train(vision, params, steps, seed, log, shapes)
  return variables["tower"], final
