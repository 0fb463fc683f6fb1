"""The image tower's split execution, extra tokens, dtypes and inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts import positions
from medbridge_jax.experts import vit


def _tower(family, dtype=jnp.float32, **kw):
  cfg = dict(family=family, hidden_size=32, num_layers=3, num_heads=4,
             mlp_dim=64, patch_size=8, image_size=32,
             act="quick_gelu" if family == "clip" else "gelu_pytorch_tanh",
             eps=1e-5, projection_dim=24 if family == "clip" else 0)
  cfg.update(kw)
  return vit.VisionTower(vit.VisionConfig(**cfg), dtype)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def setup(request):
  """(tower, variables, pixels, extra tokens, embedded pixels, features)."""
  tower = _tower(request.param)
  rng = np.random.RandomState(0)
  pixels = jnp.asarray(rng.randn(2, 32, 32, 3), jnp.float32)
  # Random values for every param (LayerNorms and biases too), drawn with
  # numpy: no XLA compile for init.
  shapes = jax.eval_shape(tower.init, jax.random.PRNGKey(1), pixels)
  variables = jax.tree.map(
      lambda a: (0.3 * rng.randn(*a.shape)).astype(np.float32), shapes)
  extra = jnp.asarray(rng.randn(2, 3, 32), jnp.float32)
  tokens, feats = jax.jit(lambda v, x: (
      tower.apply(v, x, method="embed"), tower.apply(v, x)[0]))(
          variables, pixels)
  return tower, variables, pixels, extra, tokens, feats


@functools.lru_cache(maxsize=None)  # One compile per program, not per test.
def _encode(tower, start, end):
  return jax.jit(lambda v, x: tower.apply(v, x, start, end, method="encode"))


@functools.lru_cache(maxsize=None)
def _with_extra(tower, start, end, mode):
  return jax.jit(lambda v, x, e: tower.apply(
      v, x, e, start, end, mode, method="encode_with_extra"))


def test_attributes(setup):
  tower = setup[0]
  assert tower.num_layers == 3 and tower.hidden_size == 32
  assert tower.num_prefix_tokens == (1 if tower.config.family == "clip" else 0)


def test_split_encode_equals_call(setup):
  tower, v, _, _, tokens, feats = setup
  assert tokens.shape == (2, 16 + tower.num_prefix_tokens, 32)

  def split(v, x):
    a = tower.apply(v, x, 0, 2, method="encode")
    a = tower.apply(v, a, 2, 3, method="encode")
    b = tower.apply(v, x, method="encode")  # Defaults: all layers.
    return a, b, tower.apply(v, a, method="pool")

  a, b, pooled = jax.jit(split)(v, tokens)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(pooled, feats, atol=1e-5)


def test_non_destructive_image_stream_is_bit_identical(setup):
  tower, v, _, extra, tokens, _ = setup
  ref = _encode(tower, 1, 3)(v, tokens)
  out, new_extra = _with_extra(tower, 1, 3, "non_destructive")(
      v, tokens, extra)
  assert np.array_equal(np.asarray(out), np.asarray(ref))
  assert new_extra.shape == extra.shape
  assert not np.allclose(new_extra, extra)


def test_extra_tokens_attend_to_image_and_extra(setup):
  """One layer, against a masked joint attention computed independently."""
  tower, v, _, extra, tokens, _ = setup
  c = tower.config
  run = _with_extra(tower, 0, 1, "non_destructive")
  _, got = run(v, tokens, extra)
  s, q = tokens.shape[1], extra.shape[1]
  # Image rows see only image columns; extra rows see everything.
  allowed = np.ones((s + q, s + q), bool)
  allowed[:s, s:] = False
  layer = layers.EncoderLayer(c.hidden_size, c.num_heads, c.mlp_dim, c.act,
                              c.eps)
  both = jax.jit(layer.apply)({"params": v["params"]["layers_0"]},
                              jnp.concatenate([tokens, extra], 1),
                              jnp.asarray(allowed)[None, None])
  np.testing.assert_allclose(got, both[:, s:], atol=1e-5)
  # And the extra tokens really do look at the image.
  _, other = run(v, tokens[::-1], extra)
  assert not np.allclose(other, got, atol=1e-3)


def test_joint_mode_changes_image_tokens(setup):
  tower, v, _, extra, tokens, _ = setup
  ref = _encode(tower, 1, 3)(v, tokens)
  out, e = _with_extra(tower, 1, 3, "joint")(v, tokens, extra)
  assert out.shape == ref.shape and e.shape == extra.shape
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-3
  _, nd_e = _with_extra(tower, 1, 3, "non_destructive")(v, tokens, extra)
  assert np.abs(np.asarray(nd_e) - np.asarray(e)).max() > 1e-3


def test_bad_mode_and_range(setup):
  tower, v, _, extra, tokens, _ = setup
  with pytest.raises(UserError, match="mode"):
    tower.apply(v, tokens, extra, 0, 1, "sideways",
                method="encode_with_extra")
  with pytest.raises(ValueError, match="layer range"):
    tower.apply(v, tokens, 3, 5, method="encode")


def test_bfloat16_close_to_float32(setup):
  tower, v, pixels, extra, _, f32 = setup
  bf = tower.clone(dtype=jnp.bfloat16)
  b16 = jax.jit(lambda v, x: bf.apply(v, x)[0])(v, pixels)
  assert b16.dtype == jnp.bfloat16
  # Params stay float32 whatever the compute dtype.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  f32, b16 = np.asarray(f32), np.asarray(b16, np.float32)
  cos = (f32 * b16).sum(-1) / np.linalg.norm(f32, axis=-1) / np.linalg.norm(
      b16, axis=-1)
  assert cos.min() > 0.995
  assert np.abs(f32 - b16).max() <= 0.05 * np.abs(f32).max()
  tokens = jax.eval_shape(lambda: bf.apply(v, pixels, method="embed"))
  out, e = jax.eval_shape(lambda: bf.apply(
      v, jnp.zeros(tokens.shape, tokens.dtype), extra, 1, 3,
      method="encode_with_extra"))
  assert tokens.dtype == out.dtype == e.dtype == jnp.bfloat16


def test_attention_impl_is_passed_through(setup, monkeypatch):
  tower, v, pixels, _, _, _ = setup
  seen = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **k: seen.append(k["implementation"])
                      or real(*a, **k))
  jax.eval_shape(lambda: tower.clone(attention_impl="xla").apply(v, pixels))
  assert seen and set(seen) == {"xla"}


def test_other_input_sizes_use_resized_positions(setup):
  tower, v = setup[:2]
  pixels = jnp.ones((1, 48, 24, 3))
  tokens = jax.eval_shape(lambda: tower.apply(v, pixels, method="embed"))
  assert tokens.shape == (1, 6 * 3 + tower.num_prefix_tokens, 32)


def test_a_side_off_the_patch_grid_drops_its_remainder(setup):
  """As the references' strided patch conv does (SigLIP So400m: 384 px in
  patches of 14 is a 27x27 grid on the first 378 px)."""
  tower, v = setup[:2]
  pixels = jax.random.normal(jax.random.PRNGKey(3), (1, 38, 35, 3))
  got = tower.apply(v, pixels, method="embed")
  want = tower.apply(v, pixels[:, :32, :32], method="embed")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 32, 32), "NCHW"),
    ((2, 32, 32, 1), "3 channels"),
    ((32, 32, 3), "NHWC"),
    ((2, 6, 32, 3), "at least the patch size"),
])
def test_bad_pixels(setup, shape, match):
  tower, v = setup[:2]
  with pytest.raises(UserError, match=match):
    tower.apply(v, jnp.zeros(shape), method="embed")


def test_bicubic_matrix_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(0)
  table = rng.randn(5, 5, 7).astype(np.float32)
  for new in [(5, 5), (8, 8), (3, 4), (12, 7)]:
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(table.transpose(2, 0, 1))[None], size=new,
        mode="bicubic", align_corners=False)[0].numpy().transpose(1, 2, 0)
    got = positions.resize(jnp.asarray(table.reshape(25, 7)), (5, 5), new)
    np.testing.assert_allclose(np.asarray(got).reshape(*new, 7), ref,
                               atol=1e-5)


@pytest.mark.parametrize("pooling", ["class", "mean", "map"])
def test_pool_tokens_is_each_token_pooled_alone(pooling):
  """A query token through the tower's pooling: for mean pooling over the
  patch tokens of a tower with a class token (timm's and open_clip's
  "avg"), the token itself, as if it were the only patch token."""
  family = "siglip" if pooling == "map" else "clip"
  tower = _tower(family, class_token=pooling != "map", pooling=pooling,
                 use_head=pooling == "map")
  v = tower.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  q = jax.random.normal(jax.random.PRNGKey(1), (3, 32))
  got = tower.apply(v, q, method="pool_tokens")
  assert np.all(np.isfinite(np.asarray(got)))
  if pooling == "mean":
    # A class token in front, then the query as the one patch token.
    seq = jnp.stack([jnp.zeros_like(q), q], axis=1)
  else:
    seq = q[:, None]
  want = tower.apply(v, seq, method="pool")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
