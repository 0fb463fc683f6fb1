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


def test_total_adds_weighted_balance_loss():
  x, y, m = data(4)
  c = default_config.get_default()
  c.model.moe.balance_loss = 0.5
  value, metrics = losses.total(x, {"balance_loss": jnp.float32(1.2)}, y, m, c)
  np.testing.assert_allclose(value, metrics["label_loss"] + 0.6, rtol=1e-6)


def test_unknown_kind_is_a_user_error():
  x, y, m = data()
  with pytest.raises(UserError, match="loss.kind"):
    losses.loss(x, y, m, cfg(kind="hinge"))
  with pytest.raises(UserError, match="class_weights"):
    losses.class_weights_from_config(cfg(class_weights="sqrt"), y, m)
