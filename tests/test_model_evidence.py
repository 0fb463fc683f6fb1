"""Evidence maps (`model.evidence`) on tiny random experts.

Experts as in test_model_medbridge: a CLIP-like (width 32, 2 layers, 32 px)
and a SigLIP-like (width 48, 1 layer, 24 px), patch 8, written as Hugging
Face folders and loaded as real checkpoints are. Every reference here is
computed another way: numpy attention from the layer's params, a numpy
bilinear upsampling and window loop, gates and expert logits from `aux`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.model import evidence
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import medbridge
from medbridge_jax.model import query_encoder
from tests import tiny_run

LABELS = ("effusion", "nodule", "pneumothorax")
SPECS = ("clip:width=32,layers=2,heads=2,patch=8,image=32,text_layers=1",
         "siglip:width=48,layers=1,heads=4,patch=8,image=24,text_layers=1")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
  return tiny_run.random_experts_in(tmp_path_factory.mktemp("experts"), SPECS)


def config(side, **model):
  c = default_config.get_default()
  c.data.image_size = side
  c.model.head.text_init = False
  c.model.focal.num_local = 2
  c.model.queries.inject_layer = -1
  for key, value in model.items():
    node = c.model
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def noisy(params, seed=0, scale=0.3):
  """Every param plus noise: zero-initialised fusion outputs and heads
  would otherwise make fusion the identity and every logit 0."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])


def built(experts, side, seed=0, **model):
  model_ = medbridge.build(config(side, **model), experts, LABELS)
  params = medbridge.init_params(model_, jax.random.key(seed), experts, side)
  trained = noisy({k: v for k, v in params.items()}, seed)
  # Keep the loaded towers as they are; perturb what training would move.
  for k in range(len(experts)):
    trained[f"expert_{k}"]["tower"] = params[f"expert_{k}"]["tower"]
  return model_, trained


def maps_fn(model):
  return jax.jit(lambda p, x: evidence.maps(model, p, x))


def images(n, side, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, side, side))


# ---- The sown attention ------------------------------------------------------


def _layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _reference_attention(layer, x, e, heads, eps):
  """numpy: softmax over image keys of q(extra) . k(image) / sqrt(h),
  averaged over heads and extra tokens, from the layer's own params."""
  x, e = np.asarray(x, np.float64), np.asarray(e, np.float64)
  a = layer["attn"]
  q = _layer_norm(e, layer["norm1"], eps) @ a["query"]["kernel"] + a[
      "query"]["bias"]
  k = _layer_norm(x, layer["norm1"], eps) @ a["key"]["kernel"] + a["key"][
      "bias"]
  b, nq, d = q.shape
  h = d // heads
  q = q.reshape(b, nq, heads, h)
  k = k.reshape(b, -1, heads, h)
  out = np.zeros((b, k.shape[1]))
  for bi in range(b):
    for n in range(heads):
      for qi in range(nq):
        s = k[bi, :, n] @ q[bi, qi, n] / np.sqrt(h)
        p = np.exp(s - s.max())
        out[bi] += p / p.sum()
  return out / (heads * nq)


def test_sown_attention_is_softmax_over_image_keys(experts):
  e = experts[0]  # CLIP-like: class token + 16 patches, 2 layers.
  tower, c = e.vision, e.vision.config
  params = jax.tree.map(np.asarray, e.params["vision"])
  pixels = e.normalize_pixels(images(3, 32, seed=1)[..., None])
  v = {"params": params}
  x = tower.apply(v, pixels, method=tower.embed)
  extra = jax.random.normal(jax.random.key(2), (3, 5, c.hidden_size))
  _, state = tower.apply(v, x, extra, 0, 2, method=tower.encode_with_extra,
                         mutable=["intermediates"])
  sown = state["intermediates"]
  for i in range(2):
    got = np.asarray(sown[f"layers_{i}"]["query_attention"][0])
    assert got.shape == (3, 17)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    want = _reference_attention(params[f"layers_{i}"], x, extra,
                                c.num_heads, c.eps)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # The next layer's inputs: this layer's outputs, both streams.
    x, extra = tower.apply(v, x, extra, i, i + 1,
                           method=tower.encode_with_extra)


# ---- Painting ----------------------------------------------------------------


def _np_upsample(grid, size):
  """Bilinear, pixel centres aligned, edges clamped (numpy, per axis)."""
  g = grid.shape[-1]
  src = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, g - 1)
  f = src - lo
  rows = grid[..., lo, :] * (1 - f)[:, None] + grid[..., hi, :] * f[:, None]
  return rows[..., lo] * (1 - f) + rows[..., hi] * f


