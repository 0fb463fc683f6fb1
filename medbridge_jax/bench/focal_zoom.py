"""Which crop side lets a frozen expert see a focal finding? Crop-level tests.

  python -m medbridge_jax.bench.focal_zoom --expert=DIR [--finding=nodule|ptx] \
      [--crops=0,32,24] [--inject=0] [--queries=16] [--steps=300]

Renders synthetic studies (data.synthetic, which also gives where the
findings are), cuts crops of `crop` stored pixels that contain the finding
(nodule, or a stretch of the pneumothorax's pleural line) and lung crops of
studies without it, and trains the real one-expert MedBridge branch (frozen
tower + query tokens + head; views resized to the expert's side, so crop 32
on a 64 px expert is upsampled x2) on them with clean labels. Crop sides are
in stored pixels, 0 being the expert's own side (native resolution, as
`model.focal.crop_size=0`). Prints per crop size

  crop AUROC    held-out crops: can the expert + queries see the finding?
                (pneumothorax negatives lie at the lateral chest wall too)
  image AUROC   new images scored by the max over every evaluation sliding
                window of that crop size: what window-level detection
                gives at image level, before any multiple-instance learning.

No image-level labels are involved: this is the ceiling of what the focal
views can give with this expert, not what training from image labels reaches.

Measured 2026-12-01 on a 2-core CPU, default random CLIP-like expert
(width 64, patch 8, side 64), inject_layer 0, 16 queries:
  Lung Lesion, 300 steps:  crop 64: 0.68 / 0.53 (25 windows);
    crop 32: 0.83 / 0.72 (81); crop 16: 0.99 / 0.93 (361)   [crop / image]
  Pneumothorax, 600 steps: crop 64: 0.91 / 0.76 (25); crop 32: 0.98 / 0.91
So the purely random expert sees both findings only once upsampled (nodules
need about 4x). The default experts are pre-trained on a generic task
(experts.pretrain, spec pretrain=1500); with --inject=-2 --queries=4
--crops=64,256 (the default run's query settings), 2026-12-01:
  random CLIP-like:       nodule 0.690 / 0.532, whole image 0.467 / 0.516
  pre-trained CLIP-like:  nodule 0.963 / 0.973, whole image 0.466 / 0.512;
                          pneumothorax 1.000 / 0.996, whole image 0.574 / 0.538
  pre-trained SigLIP-like (48 px): nodule 0.792 / 0.476
The pre-trained expert sees the findings at native resolution and not in
the whole image at 64 px: the situation focal sampling is for (README,
Ablation).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import roc_auc_score

from medbridge_jax import default_config
from medbridge_jax import experts
from medbridge_jax.data import synthetic_draw
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition

SIZE = 256  # Stored image side, as the default synthetic data.
LABEL = {"nodule": "Lung Lesion", "ptx": "Pneumothorax"}


def studies(seed: int, finding: str):
  """(image uint8, geometry, positive) of first studies without the other
  focal finding, endlessly."""
  pid = 0
  while True:
    pid += 1
    p = synthetic_draw.draw_patient(seed, pid)
    s = synthetic_draw.draw_study(p, seed, 0)
    positive = bool(p.nodules) if finding == "nodule" else bool(s.pneumothorax)
    other = bool(s.pneumothorax) if finding == "nodule" else bool(p.nodules)
    if other:
      continue
    image, geo = synthetic_draw.render(p, s, SIZE)
    yield synthetic_draw.to_uint8(image), geo, positive


def negative_centre(lungs: np.ndarray, finding: str, rng) -> np.ndarray:
  """A lung pixel; for the pneumothorax one near the lateral chest wall
  (where its line would be), else the probe learns 'wall in view'."""
  cells = np.argwhere(lungs)
  for _ in range(1000):
    r, c = cells[rng.integers(len(cells))]
    if finding == "nodule":
      break
    out = c + (-12 if c < SIZE // 2 else 12)
    if r < 0.6 * SIZE and 0 <= out < SIZE and not lungs[r, out]:
      break
  return np.array([r, c])


def crops(n: int, crop: int, finding: str, seed: int, rng):
  """n positive then n negative crops (2n, crop, crop) float32 in [0, 1]."""
  pos, neg = [], []
  for image, geo, positive in studies(seed, finding):
    if positive and len(pos) < n:
      if finding == "nodule":
        r, c, _ = geo["nodules"][0]
        margin = 6
      else:
        line = np.argwhere(geo["pleural_line"])
        r, c = line[rng.integers(len(line))]
        margin = crop // 4
      lo = np.array([r, c], int) - crop + margin
      corner = np.clip(rng.integers(lo, lo + crop - 2 * margin + 1), 0,
                       SIZE - crop)
      pos.append(image[corner[0]:corner[0] + crop, corner[1]:corner[1] + crop])
    elif not positive and len(neg) < n:
      centre = negative_centre(geo["lungs"], finding, rng)
      corner = np.clip(centre - crop // 2, 0, SIZE - crop)
      neg.append(image[corner[0]:corner[0] + crop, corner[1]:corner[1] + crop])
    if len(pos) == n and len(neg) == n:
      return np.stack(pos + neg).astype(np.float32) / 255.0


def run(expert, finding: str, crop: int, args) -> tuple[float, float]:
  rng = np.random.default_rng(0)
  x = crops(args.crops_per_class, crop, finding, 5, rng)
  y = np.r_[np.ones(len(x) // 2), np.zeros(len(x) // 2)].astype(np.float32)
  order = rng.permutation(len(y))
  train, test = order[:int(0.7 * len(y))], order[int(0.7 * len(y)):]

  config = default_config.get_default()
  config.data.image_size = crop
  config.model.focal.enabled = False  # The crop is the image: one view.
  config.model.queries.inject_layer = args.inject
  config.model.queries.num_queries = args.queries
  model = medbridge.build(config, [expert], [LABEL[finding]])
  params = medbridge.init_params(model, jax.random.key(0), [expert], crop)
  trainable, frozen = partition.split(params)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, args.lr, 20, args.steps), weight_decay=1e-4)
  opt_state = tx.init(trainable)

  def logits(t, images):
    out, _ = model.apply({"params": partition.merge(t, frozen)}, images,
                         train=False)
    return out[:, 0]

  @jax.jit
  def step(t, opt_state, images, targets):
    loss = lambda t: optax.sigmoid_binary_cross_entropy(
        logits(t, images), targets).mean()
    grads = jax.grad(loss)(t)
    updates, opt_state = tx.update(grads, opt_state, t)
    return optax.apply_updates(t, updates), opt_state

  score = jax.jit(logits)
  for _ in range(args.steps):
    batch = rng.choice(train, 32)
    trainable, opt_state = step(trainable, opt_state, jnp.asarray(x[batch]),
                                jnp.asarray(y[batch]))
  crop_auroc = roc_auc_score(y[test], np.asarray(score(trainable,
                                                       jnp.asarray(x[test]))))

  windows = focal_sampling.sliding_windows(SIZE, SIZE, crop, args.overlap)
  targets, best = [], []
  num_pos, num_neg = args.images // 3, args.images - args.images // 3
  for image, _, positive in studies(7, finding):
    if len(targets) == num_pos + num_neg:
      break
    if sum(targets) >= num_pos if positive else (
        len(targets) - sum(targets) >= num_neg):
      continue
    views = np.stack([image[r:r + crop, c:c + crop] for r, c in windows])
    s = score(trainable, jnp.asarray(views, jnp.float32) / 255.0)
    best.append(float(np.max(s)))
    targets.append(int(positive))
  return crop_auroc, roc_auc_score(targets, best), len(windows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--expert", required=True, help="Expert folder.")
  parser.add_argument("--finding", default="nodule", choices=sorted(LABEL))
  parser.add_argument("--crops", default="0,32,24",
                      help="Crop sides in stored pixels, comma-separated; "
                      "0 = the expert's input side (native).")
  parser.add_argument("--inject", type=int, default=0, help="inject_layer.")
  parser.add_argument("--queries", type=int, default=16)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--crops-per-class", type=int, default=400)
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--overlap", type=float, default=0.125)
  args = parser.parse_args()
  expert = experts.load(args.expert)
  print(f"{LABEL[args.finding]} on {expert.name} (side {expert.image_size}), "
        f"inject_layer {args.inject}, {args.queries} queries, "
        f"{args.steps} steps")
  for crop in (int(c) for c in args.crops.split(",")):
    crop = focal_sampling.crop_side(crop, expert.image_size)
    start = time.monotonic()
    crop_auroc, image_auroc, n = run(expert, args.finding, crop, args)
    print(f"  crop {crop:3d} (x{expert.image_size / crop:.2f}): crop "
          f"AUROC {crop_auroc:.3f}, image AUROC {image_auroc:.3f} (max over "
          f"{n} windows) [{time.monotonic() - start:.0f} s]", flush=True)


if __name__ == "__main__":
  main()
