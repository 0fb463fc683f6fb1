"""The jitted update (`train_step.make_train_step`) on a tiny real MedBridge.

Two random experts (CLIP width 32 at 32 px, SigLIP width 32 at 24 px, two
layers each) written as Hugging Face folders and loaded as real checkpoints
are; 64 px stored images with 32 px crops. The step is jitted and donated as
`train.py` does it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medbridge_jax import default_config
from medbridge_jax import errors
from medbridge_jax import experts as experts_lib
from medbridge_jax import optim
from medbridge_jax import sharding
from medbridge_jax import train_step
from medbridge_jax.experts import random_experts
from medbridge_jax.experts import zero_shot
from medbridge_jax.model import losses
from medbridge_jax.model import medbridge
from medbridge_jax.model import moe
from medbridge_jax.model import partition

LABELS = ("effusion", "nodule", "pneumothorax")
SIDE = 64
SPECS = ("clip:width=32,layers=2,heads=2,patch=8,image=32,text_layers=1",
         "siglip:width=32,layers=2,heads=2,patch=8,image=24,text_layers=1")


def config(**train):
  c = default_config.get_default()
  c.model.focal.crop_size = 32
  c.model.focal.num_local = 2
  c.model.focal.eval_overlap = 0.0  # 2 x 2 sliding windows.
  c.model.queries.inject_layer = -1
  c.model.moe.gate_hidden = 8
  c.train.steps, c.train.warmup_steps, c.train.lr = 10, 0, 1e-2
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(experts, prompts, host params) shared by the tests."""
  root = tmp_path_factory.mktemp("experts")
  experts = []
  for i, spec in enumerate(SPECS):
    random_experts.write(str(root / f"e{i}"), spec, seed=i)
    experts.append(experts_lib.load(str(root / f"e{i}")))
  prompts = [zero_shot.prompt_embeddings(e, list(LABELS)) for e in experts]
  model = medbridge.build(config(), experts, LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  return experts, prompts, jax.tree.map(np.asarray, params)


def build(setup, c):
  experts, prompts, _ = setup
  return medbridge.build(c, experts, LABELS, prompts)


def batch(n, seed, mask):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, SIDE, SIDE)).astype(np.uint8),
          "targets": (rng.random((n, len(LABELS))) < 0.4).astype(np.float32),
          "mask": mask.astype(np.float32)}


def flat(tree):
  return {partition.path_string(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# -- Frozen towers through the real, donated step. ----------------------------


def test_frozen_towers_stay_bit_identical_and_are_used(setup):
  experts, _, host_params = setup
  c = config()
  model = build(setup, c)
  mesh = sharding.make_mesh(c.mesh)
  replicated = sharding.replicated(mesh)
  trainable, frozen = partition.split(host_params)
  tx = optim.make(c.train)
  state = dict(step=jnp.zeros((), jnp.int32), params=trainable,
               opt_state=tx.init(trainable))
  state = jax.device_put(state, replicated)
  frozen = jax.device_put(frozen, replicated)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=replicated), state)
  step = jax.jit(
      train_step.make_train_step(model, tx, optim.schedule(c.train), c, mesh),
      donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda _: replicated, abstract),
                     replicated))
  first = state["params"]
  for i in range(3):
    b = sharding.to_global(batch(8, i, np.ones((8, len(LABELS)))), mesh)
    state, m = step(state, frozen, b, None)
    assert np.isfinite(float(m["loss"]))
  assert first["gate"]["logits"]["kernel"].is_deleted()  # Donated.

  # The towers after training are the loaded checkpoints, bit for bit, and
  # nothing under a tower is trainable.
  after = flat(partition.merge(state["params"], frozen))
  for k, e in enumerate(experts):
    want = flat(e.params["vision"])
    for path, value in want.items():
      assert np.array_equal(after[f"expert_{k}/tower/{path}"], value), path
  assert not [p for p in flat(state["params"]) if "/tower/" in p]
  # Every trainable parameter moved.
  before = flat(trainable)
  for path, value in flat(state["params"]).items():
    assert not np.array_equal(value, before[path]), path

  # The towers are used: perturbing any one tower parameter changes logits.
  run = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])
  x = jnp.asarray(batch(2, 9, np.ones((2, 3)))["image"], jnp.float32) / 255
  params = flat(partition.merge(state["params"], frozen))
  base = np.asarray(run(unflat(params), x))
  rng = np.random.default_rng(0)
  # Except key biases: q.b is the same for every key, which softmax ignores.
  towers = [p for p in params
            if "/tower/" in p and not p.endswith("/key/bias")]
  assert len(towers) > 60
  for path in towers:
    moved = dict(params)
    moved[path] = params[path] + rng.normal(size=params[path].shape).astype(
        np.float32)
    assert np.abs(np.asarray(run(unflat(moved), x)) - base).max() > 1e-5, path


def unflat(flat_params):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(flat_params, sep="/")


