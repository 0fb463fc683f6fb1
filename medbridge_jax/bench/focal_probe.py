"""Can a frozen expert's features see a finding at all? A linear probe.

  python -m medbridge_jax.bench.focal_probe --expert=DIR --root=SYNTHETIC_ROOT \
      [--label="Lung Lesion"] [--images=300]

For `--images` validation images of a generated synthetic data set, runs the
frozen expert (no training) on every evaluation sliding window at native
resolution and on the downsized global view, and fits a 5-fold
cross-validated logistic regression on

  patch_embed_max  max over views and tokens of the patch embeddings
  layer_mid_max    the same after the first half of the layers
  layer_last_max   the same after all layers
  pooled_max       max over windows of the expert's image feature
  global_pooled    the image feature of the global view alone

and prints the probe's AUROC for `--label`. If even the native-resolution
windows give chance AUROC, no head trained on that expert can find the
finding, whatever the views: the limit is the expert, not focal sampling.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from medbridge_jax import experts
from medbridge_jax.data import images
from medbridge_jax.data import synthetic
from medbridge_jax.model import focal_sampling


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--expert", required=True)
  parser.add_argument("--root", required=True)
  parser.add_argument("--label", default="Lung Lesion")
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--overlap", type=float, default=0.25)
  args = parser.parse_args()

  index = synthetic.read(args.root, "valid")
  column = index.labels[:, index.label_names.index(args.label)]
  rows = np.flatnonzero(~np.isnan(column))[:args.images]
  expert = experts.load(args.expert)
  side, tower = expert.image_size, expert.vision
  variables = {"params": expert.params["vision"]}
  half = tower.num_layers // 2
  stored = 256
  windows = focal_sampling.sliding_windows(stored, stored, side, args.overlap)

  @jax.jit
  def features(pixels):
    t0 = tower.apply(variables, pixels, method=tower.embed)
    t1 = tower.apply(variables, t0, 0, half, method=tower.encode)
    t2 = tower.apply(variables, t1, half, tower.num_layers, method=tower.encode)
    pooled = tower.apply(variables, t2, method=tower.pool)
    k = tower.num_prefix_tokens
    return (t0[:, k:].max((0, 1)), t1[:, k:].max((0, 1)),
            t2[:, k:].max((0, 1)), pooled.max(0), pooled[0])

  names = ("patch_embed_max", "layer_mid_max", "layer_last_max", "pooled_max",
           "global_pooled")
  table = {n: [] for n in names}
  for r in rows:
    image = images.read_image(f"{args.root}/{index.paths[r]}", stored)
    image = jnp.asarray(image, jnp.float32) / 255.0
    crops = [image[y:y + side, x:x + side] for y, x in windows]
    global_view = jax.image.resize(image, (side, side), "linear",
                                   antialias=True)
    views = jnp.stack([global_view] + crops)[..., None]
    out = features(expert.normalize_pixels(views))
    for n, v in zip(names, out):
      table[n].append(np.asarray(v))

  y = column[rows]
  print(f"{args.label}: {len(rows)} images, {int(y.sum())} positive; "
        f"expert {expert.name}")
  for n in names:
    x = np.stack(table[n])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    p = cross_val_predict(LogisticRegression(C=0.1, max_iter=2000), x, y,
                          cv=5, method="predict_proba")[:, 1]
    print(f"  {n:16s} probe AUROC {roc_auc_score(y, p):.3f}")


if __name__ == "__main__":
  main()