def _np_paint(weights, attention, corners, crop, height, width):
  b, n, num_labels = weights.shape
  total = np.zeros((b, num_labels, height, width))
  count = np.zeros((height, width))
  for i, (r, c) in enumerate(corners):
    a = _np_upsample(attention[:, i].astype(np.float64), crop)
    a = a / a.mean(axis=(-2, -1), keepdims=True)
    total[:, :, r:r + crop, c:c + crop] += (
        weights[:, i, :, None, None] * a[:, None])
    count[r:r + crop, c:c + crop] += 1
  return total / count


def test_paint_matches_a_numpy_window_loop():
  rng = np.random.default_rng(0)
  height, width, crop = 40, 56, 24  # Not square, crop != grid * patch.
  corners = focal_sampling.sliding_windows(height, width, crop, 0.25)
  n = len(corners)
  weights = rng.uniform(size=(2, n, 3)).astype(np.float32)
  attention = rng.uniform(0.01, 1.0, size=(2, n, 4, 4)).astype(np.float32)
  got = jax.jit(lambda w, a: evidence.paint(
      w, a, corners.tolist(), crop, height, width))(weights, attention)
  assert got.shape == (2, 3, height, width)
  want = _np_paint(weights, attention, corners.tolist(), crop, height, width)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- The whole model ---------------------------------------------------------