# -- Gradient accumulation equals the full batch. -----------------------------


def capture_grads():
  """An 'optimizer' that keeps the gradient it receives as its state and
  leaves the parameters where they are."""
  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), {"grads": grads}
  return optax.GradientTransformation(
      lambda p: {"grads": jax.tree.map(jnp.zeros_like, p)}, update)


def perturbed_trainable(host_params, seed=1):
  # Zero-initialised fusion outputs would hide the gradients behind them.
  trainable, frozen = partition.split(host_params)
  rng = np.random.default_rng(seed)
  trainable = jax.tree.map(
      lambda p: (p + 0.05 * rng.normal(size=p.shape)).astype(np.float32),
      trainable)
  return trainable, frozen


ACCUM = 4


def uneven_mask(n):
  """Micro-batch i holds rows i, i + 4, ...: 0 known labels in micro-batch
  0, all in 1, one in 2, a random half in 3."""
  m = np.zeros((n, len(LABELS)))
  m[1::ACCUM] = 1
  m[2, 1] = 1
  m[3::ACCUM] = np.random.default_rng(5).random(m[3::ACCUM].shape) < 0.5
  return m


def run_step(setup, c, trainable, frozen, b):
  model = build(setup, c)
  mesh = sharding.make_mesh(c.mesh)
  tx = capture_grads()
  state = dict(step=jnp.zeros((), jnp.int32),
               params=jax.tree.map(jnp.asarray, trainable),
               opt_state=tx.init(trainable))
  step = jax.jit(train_step.make_train_step(
      model, tx, optim.schedule(c.train), c, mesh), donate_argnums=(0,))
  state, m = step(state, frozen, sharding.to_global(b, mesh), WEIGHTS)
  return flat(state["opt_state"]["grads"]), jax.tree.map(float, m)


# Class weights that differ per label and class, as `balanced` gives.
WEIGHTS = jnp.asarray([[0.6, 0.8, 1.1], [2.5, 1.7, 4.0]], jnp.float32)


def accum_config(accum, balance=0.0):
  c = config(grad_accum=accum)
  # Sliding windows in training: the views are a function of the image, so
  # the full batch and its micro-batches see the same crops. Random crops
  # are drawn per micro-batch key and differ (as likely, not identical).
  c.model.focal.train_windows = "sliding"
  c.loss.kind = "asymmetric"
  c.model.moe.balance_loss = balance
  c.mesh.data = 4  # Micro-batches of 4 rows, one per device.
  return c


def assert_close_trees(got, want):
  """The whole gradient within 1e-6 relative (norm), each parameter's
  within 1e-5: float32 rounding differs with the batch's shape (measured
  up to 1.6e-6 on a single parameter); a wrong normalisation is off by
  tens of percent."""
  assert set(got) == set(want)
  # A key bias's exact gradient is 0 (softmax ignores q.b): only rounding
  # noise is left to compare, so it counts in the whole only.
  paths = [p for p in want if not p.endswith("/key/bias")]
  for path in paths:
    err = np.linalg.norm(got[path] - want[path]) / np.linalg.norm(want[path])
    assert err <= 1e-5, (path, err)
  diff = np.sqrt(sum(np.sum((got[p] - want[p]) ** 2) for p in want))
  norm = np.sqrt(sum(np.sum(want[p] ** 2) for p in want))
  assert diff / norm <= 1e-6, diff / norm
  # Every trainable parameter has a gradient to compare.
  assert all(np.abs(want[p]).max() > 0 for p in paths)


def test_accumulation_equals_the_full_batch_with_uneven_masks(setup):
  trainable, frozen = perturbed_trainable(setup[2])
  mask = uneven_mask(16)
  counts = [mask[i::ACCUM].sum() for i in range(ACCUM)]
  assert counts[0] == 0 and len(set(counts)) == ACCUM  # really uneven
  b = batch(16, 0, mask)
  b["targets"][mask == 0] = np.nan  # unknown targets must not leak
  g1, m1 = run_step(setup, accum_config(1), trainable, frozen, b)
  g4, m4 = run_step(setup, accum_config(ACCUM), trainable, frozen, b)
  for key in ("loss", "label_loss"):
    assert m4[key] == pytest.approx(m1[key], rel=1e-6)
  assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-6)
  assert_close_trees(g4, g1)


