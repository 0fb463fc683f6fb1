"""Losses against hand-written numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax.errors import UserError
from medbridge_jax.model import losses


def cfg(**kw):
  c = default_config.get_default().loss
  with c.unlocked():
    c.update(kw)
  return c


def data(seed=0, b=6, l=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 3, (b, l)).astype(np.float32)
  targets = (rng.random((b, l)) < 0.4).astype(np.float32)
  mask = (rng.random((b, l)) < 0.7).astype(np.float32)
  return logits, targets, mask


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def ref_bce(x, y):
  p = sigmoid(x)
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def ref_asl(x, y, gp, gn, clip):
  p = sigmoid(x)
  pm = np.maximum(p - clip, 0)
  return -(y * (1 - p) ** gp * np.log(p)
           + (1 - y) * pm ** gn * np.log(1 - pm))


def test_bce_masked_mean():
  x, y, m = data()
  got = losses.loss(x, y, m, cfg(kind="bce"))
  want = (ref_bce(x, y) * m).sum() / m.sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_asymmetric_matches_reference():
  x, y, m = data(1)
  c = cfg(kind="asymmetric", gamma_pos=1.0, gamma_neg=4.0, clip=0.05)
  got = losses.loss(x, y, m, c)
  want = (ref_asl(x, y, 1.0, 4.0, 0.05) * m).sum() / m.sum()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # With no focusing and no clip it is plain BCE.
  c = cfg(kind="asymmetric", gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
  np.testing.assert_allclose(losses.loss(x, y, m, c),
                             losses.loss(x, y, m, cfg(kind="bce")), rtol=1e-6)


def test_balanced_class_weights_and_weighted_loss():
  x, y, m = data(2, b=40, l=3)
  w = losses.balanced_class_weights(y, m)
  for j in range(3):
    known = m[:, j] > 0
    n_pos = (y[known, j] == 1).sum()
    n_neg = (y[known, j] == 0).sum()
    n = n_pos + n_neg
    np.testing.assert_allclose(w[:, j], [n / (2 * n_neg), n / (2 * n_pos)],
                               rtol=1e-6)
  got = losses.loss(x, y, m, cfg(kind="bce"), w)
  per = ref_bce(x, y) * np.where(y > 0, w[1], w[0])
  np.testing.assert_allclose(got, (per * m).sum() / m.sum(), rtol=1e-5)
  c = cfg(class_weights="balanced")
  np.testing.assert_allclose(losses.class_weights_from_config(c, y, m), w)
  assert losses.class_weights_from_config(cfg(), y, m) is None


def test_unknown_targets_never_leak():
  x, y, m = data(3)
  y_nan = np.where(m > 0, y, np.nan).astype(np.float32)
  for kind in ("bce", "asymmetric"):
    c = cfg(kind=kind)
    a = losses.loss(x, y, m, c)
    b, g = jax.value_and_grad(lambda z: losses.loss(z, y_nan, m, c))(x)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.all(np.isfinite(g))
    assert np.all(np.asarray(g)[m == 0] == 0)
  # No known entry at all: 0, not nan.
  assert losses.loss(x, y, np.zeros_like(m), cfg()) == 0.0


def test_total_against_reference_and_its_parts_add_up():
  x, y, m = data(4, b=8)
  m[0::2] = 0.0  # part 0 (even rows) has one known label, part 1 many
  m[2, 1] = 1.0
  w = np.asarray([[0.5, 1.0, 2.0, 0.7, 1.3], [3.0, 0.2, 1.5, 1.1, 0.9]],
                 np.float32)
  c = default_config.get_default()
  c.loss.update(kind="asymmetric", gamma_pos=1.0, gamma_neg=2.0, clip=0.05)
  c.model.moe.balance_loss = 0.5
  per = ref_asl(x, y, 1.0, 2.0, 0.05) * np.where(y > 0, w[1], w[0]) * m
  want = per.sum() / m.sum()
  np.testing.assert_allclose(
      losses.masked_sum(x, y, m, c.loss, w), per.sum(), rtol=1e-5)
  value, metrics = losses.total(x, {"balance_loss": jnp.float32(1.2)}, y, m,
                                c, w)
  np.testing.assert_allclose(metrics["label_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(value, want + 0.5 * 1.2, rtol=1e-5)

  # Two parts over the whole batch's count: label losses and their
  # gradients add up to the whole's; balance losses average by share.
  known = losses.known_count(m)

  def parts(z):
    out = [losses.total(z[i::2], {"balance_loss": jnp.float32(b)}, y[i::2],
                        m[i::2], c, w, known=known, share=0.5)
           for i, b in ((0, 1.0), (1, 1.6))]
    return sum(o[0] for o in out), [o[1] for o in out]

  (value, metrics), grad = jax.value_and_grad(parts, has_aux=True)(x)
  np.testing.assert_allclose(
      sum(mt["label_loss"] for mt in metrics), want, rtol=1e-5)
  np.testing.assert_allclose(
      sum(mt["balance_loss"] for mt in metrics), 1.3, rtol=1e-6)
  np.testing.assert_allclose(value, want + 0.5 * 1.3, rtol=1e-5)
  whole = jax.grad(lambda z: losses.loss(z, y, m, c.loss, w))(x)
  np.testing.assert_allclose(grad, whole, rtol=1e-5, atol=1e-8)
  assert np.abs(np.asarray(whole)).max() > 0
  # Weight 0: the balance loss is reported, not added.
  c.model.moe.balance_loss = 0.0
  value, metrics = losses.total(x, {"balance_loss": jnp.float32(1.2)}, y, m,
                                c, w)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert float(metrics["balance_loss"]) == pytest.approx(1.2)


def test_unknown_kind_is_a_user_error():
  x, y, m = data()
  with pytest.raises(UserError, match="loss.kind"):
    losses.loss(x, y, m, cfg(kind="hinge"))
  with pytest.raises(UserError, match="class_weights"):
    losses.class_weights_from_config(cfg(class_weights="sqrt"), y, m)
