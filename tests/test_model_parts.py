"""Partition rules, MoE gates and the cross-view fusion on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax.errors import UserError
from medbridge_jax.model import fusion
from medbridge_jax.model import heads
from medbridge_jax.model import moe
from medbridge_jax.model import partition


def _size(tree) -> int:
  """Scalars in a pytree of arrays."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def toy_params():
  return {
      "expert_0": {"tower": {"layers_0": {"kernel": np.ones((3, 4))},
                             "position_embedding": np.ones((5, 4))},
                   "encoder": {"queries": np.ones((2, 4))},
                   "head": {"kernel": np.ones((3, 4, 2)), "bias": np.ones(2)}},
      "gate": {"logits": {"kernel": np.ones((8, 2))}},
  }


def test_split_merge_and_count():
  p = toy_params()
  train, frozen = partition.split(p)
  assert set(frozen) == {"expert_0"} and set(frozen["expert_0"]) == {"tower"}
  assert "tower" not in train["expert_0"] and "gate" in train
  merged = partition.merge(train, frozen)
  assert jax.tree_util.tree_structure(merged) == (
      jax.tree_util.tree_structure(p))
  n = partition.count(p)
  assert n == {"train": 8 + 24 + 2 + 16, "frozen": 12 + 20}
  assert _size(train) == n["train"]
  assert "trainable" in partition.describe(p)


def test_uncovered_parameter_is_an_error_naming_it():
  rules = [(r"^expert_\d+/tower/", "frozen"), (r"^expert_\d+/", "train")]
  with pytest.raises(UserError, match="gate/logits/kernel"):
    partition.split(toy_params(), rules)
  with pytest.raises(UserError, match="action"):
    partition.split(toy_params(), [(".*", "freeze")])


def test_first_matching_rule_wins():
  rules = [(r"position_embedding", "train"), (r"/tower/", "frozen"),
           (r".*", "train")]
  d = partition.decide(toy_params(), rules)
  assert d["expert_0/tower/position_embedding"] == "train"
  assert d["expert_0/tower/layers_0/kernel"] == "frozen"


def random_gate_params(gate, pooled, seed=0):
  params = jax.jit(gate.init)(jax.random.key(seed), pooled)
  # The last layer starts at zero (equal gates); make the gates differ.
  return jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape), params)


def numpy_gate(params, pooled, gating, top_k, num_labels):
  """Gates and balance loss of `moe.Gate`, written out in numpy."""
  p = jax.tree_util.tree_map(np.asarray, params)["params"]
  x = np.concatenate([np.asarray(v, np.float64) / np.sqrt(
      np.mean(np.square(np.asarray(v, np.float64)), -1, keepdims=True)
      + 1e-6) for v in pooled], -1)
  h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  logits = h @ p["logits"]["kernel"] + p["logits"]["bias"]
  k = len(pooled)
  if gating == "per_label":
    logits = logits.reshape(-1, num_labels, k)
  order = np.argsort(-logits, axis=-1, kind="stable")
  top = np.zeros_like(logits)
  np.put_along_axis(top, order[..., :top_k if gating == "top_k" else 1], 1.0,
                    -1)
  if gating == "top_k":
    logits = np.where(top > 0, logits, -np.inf)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  gates = e / e.sum(-1, keepdims=True)
  routed = top_k if gating == "top_k" else 1
  flat, chosen = gates.reshape(-1, k), top.reshape(-1, k) / routed
  balance = k * np.sum(flat.mean(0) * chosen.mean(0))
  if gating == "per_label":
    gates = np.swapaxes(gates, 1, 2)
  return gates, balance


@pytest.mark.parametrize("gating,top_k", [("soft", 1), ("top_k", 1),
                                          ("top_k", 2), ("per_label", 1)])