def test_accumulated_balance_loss_is_the_mean_of_the_micro_batches(setup):
  """The label loss is the full batch's; the balance loss (a product of
  two batch means) is each micro-batch's own, averaged."""
  _, _, host_params = setup
  trainable, frozen = perturbed_trainable(host_params)
  mask = uneven_mask(16)
  b = batch(16, 1, mask)
  c = accum_config(ACCUM, balance=0.5)
  got, metrics = run_step(setup, c, trainable, frozen, b)

  model = build(setup, c)

  def reference(tr):
    params = partition.merge(tr, frozen)
    images = jnp.asarray(b["image"], jnp.float32) / 255.0
    logits, aux = model.apply({"params": params}, images, train=True)
    label = losses.loss(logits, b["targets"], b["mask"], c.loss, WEIGHTS)
    balance = jnp.mean(jnp.stack([moe.balance_loss(aux["gates"][i::ACCUM])
                                  for i in range(ACCUM)]))
    return label + 0.5 * balance, (label, balance)

  (value, (label, balance)), want = jax.jit(
      jax.value_and_grad(reference, has_aux=True))(
          jax.tree.map(jnp.asarray, trainable))
  assert metrics["loss"] == pytest.approx(float(value), rel=1e-6)
  assert metrics["label_loss"] == pytest.approx(float(label), rel=1e-6)
  assert metrics["balance_loss"] == pytest.approx(float(balance), rel=1e-6)
  assert_close_trees(got, flat(want))
  assert np.abs(flat(want)["gate/logits/kernel"]).max() > 0


class _Toy:
  """A linear 'model' with MedBridge's calling convention (uint8 images)."""

  def apply(self, variables, images, *, train, rngs):
    del train, rngs
    p = variables["params"]
    assert images.dtype == jnp.uint8, images.dtype
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    return x @ p["head"]["w"] * p["frozen"]["scale"], {}


@pytest.mark.parametrize("accum", [1, 2, 4])
def test_toy_accumulation_matches_the_hand_written_gradient(accum):
  """BCE's masked mean over the whole batch, d/dw = s x^T (p - y) m / n,
  with micro-batch 0 holding no known label."""
  c = default_config.get_default()
  c.train.grad_accum = accum
  c.mesh.data = 2
  mesh = sharding.make_mesh(c.mesh)
  tx = capture_grads()
  rng = np.random.default_rng(0)
  w = rng.normal(size=(12, 3)).astype(np.float32)
  state = {"step": jnp.int32(0), "params": {"head": {"w": jnp.asarray(w)}},
           "opt_state": tx.init({"head": {"w": w}})}
  mask = (rng.random((16, 3)) < 0.5).astype(np.float32)
  mask[0::max(accum, 2)] = 0.0  # all of micro-batch 0 when accumulating
  b = {"image": rng.integers(0, 255, (16, 3, 4)).astype(np.uint8),
       "targets": (rng.random((16, 3)) < 0.5).astype(np.float32),
       "mask": mask}
  step = jax.jit(train_step.make_train_step(
      _Toy(), tx, optim.schedule(c.train), c, mesh), donate_argnums=(0,))
  state, m = step(state, {"frozen": {"scale": jnp.float32(0.5)}},
                  sharding.to_global(b, mesh), None)
  x = b["image"].reshape(16, -1).astype(np.float64) / 255.0
  z = 0.5 * x @ w
  y, n = b["targets"], mask.sum()
  loss = -(y * np.log(1 / (1 + np.exp(-z)))
           + (1 - y) * np.log(1 / (1 + np.exp(z))))
  assert float(m["loss"]) == pytest.approx((loss * mask).sum() / n, rel=1e-5)
  want = 0.5 * x.T @ ((1 / (1 + np.exp(-z)) - y) * mask) / n
  np.testing.assert_allclose(state["opt_state"]["grads"]["head"]["w"], want,
                             rtol=1e-5, atol=1e-8)


# -- Weight decay by path. ----------------------------------------------------


def test_weight_decay_touches_exactly_the_mixing_matrices(setup):
  trainable, _ = partition.split(setup[2])
  mask = flat(optim.decay_mask(trainable))
  decayed = sorted(p for p, d in mask.items() if d)
  want = sorted(
      [f"expert_{k}/fusion/block_0/{m}/kernel" for k in range(2)
       for m in ("attn/query", "attn/key", "attn/value", "attn/out", "fc1",
                 "fc2")]
      + ["gate/hidden/kernel", "gate/logits/kernel"])
  assert decayed == want
  kept = set(mask) - set(want)
  for k in range(2):
    for name in ("encoder/queries", "fusion/view_type", "head/kernel",
                 "head/bias", "fusion/block_0/attn/query/bias",
                 "fusion/block_0/norm1/scale"):
      assert f"expert_{k}/{name}" in kept
  # A trained tower (if a partition rule ever allowed it) is not decayed.
  tower = flat(optim.decay_mask(setup[2]))
  assert not any(d for p, d in tower.items() if "/tower/" in p)


def test_weight_decay_rule_gaps_are_errors_naming_the_parameter():
  params = {"gate": {"logits": {"kernel": np.ones((2, 2))}},
            "expert_0": {"adapter": {"kernel": np.ones((2, 2))}}}
  with pytest.raises(errors.UserError,
                     match="expert_0/adapter/kernel.*weight-decay"):
    optim.decay_mask(params)
  with pytest.raises(errors.UserError, match="action 'off'"):
    optim.decay_mask(params, [(".*", "off")])
