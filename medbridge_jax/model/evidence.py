"""Per-label evidence maps at the stored image's resolution.

Made from what evaluation computes anyway: one `MedBridge.apply` in
evaluation mode that also collects the "intermediates" the model sows,

  query_attention  per injected layer T1..L-1 (`EncoderLayer.with_extra`),
                   per view, the query tokens' attention over the view's
                   image keys: softmax(q . k_image / sqrt(h)) renormalised
                   over the image keys (the queries' own keys left out),
                   averaged over heads and queries, (B * n, S);
  view_logits      per expert, the head on each view's own fused tokens
                   before the max over views, (B, N, L) (`ExpertBranch`).

Per expert, each sliding window w (corners from
`focal_sampling.sliding_windows`, as evaluation cuts them) paints

  sigmoid(view_logits[w, l]) * A_w

over its extent in stored pixels, where A_w is the window's attention (the
mean over the injected layers, the prefix tokens (class, registers) dropped,
the patch grid upsampled bilinearly to the window's crop side, which may
differ from the expert's side with `focal.crop_size`) normalised to mean 1
inside the window. The paint is summed over windows and divided, pixel by
pixel, by how many windows cover it. So a pixel's value is the mean, over the
windows that see it, of "how sure this window alone is of label l" times
"how much more than average the queries looked here": where a finding is,
the window that holds it is sure, and its queries looked at it.

The global view is left out when the model has local windows: it sees the
same pixels downsized, and its attention grid is too coarse to localise
anything the windows do not. A global-only model (focal sampling off) paints
its one view's attention, upsampled over the whole image, times its
evidence. Experts are combined with the model's gates (B, K), or per label
(B, K, L) with per-label gating: the maps mix as the logits do.

Everything but the images and params is static (window corners are Python
ints), so `jax.jit(lambda p, x: maps(model, p, x))` compiles once per image
shape. The grid is stretched over the whole window: exact when the expert's
side is a multiple of its patch size (the patch conv drops a remainder).
Needs the query tokens in "non_destructive" mode (the maps read their
attention).
"""

from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medbridge_jax.errors import UserError
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import query_encoder

Array = jax.Array


def check_model(model: Any) -> None:
  """UserError unless `model` is a MedBridge whose queries can be read."""
  settings = getattr(model, "settings", None)
  if not hasattr(model, "experts") or not hasattr(settings, "num_queries"):
    raise UserError(f"evidence maps need a MedBridge model; got "
                    f"{type(model).__name__}")
  if settings.num_queries == 0:
    raise UserError("evidence maps need query tokens "
                    "(model.queries.enabled=True)")
  if settings.query_mode != "non_destructive":
    raise UserError(f"evidence maps need model.queries.mode="
                    f"'non_destructive'; got {settings.query_mode!r}")


def upsample(grid: Array, size: int) -> Array:
  """(..., g, g) -> (..., size, size), bilinear (pixel centres aligned)."""
  shape = grid.shape[:-2] + (size, size)
  return jax.image.resize(grid.astype(jnp.float32), shape, "linear")


def _mean_one(a: Array) -> Array:
  """`a` (..., h, w) scaled to mean 1 over its last two axes."""
  mean = jnp.mean(a, axis=(-2, -1), keepdims=True)
  return a / jnp.maximum(mean, jnp.finfo(jnp.float32).tiny)


def paint(weights: Array, attention: Array, corners: Sequence[Sequence[int]],
          crop: int, height: int, width: int) -> Array:
  """Evidence of n windows painted over (B, L, height, width).

  weights (B, n, L): each window's evidence per label (e.g. sigmoid of its
  logits); attention (B, n, g, g): each window's patch-grid map; corners:
  n static (row, col) top-left corners of `crop`-pixel windows. Each
  window's map is upsampled to `crop`, scaled to mean 1, times its weights;
  a pixel gets the mean over the windows that cover it (0 where none does).
  """
  b, n, num_labels = weights.shape
  if attention.shape[:2] != (b, n) or len(corners) != n:
    raise ValueError(f"{len(corners)} corners, weights {weights.shape} and "
                     f"attention {attention.shape} disagree on the windows")
  local = _mean_one(upsample(attention, crop))  # (B, n, crop, crop)
  total = jnp.zeros((b, num_labels, height, width), jnp.float32)
  count = np.zeros((height, width), np.float32)
  for i, (r, c) in enumerate(corners):
    r, c = int(r), int(c)
    piece = weights[:, i, :, None, None] * local[:, i, None]
    total = total.at[:, :, r:r + crop, c:c + crop].add(piece)
    count[r:r + crop, c:c + crop] += 1.0
  return total / np.maximum(count, 1.0)