def test_gates_and_balance_loss_match_numpy(gating, top_k):
  k, l, b = 3, 4, 5
  pooled = [jax.random.normal(jax.random.key(i), (b, w))
            for i, w in enumerate((8, 16, 12))]
  gate = moe.Gate(k, l, gating, top_k, hidden=6)
  params = random_gate_params(gate, pooled)
  gates, balance = jax.jit(gate.apply)(params, pooled)
  want, want_balance = numpy_gate(params, pooled, gating, top_k, l)
  assert gates.shape == want.shape
  np.testing.assert_allclose(gates, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(balance, want_balance, rtol=1e-4)
  if gating == "top_k":
    assert np.all((np.asarray(gates) > 0).sum(axis=1) == top_k)


def test_gates_start_equal():
  pooled = [jnp.ones((2, 8)), jnp.ones((2, 4))]
  gate = moe.Gate(2, 3)
  gates, _ = gate.apply(gate.init(jax.random.key(0), pooled), pooled)
  np.testing.assert_allclose(gates, 0.5)


def test_balance_loss_values():
  balanced = jnp.asarray([[0.9, 0.1], [0.1, 0.9]])
  np.testing.assert_allclose(moe.balance_loss(balanced), 1.0, rtol=1e-6)
  collapsed = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(moe.balance_loss(collapsed), 2.0, rtol=1e-6)
  # Hand-computed: mean gates (0.6, 0.4), top-1 fractions (2/3, 1/3).
  g = jnp.asarray([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
  want = 2 * (0.6 * 2 / 3 + 0.4 * 1 / 3)
  np.testing.assert_allclose(moe.balance_loss(g), want, rtol=1e-5)


def test_combine():
  logits = jnp.arange(12.0).reshape(2, 2, 3)
  gates = jnp.asarray([[0.25, 0.75], [1.0, 0.0]])
  np.testing.assert_allclose(
      moe.combine(gates, logits),
      [[0.25 * 0 + 0.75 * 3, 0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * 5],
       [6, 7, 8]])
  per_label = jnp.broadcast_to(gates[:, :, None], (2, 2, 3))
  np.testing.assert_allclose(moe.combine(per_label, logits),
                             moe.combine(gates, logits))


def test_fusion_starts_as_max_over_views_and_mixes_after():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  f = fusion.CrossViewFusion(num_heads=2, num_layers=1)
  params = jax.jit(f.init)(jax.random.key(1), x)
  apply = jax.jit(f.apply)
  np.testing.assert_allclose(apply(params, x), x.max(axis=1), rtol=1e-6)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
      params)
  y = apply(params, x)
  assert y.shape == (2, 3, 8)
  # It mixes: token 0's output moves when only token 2 of one local view
  # moves (a per-token map followed by the max could not do that).
  # (A random direction: LayerNorm ignores a constant added to a token.)
  moved = x.at[:, 3, 2].add(jax.random.normal(jax.random.key(4), (8,)))
  assert np.abs(np.asarray(apply(params, moved) - y)[:, 0]).max() > 1e-3
  # Every weight is used: changing any one parameter changes the output.
  # (Key biases excepted: softmax ignores q.b, the same for every key.)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for i, (path, _) in enumerate(leaves):
    name = partition.path_string(path)
    if name.endswith("key/bias"):
      continue
    changed = jax.tree_util.tree_map_with_path(
        lambda q, p, path=path: p + 0.1 * jax.random.normal(
            jax.random.key(3), p.shape) if q == path else p, params)
    assert np.abs(np.asarray(apply(changed, x) - y)).max() > 1e-4, name
  # Views are symmetric apart from the global one: permuting local views
  # leaves the result unchanged.
  perm = x[:, jnp.asarray([0, 3, 1, 4, 2])]
  np.testing.assert_allclose(apply(params, perm), y, rtol=1e-5, atol=1e-5)


def test_fusion_keep_global_keeps_the_global_view_beside_the_local_max():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  f = fusion.CrossViewFusion(num_heads=2, num_layers=1, keep_global=True)
  params = f.init(jax.random.key(1), x)
  y = f.apply(params, x)  # at init the blocks are the identity
  assert y.shape == (2, 6, 8)
  np.testing.assert_allclose(y[:, :3], x[:, 1:].max(axis=1), rtol=1e-6)
  np.testing.assert_allclose(y[:, 3:], x[:, 0], rtol=1e-6)
  # A local view can no longer override the global tokens.
  loud = x.at[:, 2].add(100.0)
  np.testing.assert_allclose(f.apply(params, loud)[:, 3:], x[:, 0],
                             rtol=1e-6)
  # One view: nothing to keep apart.
  one = x[:, :1]
  np.testing.assert_allclose(f.apply(f.init(jax.random.key(1), one), one),
                             one[:, 0], rtol=1e-6)


def test_text_initialised_head_is_the_zero_shot_logit():
  rng = np.random.default_rng(0)
  l, p, t = 3, 16, 2
  e = rng.normal(size=(l, 2, p))
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  directions = heads.TextDirections(heads.text_directions(e, 10.0))
  assert hash(directions) == hash(heads.TextDirections(directions.array))
  assert repr(directions) == "TextDirections(shape=(3, 16))"
  head = heads.Head(l, directions)
  x = jnp.asarray(rng.normal(size=(4, t, p)), jnp.float32)
  out = head.apply(head.init(jax.random.key(0), x), x)
  xn = np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
  cos = np.einsum("btp,lkp->btlk", xn, e)
  want = (10.0 * (cos[..., 0] - cos[..., 1])).mean(axis=1)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
