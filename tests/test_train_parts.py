"""Mesh, shardings, multi-host detection and the optimizer schedule."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from medbridge_jax import errors, optim, sharding
from medbridge_jax import default_config


def test_mesh_and_batch_sharding():
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1)))
  assert mesh.shape == {"data": 8}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  x = sharding.to_global(np.arange(32.0).reshape(16, 2), mesh)
  assert x.sharding == sharding.batch_sharding(mesh)
  # Auto axes: a contraction over the sharded dimension needs no annotation.
  assert float(jax.jit(lambda a: (a.T @ a).sum())(x)) == pytest.approx(
      float((np.arange(32.0).reshape(16, 2).T @ np.arange(32.0).reshape(16, 2)
             ).sum()))
  assert sharding.make_mesh(ml_collections.ConfigDict(dict(data=2))).size == 2
  with pytest.raises(errors.UserError, match="config.mesh.data=9"):
    sharding.make_mesh(ml_collections.ConfigDict(dict(data=9)))
  with pytest.raises(errors.UserError, match="not divisible by the 8 devices"):
    sharding.check_batch_size(12, mesh, "config.train.batch_size")


@pytest.mark.parametrize("env,want", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"MEDBRIDGE_MULTIHOST": "1"}, True),
    ({"MEDBRIDGE_MULTIHOST": "0", "SLURM_NTASKS": "4"}, False)])
def test_multihost_detection(env, want):
  assert sharding.multihost_requested(env) == want
  if not want:
    assert not sharding.maybe_initialize_distributed(env)


def test_schedule_warmup_then_cosine():
  t = default_config.get_default().train
  t.steps, t.warmup_steps, t.lr = 100, 10, 1.0
  s = optim.schedule(t)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(55)) == pytest.approx(0.5, abs=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
  t.warmup_steps = 100
  with pytest.raises(errors.UserError, match="warmup_steps"):
    optim.schedule(t)


def test_optimizer_clips_and_skips_decay_of_vectors():
  t = default_config.get_default().train
  t.steps, t.warmup_steps, t.lr, t.grad_clip = 10, 0, 0.1, 1.0
  params = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
  tx = optim.make(t)
  state = tx.init(params)
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  # Zero gradient: only weight decay moves the matrix, never the bias.
  assert np.all(np.asarray(updates["w"]) < 0)
  assert np.all(np.asarray(updates["b"]) == 0)
  big = jax.tree.map(lambda p: 1e6 * np.ones_like(p), params)
  clipped, _ = optax.clip_by_global_norm(1.0).update(big, None)
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


class _Toy:
  """A linear 'model' with MedBridge's calling convention."""

  def apply(self, variables, images, *, train, rngs):
    del train, rngs
    p = variables["params"]
    x = images.reshape(images.shape[0], -1)
    return x @ p["head"]["w"] * p["frozen"]["scale"], {}


def _toy_step(accum):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from medbridge_jax import train_step  # pylint: disable=g-import-not-at-top
  c = default_config.get_default()
  c.train.grad_accum = accum
  c.train.steps, c.train.warmup_steps, c.train.lr = 10, 0, 0.1
  mesh = sharding.make_mesh(c.mesh)
  tx = optim.make(c.train)
  step = jax.jit(train_step.make_train_step(_Toy(), tx, optim.schedule(c.train), c,
                                       mesh), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  trainable = {"head": {"w": jnp.asarray(rng.normal(size=(12, 3)),
                                         jnp.float32)}}
  frozen = {"frozen": {"scale": jnp.float32(0.5)}}
  state = {"step": jnp.int32(0), "params": trainable,
           "opt_state": tx.init(trainable)}
  batch = sharding.to_global({
      "image": rng.integers(0, 255, (16, 3, 4)).astype(np.uint8),
      "targets": (rng.random((16, 3)) < 0.5).astype(np.float32),
      "mask": np.ones((16, 3), np.float32)}, mesh)
  return step(state, frozen, batch, None)


def test_train_step_accumulation_matches_one_batch():
  (s1, m1), (s2, m2), (s4, m4) = _toy_step(1), _toy_step(2), _toy_step(4)
  assert int(s1["step"]) == 1
  for s, m in ((s2, m2), (s4, m4)):
    np.testing.assert_allclose(s["params"]["head"]["w"],
                               s1["params"]["head"]["w"], atol=1e-6)
    assert float(m["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(float(m1["grad_norm"]),
                                                  rel=1e-5)
  assert float(m1["lr"]) == pytest.approx(0.1)
