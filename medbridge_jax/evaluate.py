"""Evaluation: probabilities over a whole split, then clinical metrics.

MedBridge and the zero-shot baseline are evaluated the same way: a jitted
function maps a global uint8 image batch (B, H, W) to probabilities (B, L);
`predict` runs it over a split with the data pipeline's evaluation batches
(ordered, the last one padded) and gathers every row on every host.
`localise` scores the model's evidence maps against a split's boxes.
"""

from typing import Callable, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from medbridge_jax import localisation
from medbridge_jax import metrics
from medbridge_jax import report
from medbridge_jax import sharding
from medbridge_jax.data import labels
from medbridge_jax.data import pipeline
from medbridge_jax.experts import expert as expert_lib
from medbridge_jax.experts import zero_shot
from medbridge_jax.model import evidence
from medbridge_jax.model import partition

ImageFn = Callable[[jax.Array], jax.Array]  # uint8 (B, H, W) -> probs (B, L)


def predict(fn: ImageFn, eval_set: labels.LabelledSplit, batch_size: int, mesh,
            data_config) -> tuple[np.ndarray, np.ndarray]:
  """fn's probabilities for every row of the split, on every host.

  Returns:
    (probs (N, L) float64, seen (N,) bool); a row is unseen only when its
    image was skipped as unreadable (config.data.on_bad_image="skip").
  """
  n, num_labels = eval_set.targets.shape
  probs = np.zeros((n, num_labels))
  seen = np.zeros(n, bool)
  batches = _batches(eval_set.index, eval_set.available, batch_size,
                     data_config)
  for p, rows in _gathered(fn, batches, mesh):
    keep = rows >= 0
    probs[rows[keep]] = p[keep]
    seen[rows[keep]] = True
  if batches.skipped:
    logging.warning("%s: %d unreadable image(s) skipped, e.g. %s",
                    eval_set.name, batches.skipped, batches.skipped_paths[0])
  return probs, seen


def _batches(index, available, batch_size: int, data_config):
  """This host's evaluation batches of `index` (global `batch_size`)."""
  return pipeline.eval_batches(
      index, batch_size=sharding.host_batch_size(batch_size),
      available=available, **pipeline.options_from_config(data_config))


def _gathered(fn: ImageFn, batches, mesh, with_images: bool = False):
  """Per evaluation batch, as host numpy arrays gathered from every host:
  (fn(images), [images,] rows); padding rows are -1."""
  for batch in batches:
    batch = sharding.to_global({"image": batch["image"], "row": batch["row"]},
                               mesh)
    out = ((fn(batch["image"]),) + ((batch["image"],) if with_images else ())
           + (batch["row"],))
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    yield tuple(np.asarray(x) for x in jax.device_get(out))


def make_model_fn(model) -> Callable[..., jax.Array]:
  """Jitted (trainable, frozen, images) -> MedBridge probabilities (eval mode).

  Built once per run and called with the current parameters, so periodic
  evaluations reuse one compilation.
  """

  @jax.jit
  def fn(trainable, frozen, images):
    params = partition.merge(trainable, frozen)
    logits, _ = model.apply({"params": params}, images, train=False)
    return jax.nn.sigmoid(logits.astype(jnp.float32))

  return fn


def make_zero_shot_fn(expert, prompt_embeddings) -> ImageFn:
  """The frozen expert's zero-shot probabilities (before any adaptation).

  The whole stored image is resized (antialiased) to the expert's input side,
  as a plain CLIP/SigLIP user would feed it.
  """
  side = int(expert.image_size)

  @jax.jit
  def fn(params, prompts, images):
    x = expert_lib.unit_range(images)
    x = jax.image.resize(x, (x.shape[0], side, side), "linear", antialias=True)
    pixels = expert.normalize_pixels(x[..., None])
    feats = expert.vision.apply({"params": params}, pixels)[0]
    return zero_shot.probabilities(feats, prompts, expert)

  return lambda images: fn(expert.params["vision"], prompt_embeddings, images)