def test_peak_lands_in_the_window_with_the_finding(experts):
  """One expert, fusion off, disjoint windows (after the global view);
  the head is set to read the direction from a dark window's tokens to the
  bright one's, so by construction only the window with the bright square
  is sure."""
  side, crop = 96, 32  # 3 x 3 windows of the CLIP-like expert.
  model, params = built(experts[:1], side, **{
      "fusion.enabled": False, "focal.eval_overlap": 0.0})
  x = np.zeros((2, side, side), np.float32)
  x[0, 44:52, 70:78] = 1.0  # Window (row 1, col 2).
  x[1, 12:20, 38:46] = 1.0  # Window (row 0, col 1), same place.
  x = jnp.asarray(x)
  # Each view's query-encoder tokens, read by flax itself.
  _, state = model.apply(
      {"params": params}, x, train=False, mutable=["intermediates"],
      capture_intermediates=lambda m, _: isinstance(
          m, query_encoder.QueryEncoder))
  tokens = np.asarray(
      state["intermediates"]["expert_0"]["encoder"]["__call__"][0])
  tokens = tokens.reshape(2, 10, *tokens.shape[1:])[:, 1:]  # Windows.

  def unit(t):
    return t / np.sqrt((t ** 2).mean(-1, keepdims=True) + 1e-6)

  bright = {0: 5, 1: 1}  # Image -> window index (row-major 3 x 3).
  dark, light = unit(tokens[0, 0]), unit(tokens[0, 5])
  assert np.allclose(unit(tokens[1, 0]), dark, atol=1e-5)
  assert np.allclose(unit(tokens[1, 1]), light, atol=1e-5)
  direction = light - dark  # (T, P)
  gap = float((direction ** 2).sum())
  head = params["expert_0"]["head"]
  scale = 40.0 / gap  # Bright window logit +20, dark ones -20.
  kernel = np.repeat((scale * direction)[:, :, None], 3, axis=2)
  bias = -20.0 - scale * float((dark * direction).sum())
  params["expert_0"]["head"] = {
      "kernel": jnp.asarray(kernel, head["kernel"].dtype),
      "bias": jnp.full(head["bias"].shape, bias, head["bias"].dtype)}
  maps, info = maps_fn(model)(params, x)
  assert maps.shape == (2, 3, side, side)
  # The windows' attention (the last layer's; class token dropped) and
  # evidence, painted by the numpy loop.
  rows = state["intermediates"]["expert_0"]["tower"]["layers_1"][
      "query_attention"][0]
  grids = np.asarray(rows)[:, 1:].reshape(2, 10, 4, 4)[:, 1:]
  logits = np.asarray(info["view_logits"][0], np.float64)[:, 1:]
  corners = focal_sampling.sliding_windows(side, side, 32, 0.0).tolist()
  want = _np_paint(1 / (1 + np.exp(-logits)), grids, corners, 32, side, side)
  np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-6)
  for b, w in bright.items():
    assert int(np.argmax(info["view_logits"][0][b, 1:, 0])) == w
    r0, c0 = 32 * (w // 3), 32 * (w % 3)
    for label in range(3):
      r, c = np.unravel_index(np.argmax(maps[b, label]), (side, side))
      assert r0 <= r < r0 + 32 and c0 <= c < c0 + 32, (b, label, r, c)


@pytest.mark.parametrize("fusion_layers", [1, 0])
def test_one_view_evidence_is_the_expert_logit(experts, fusion_layers):
  """With one window and no global view the max over views is that view:
  its own evidence must be the expert's logit (fusion params noisy, so
  reading the tokens before fusion would differ)."""
  model, params = built(experts[:1], 32, **{
      "focal.global_view": False, "fusion.num_layers": fusion_layers})
  x = images(3, 32, seed=4)
  _, info = maps_fn(model)(params, x)
  _, aux = model.apply({"params": params}, x, train=False)
  assert info["view_logits"][0].shape == (3, 1, 3)
  np.testing.assert_allclose(info["view_logits"][0][:, 0],
                             aux["expert_logits"][:, 0], rtol=1e-5,
                             atol=1e-5)


def test_global_only_map(experts):
  """Focal off: each expert paints its global view's attention over the
  whole image times sigmoid of its logit; gates per label mix them."""
  side = 40
  model, params = built(experts, side, **{
      "focal.enabled": False, "moe.gating": "per_label"})
  x = images(2, side, seed=5)
  maps, info = maps_fn(model)(params, x)
  (logits, aux), state = model.apply({"params": params}, x, train=False,
                                     mutable=["intermediates"])
  gates = np.asarray(aux["gates"])
  assert gates.shape == (2, 2, 3)
  sure = 1 / (1 + np.exp(-np.asarray(aux["expert_logits"], np.float64)))
  # Each expert's map has mean 1 times its evidence, so the mix has mean
  # sum_k gate * sigmoid(expert logit).
  np.testing.assert_allclose(np.asarray(maps).mean(axis=(-2, -1)),
                             (gates * sure).sum(1), rtol=1e-5)
  want = np.zeros((2, 3, side, side))
  for k, e in enumerate(experts):
    c = e.vision.config
    t1 = query_encoder.resolve_layer(-1, c.num_layers)
    rows = np.mean([state["intermediates"][f"expert_{k}"]["tower"][
        f"layers_{i}"]["query_attention"][0]
                    for i in range(t1, c.num_layers)], axis=0)
    g = e.image_size // c.patch_size
    grid = rows[:, c.num_prefix_tokens:].reshape(2, g, g)
    full = _np_upsample(grid.astype(np.float64), side)
    full /= full.mean(axis=(-2, -1), keepdims=True)
    want += (gates[:, k, :, None, None] * sure[:, k, :, None, None]
             * full[:, None])
  np.testing.assert_allclose(maps, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(info["logits"], logits, rtol=1e-5, atol=1e-5)


def test_eight_devices_agree_with_one_and_repeat(experts):
  side = 64
  model, params = built(experts, side)
  x8 = jax.random.randint(jax.random.key(6), (8, side, side), 0, 256,
                          jnp.int32).astype(jnp.uint8)
  fn = maps_fn(model)
  single, info = fn(params, x8)
  again, _ = fn(params, x8)
  np.testing.assert_array_equal(single, again)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded, info8 = jax.jit(lambda p, x: evidence.maps(model, p, x),
                           in_shardings=(repl, data))(
                               jax.device_put(params, repl),
                               jax.device_put(x8, data))
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info8["logits"], info["logits"], rtol=1e-5,
                             atol=1e-5)
  # Something was painted: the maps differ between labels and images.
  assert np.ptp(np.asarray(single)) > 0


def test_evaluation_never_traces_the_evidence_code(experts, monkeypatch):
  """Without "intermediates" the evaluation step is the one it was: the
  evidence code is not even traced (so its compiled program, FLOPs and
  logits are the same bit for bit); with them, the logits agree."""
  side = 64
  model, params = built(experts, side)
  x = images(4, side, seed=7)
  _, info = maps_fn(model)(params, x)

  def boom(*args, **kwargs):
    raise AssertionError("evidence code traced without intermediates")

  monkeypatch.setattr(layers, "image_attention", boom)
  monkeypatch.setattr(medbridge.ExpertBranch, "_fuse_and_sow_views", boom)
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  logits, aux = plain(params, x)
  # Another program (it also returns the maps): XLA may round differently.
  np.testing.assert_allclose(info["logits"], logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(info["gates"], aux["gates"], rtol=1e-6,
                             atol=1e-7)
  # The monkeypatch bites where the evidence code runs.
  with pytest.raises(AssertionError, match="traced"):
    evidence.maps(model, params, x)


def test_refuses_models_whose_queries_cannot_be_read(experts):
  model, params = built(experts[:1], 32, **{"queries.mode": "joint"})
  with pytest.raises(UserError, match="non_destructive"):
    evidence.maps(model, params, images(1, 32))
  model, params = built(experts[:1], 32, **{"queries.enabled": False})
  with pytest.raises(UserError, match="query tokens"):
    evidence.maps(model, params, images(1, 32))