def paint_global(weights: Array, attention: Array, height: int,
                 width: int) -> Array:
  """A whole-image view's evidence (B, L) times its (B, g, g) attention,
  upsampled over (height, width) and scaled to mean 1: (B, L, H, W)."""
  shape = attention.shape[:1] + (height, width)
  full = _mean_one(jax.image.resize(attention.astype(jnp.float32), shape,
                                    "linear"))
  return weights[:, :, None, None] * full[:, None]


def _attention_groups(tower_sown: dict, t1: int, num_layers: int) -> list:
  """Per view group (in `view_groups` order), the (rows, S) attention
  averaged over the injected layers t1..num_layers-1."""
  per_layer = [tower_sown[f"layers_{i}"]["query_attention"]
               for i in range(t1, num_layers)]
  return [jnp.mean(jnp.stack(group), axis=0) for group in zip(*per_layer)]


def _grid(rows: Array, batch: int, prefix: int) -> Array:
  """(batch * n, S) attention rows -> (batch, n, g, g) over the patches."""
  patches = rows[:, prefix:]
  g = int(round(patches.shape[-1] ** 0.5))
  if g * g != patches.shape[-1]:
    raise ValueError(f"{patches.shape[-1]} patch tokens are not a square "
                     f"grid")
  return patches.reshape(batch, -1, g, g)


def expert_map(spec: Any, settings: Any, sown: dict, height: int,
               width: int) -> Array:
  """One expert's (B, L, H, W) map from what its branch sowed (`sown`:
  the expert's "intermediates" subtree)."""
  vision = spec.vision
  t1 = query_encoder.resolve_layer(settings.inject_layer, vision.num_layers)
  groups = _attention_groups(sown["tower"], t1, vision.num_layers)
  view_logits = sown["view_logits"][0]  # (B, N, L)
  b = view_logits.shape[0]
  grids = [_grid(g, b, vision.num_prefix_tokens) for g in groups]
  weights = jax.nn.sigmoid(view_logits.astype(jnp.float32))
  first = 1 if settings.global_view else 0
  if settings.num_local == 0:
    return paint_global(weights[:, 0], grids[0][:, 0], height, width)
  # The windows are the last views: the tail of the last group.
  windows = grids[-1][:, grids[-1].shape[1] - (view_logits.shape[1] - first):]
  crop = settings.crop_for(spec.side)
  corners = focal_sampling.sliding_windows(height, width, crop,
                                           settings.eval_overlap)
  return paint(weights[:, first:], windows, corners.tolist(), crop, height,
               width)


def combine(expert_maps: Array, gates: Array) -> Array:
  """(B, K, L, H, W) maps mixed by gates (B, K) or (B, K, L) -> (B, L, H, W)."""
  g = gates.astype(jnp.float32)
  if g.ndim == 2:
    g = g[:, :, None]
  return jnp.einsum("bkl,bklhw->blhw", g, expert_maps)


def maps(model: Any, params: dict, images: Array) -> Tuple[Array, dict]:
  """Per-label evidence maps of `images` under a MedBridge `model`.

  Args:
    model: a `medbridge.MedBridge` with query tokens in "non_destructive"
      mode.
    params: its "params" collection (trainable and frozen merged).
    images: (B, H, W) uint8, or float in [0, 1], as the model takes them.

  Returns:
    (maps (B, L, H, W) float32, info): info holds the evaluation's "logits"
    (B, L) (bit-identical to a plain `model.apply`), "gates", and per expert
    "view_logits" (a K-tuple of (B, N, L)).
  """
  check_model(model)
  if images.ndim != 3:
    raise UserError(f"images must be (batch, height, width); got "
                    f"{images.shape}")
  (logits, aux), state = model.apply({"params": params}, images, train=False,
                                     mutable=["intermediates"])
  sown = state["intermediates"]
  _, height, width = images.shape
  per_expert = [expert_map(spec, model.settings, sown[f"expert_{k}"], height,
                           width) for k, spec in enumerate(model.experts)]
  out = combine(jnp.stack(per_expert, axis=1), aux["gates"])
  info = {"logits": logits, "gates": aux["gates"],
          "view_logits": tuple(sown[f"expert_{k}"]["view_logits"][0]
                               for k in range(len(model.experts)))}
  return out, info
