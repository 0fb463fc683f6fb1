"""Mesh, shardings, multi-host detection and the optimizer schedule."""

import jax
import ml_collections
import numpy as np
from flax import traverse_util
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


def adamw_reference(grads, params, lrs, wd, decay, clip, b1=0.9, b2=0.999,
                    eps=1e-8):
  """Updates of clip -> AdamW written out in numpy, step by step."""
  mu = {k: 0.0 for k in params}
  nu = {k: 0.0 for k in params}
  out = []
  for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
    norm = np.sqrt(sum(np.sum(np.square(v)) for v in g.values()))
    g = {k: v * min(1.0, clip / norm) for k, v in g.items()}
    upd = {}
    for k in params:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
      adam = (mu[k] / (1 - b1 ** t)) / (np.sqrt(nu[k] / (1 - b2 ** t)) + eps)
      upd[k] = -lr * (adam + (wd * params[k] if decay[k] else 0.0))
    out.append(upd)
    params = {k: params[k] + upd[k] for k in params}
  return out


def test_optimizer_is_clipped_adamw_decaying_by_rule():
  t = default_config.get_default().train
  t.steps, t.warmup_steps, t.lr, t.grad_clip, t.weight_decay = (
      10, 0, 0.1, 1.0, 0.5)
  rng = np.random.default_rng(0)
  names = {"gate/logits/kernel": (3, 2), "gate/logits/bias": (2,),
           "expert_0/encoder/queries": (2, 3)}
  params = {k: rng.normal(size=s).astype(np.float32)
            for k, s in names.items()}
  # A first gradient far above the clip, then a small one: Adam is scale
  # invariant per step, so only the clip changes how the two compare.
  grads = [{k: 50.0 * rng.normal(size=v.shape).astype(np.float32)
            for k, v in params.items()},
           {k: 0.1 * rng.normal(size=v.shape).astype(np.float32)
            for k, v in params.items()}]
  decay = {k: k == "gate/logits/kernel" for k in params}
  lrs = [float(optim.schedule(t)(i)) for i in range(2)]
  assert lrs[0] == pytest.approx(0.1) and lrs[1] < 0.1
  want = adamw_reference(grads, params, lrs, 0.5, decay, clip=1.0)
  unflat = lambda d: traverse_util.unflatten_dict(d, sep="/")
  tx = optim.make(t)
  state, p = tx.init(unflat(params)), unflat(params)
  for g, w in zip(grads, want):
    updates, state = tx.update(unflat(g), state, p)
    got = traverse_util.flatten_dict(updates, sep="/")
    for k in params:
      np.testing.assert_allclose(got[k], w[k], rtol=2e-5, atol=1e-7,
                                 err_msg=k)
    p = optax.apply_updates(p, updates)