def make_evidence_fn(model) -> Callable[..., jax.Array]:
  """Jitted (trainable, frozen, images) -> evidence maps (B, L, H, W)
  (`model.evidence`), built once like `make_model_fn`."""

  @jax.jit
  def fn(trainable, frozen, images):
    params = partition.merge(trainable, frozen)
    return evidence.maps(model, params, images)[0]

  return fn


def evidence_rows(fn: ImageFn, eval_set: labels.LabelledSplit,
                  rows: Sequence[int], *, mesh, data_config
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (n, H, W), evidence maps (n, L, H, W)) of the split's
  `rows`, in that order, through `fn` (`make_evidence_fn`)."""
  index = eval_set.index.select(rows)
  n = len(rows)
  images = np.zeros((n,) + (int(data_config.image_size),) * 2, np.uint8)
  maps = None
  # One padded batch, a multiple of the devices.
  batch_size = -(-n // jax.device_count()) * jax.device_count()
  batches = _batches(index, eval_set.available, batch_size, data_config)
  for m, x, r in _gathered(fn, batches, mesh, with_images=True):
    keep = r >= 0
    if maps is None:
      maps = np.zeros((n,) + m.shape[1:], np.float32)
    maps[r[keep]], images[r[keep]] = m[keep], x[keep]
  return images, maps


def localise(fn: ImageFn, eval_set: labels.LabelledSplit, found_boxes, *,
             batch_size: int, mesh, data_config, bootstrap: int = 0,
             seed: int = 0) -> Optional[dict]:
  """Pointing game and IoU hit of `fn`'s evidence maps against the split's
  boxes (`localisation.summarize`'s dict), or None when no image of the
  split has a box of a positive label.

  Only the images with boxes are evaluated: maps are large, and the others
  have nothing to score.
  """
  gt = localisation.boxes_for(eval_set.index, found_boxes,
                              list(eval_set.index.label_names),
                              int(data_config.image_size))
  rows = gt.scored_rows()
  if not rows:
    return None
  index = eval_set.index.select(rows)
  acc = localisation.Accumulator(gt.select(rows))
  batches = _batches(index, eval_set.available, batch_size, data_config)
  for maps, batch_rows in _gathered(fn, batches, mesh):
    acc.add(batch_rows, maps)
  return acc.summary(np.asarray(index.patients, dtype=object),
                     bootstrap=bootstrap, seed=seed)


def evaluate(fn: ImageFn, eval_set: labels.LabelledSplit, *, batch_size: int,
             mesh, data_config, label_names: Sequence[str],
             mean_labels: Sequence[str] = (), bootstrap: int = 0,
             seed: int = 0) -> report.Result:
  """Predicts the split and computes every metric.

  Intervals resample the split's patients (a patient's images together).
  """
  probs, seen = predict(fn, eval_set, batch_size, mesh, data_config)
  probs, targets, mask = (probs[seen], eval_set.targets[seen],
                          eval_set.mask[seen])
  groups = np.asarray(eval_set.index.patients, dtype=object)[seen]
  summary = metrics.summarize(probs, targets, mask, label_names,
                              mean_labels=mean_labels, bootstrap=bootstrap,
                              seed=seed, groups=groups)
  return report.Result(summary, probs, targets, mask, groups)


def record(step: int, set_name: str, summary: metrics.Summary, **extra
           ) -> dict:
  """One metrics.jsonl object: step, mean AUROC and per-label AUROC."""
  j = summary.to_json()
  out = dict(step=int(step), set=set_name, mean_auroc=j["mean_auroc"],
             mean_auroc_ci=j["mean_auroc_ci"], mean_auprc=j["mean_auprc"],
             mean_ece=j["mean_ece"], undefined=j["undefined"],
             ci_unit=j["ci_unit"], num_groups=j["num_groups"],
             auroc={k: v["auroc"] for k, v in j["labels"].items()},
             auprc={k: v["auprc"] for k, v in j["labels"].items()})
  out.update(extra)
  return out
