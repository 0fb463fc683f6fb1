"""VPT and LoRA around a frozen tower: exactness, references, gradients."""

import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medbridge_jax.errors import UserError
from medbridge_jax.experts import vit
from medbridge_jax.model import partition
from medbridge_jax.model import peft

SIDE = 32
RULES = ((r"^tower/", "frozen"), (r".*", "train"))


def _config(family):
  """A tiny CLIP, SigLIP (MAP head) or SigLIP without head (token mean)."""
  siglip = family.startswith("siglip")
  return vit.VisionConfig(
      family="siglip" if siglip else "clip", hidden_size=32, num_layers=3,
      num_heads=4, mlp_dim=64, patch_size=8, image_size=SIDE,
      act="gelu_pytorch_tanh" if siglip else "quick_gelu", eps=1e-5,
      projection_dim=0 if siglip else 24, use_head=family != "siglip_gap")


@functools.lru_cache(maxsize=None)
def _tower_setup(family):
  """(config, tower params, pixels, the frozen tower's features)."""
  config = _config(family)
  tower = vit.VisionTower(config)
  rng = np.random.RandomState(0)
  pixels = jnp.asarray(rng.randn(2, SIDE, SIDE, 3), jnp.float32)
  # Random values for every param (LayerNorms and biases too), so a wrong
  # mapping cannot hide behind zeros and ones.
  shapes = jax.eval_shape(tower.init, jax.random.key(1), pixels)["params"]
  params = jax.tree.map(
      lambda a: (0.3 * rng.randn(*a.shape)).astype(np.float32), shapes)
  feats = jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])(
      params, pixels)
  return config, params, pixels, np.asarray(feats)


@pytest.fixture(params=["clip", "siglip"])
def setup(request):
  return _tower_setup(request.param)


# Pooling is where the families differ for VPT: SigLIP without its head
# averages the tokens, so the prompts must be cut off first.
@pytest.fixture(params=["clip", "siglip", "siglip_gap"])
def vpt_setup(request):
  return _tower_setup(request.param)


@functools.lru_cache(maxsize=None)  # One compile per module, not per test.
def _apply(module):
  return jax.jit(lambda p, x: module.apply({"params": p}, x))


def _own(params):
  """The method's own params, flattened ("tower/..." left out)."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  return {k: v for k, v in flat.items() if not k.startswith("tower/")}


def _replace(params, values):
  """`params` with the flat {path: value} entries swapped in."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  assert set(values) <= set(flat)
  flat.update({k: jnp.asarray(v) for k, v in values.items()})
  return traverse_util.unflatten_dict(flat, sep="/")


# --- VPT ----------------------------------------------------------------


def _vpt(config, num_prompts, deep, **kw):
  return peft.VptFeatures(config, num_prompts=num_prompts, deep=deep, **kw)


def _vpt_params(config, tower_params, num_prompts, deep, seed=0):
  """VPT params with prompts of unit scale (they must visibly matter)."""
  module = _vpt(config, num_prompts, deep)
  shape = ((config.num_layers,) if deep else ()) + (num_prompts, 32)
  prompts = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  return module, {"tower": tower_params, "prompts": jnp.asarray(prompts)}


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_without_prompts_is_the_frozen_tower_bit_for_bit(vpt_setup,
                                                             deep):
  config, tower_params, pixels, feats = vpt_setup
  module = _vpt(config, 0, deep)
  params = peft.init_params(module, jax.random.key(0), tower_params, SIDE)
  assert not _own(params)
  out = _apply(module)(params, pixels)
  assert np.array_equal(np.asarray(out), feats)


def _vpt_reference(config, tower_params, prompts, pixels, deep):
  """VPT through the tower's joint-mode extra tokens: the prompts appended
  after the image tokens (attention does not care where), replaced by the
  next set after each layer when deep, discarded before pooling."""
  tower = vit.VisionTower(config)
  v = {"params": tower_params}
  x = tower.apply(v, pixels, method="embed")
  b = x.shape[0]
  n = config.num_layers
  sets = [prompts[i] for i in range(n)] if deep else [prompts]
  spans = [(i, i + 1) for i in range(n)] if deep else [(0, n)]
  for p, (start, end) in zip(sets, spans):
    extra = jnp.broadcast_to(p[None], (b,) + p.shape)
    x, _ = tower.apply(v, x, extra, start, end, "joint",
                       method="encode_with_extra")
  return tower.apply(v, x, method="pool")


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_matches_the_joint_extra_token_reference(vpt_setup, deep):
  config, tower_params, pixels, feats = vpt_setup
  module, params = _vpt_params(config, tower_params, 3, deep)
  prompts = params["prompts"]
  assert prompts.shape == ((3, 3, 32) if deep else (3, 32))
  out = np.asarray(_apply(module)(params, pixels))
  ref = np.asarray(jax.jit(functools.partial(
      _vpt_reference, config, deep=deep))(tower_params, prompts, pixels))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # The prompts changed the features (else the comparison proves little).
  assert np.abs(out - feats).max() > 1e-2


def test_deep_vpt_uses_each_layers_own_prompts(setup):
  """Changing only the last layer's prompt set changes the features; with
  shallow prompts carried through, it would not exist."""
  config, tower_params, pixels, _ = setup
  module, params = _vpt_params(config, tower_params, 2, True)
  prompts = np.array(params["prompts"])
  # Not a constant shift: the layer's pre-norm would cancel it.
  prompts[-1] += np.random.RandomState(9).randn(*prompts[-1].shape)
  other = _replace(params, {"prompts": prompts})
  a = np.asarray(_apply(module)(params, pixels))
  b = np.asarray(_apply(module)(other, pixels))
  assert np.abs(a - b).max() > 1e-3


def _loss(module, own, tower, pixels):
  params = partition.merge(own, {"tower": tower})
  feats = module.apply({"params": params}, pixels)
  return jnp.sum(jnp.sin(feats))  # Not linear: every gradient path counts.


@functools.lru_cache(maxsize=None)
def _value_and_grad(module):
  """Jitted (loss, gradient w.r.t. the method's own params only)."""
  return jax.jit(jax.value_and_grad(functools.partial(_loss, module)))


def _grads(module, own, tower, pixels):
  return _value_and_grad(module)(own, tower, pixels)[1]


def _check_directional_derivative(module, own, tower, pixels, grads, seed):
  """The gradient against a central finite difference along a random
  direction (float32, so a loose tolerance)."""
  rng = np.random.RandomState(seed)
  direction = jax.tree.map(
      lambda a: jnp.asarray(rng.randn(*a.shape), jnp.float32), own)
  eps = 1e-2
  loss = lambda s: _value_and_grad(module)(
      jax.tree.map(lambda a, d: a + s * eps * d, own, direction), tower,
      pixels)[0]
  numeric = (loss(1.0) - loss(-1.0)) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(
      jax.tree.leaves(grads), jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, float(numeric), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_gradients_reach_every_prompt_set(setup, deep):
  config, tower_params, pixels, _ = setup
  module, params = _vpt_params(config, tower_params, 2, deep)
  own, frozen = partition.split(params, RULES)
  grads = _grads(module, own, frozen["tower"], pixels)
  assert set(grads) == {"prompts"}
  g = np.asarray(grads["prompts"])
  assert np.all(np.isfinite(g))
  # Every prompt token (of every layer when deep) moves the loss.
  per_token = np.abs(g).reshape(-1, g.shape[-1]).max(axis=-1)
  assert np.all(per_token > 1e-6), per_token
  _check_directional_derivative(module, own, frozen["tower"], pixels,
                                grads, seed=3)


# --- LoRA ---------------------------------------------------------------

ALL = ("query", "key", "value", "out")


def _lora(config, targets=("query", "value"), **kw):
  return peft.LoraFeatures(config, rank=2, alpha=5.0, targets=targets, **kw)


def _lora_params(config, tower_params, targets, random_b, seed=0):
  """Tower + LoRA factors drawn here: A like loralib, B zero or random."""
  rng = np.random.RandomState(seed)
  bound = 1 / np.sqrt(32)
  lora = {f"layers_{i}": {t: {
      "a": rng.uniform(-bound, bound, (32, 2)).astype(np.float32),
      "b": (0.5 * rng.randn(2, 32) * random_b).astype(np.float32)}
                          for t in targets}
          for i in range(config.num_layers)}
  return {"tower": tower_params, "lora": jax.tree.map(jnp.asarray, lora)}


def _random_b(params, seed=0):
  """`params` with every LoRA B drawn at random."""
  rng = np.random.RandomState(seed)
  return _replace(params, {
      k: (0.5 * rng.randn(*v.shape)).astype(np.float32)
      for k, v in _own(params).items() if k.endswith("/b")})


def test_lora_param_layout_and_init(setup):
  config, tower_params, pixels, feats = setup
  module = _lora(config, targets=("key", "out"))
  params = peft.init_params(module, jax.random.key(0), tower_params, SIDE)
  own = _own(params)
  want = {f"lora/layers_{i}/{t}/{ab}" for i in range(3)
          for t in ("key", "out") for ab in "ab"}
  assert set(own) == want
  for path, value in own.items():
    if path.endswith("/a"):
      a = np.asarray(value)
      assert a.shape == (32, 2)
      # loralib's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), +...).
      assert np.abs(a).max() <= 1 / np.sqrt(32)
      assert a.std() > 0.3 / np.sqrt(32)
    else:
      assert value.shape == (2, 32) and not np.any(np.asarray(value))
  # The loaded weights sit unchanged at tower/, and B = 0 at the start:
  # the frozen features come out.
  same = jax.tree.map(lambda x, y: np.array_equal(x, y), params["tower"],
                      tower_params)
  assert all(jax.tree.leaves(same))
  assert np.array_equal(np.asarray(_apply(module)(params, pixels)), feats)


@pytest.mark.parametrize("targets", [("query", "value"), ("key", "out")])
def test_lora_with_zero_b_is_the_frozen_tower_exactly(setup, targets):
  config, tower_params, pixels, feats = setup
  module = _lora(config, targets)
  params = _lora_params(config, tower_params, targets, random_b=False)
  out = _apply(module)(params, pixels)
  assert np.array_equal(np.asarray(out), feats)


def _merged_reference(config, tower_params, params, targets, scale):
  """The plain tower's params with scale * A @ B merged in by numpy."""
  merged = jax.tree.map(lambda a: np.array(a, np.float64), tower_params)
  for i in range(config.num_layers):
    for t in targets:
      a = np.asarray(params["lora"][f"layers_{i}"][t]["a"], np.float64)
      b = np.asarray(params["lora"][f"layers_{i}"][t]["b"], np.float64)
      merged[f"layers_{i}"]["attn"][t]["kernel"] += scale * a @ b
  return jax.tree.map(lambda a: a.astype(np.float32), merged)


@pytest.mark.parametrize("targets", [("query", "value"), ALL])
def test_lora_equals_the_tower_with_merged_weights(setup, targets):
  config, tower_params, pixels, feats = setup
  module = _lora(config, targets)
  params = _lora_params(config, tower_params, targets, random_b=True)
  out = np.asarray(_apply(module)(params, pixels))
  merged = _merged_reference(config, tower_params, params, targets, 5.0 / 2)
  tower = vit.VisionTower(config)
  ref = np.asarray(jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])(
      merged, pixels))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert np.abs(out - feats).max() > 1e-2


def test_lora_mutable_apply_leaves_the_tower_params_alone(setup):
  """The deltas are added on the way in only: a mutable apply (as in
  creating missing params) must hand back the frozen weights as given."""
  config, tower_params, pixels, _ = setup
  module = _lora(config)
  params = _lora_params(config, tower_params, module.targets, random_b=True)
  _, new = jax.jit(lambda p, x: module.apply({"params": p}, x,
                                             mutable=["params"]))(
                                                 params, pixels)
  same = jax.tree.map(lambda x, y: np.array_equal(x, y),
                      new["params"]["tower"], tower_params)
  assert all(jax.tree.leaves(same))


def test_lora_gradients_at_zero_b(setup):
  """At B = 0: dL/dB = A^T (...) is non-zero, dL/dA = (...) B^T is zero."""
  config, tower_params, pixels, _ = setup
  module = _lora(config, ALL)
  own, frozen = partition.split(
      _lora_params(config, tower_params, ALL, random_b=False), RULES)
  grads = _grads(module, own, frozen["tower"], pixels)
  assert set(grads) == {"lora"}
  for i in range(config.num_layers):
    for t in ALL:
      g = grads["lora"][f"layers_{i}"][t]
      assert np.all(np.isfinite(g["b"])) and np.abs(g["b"]).max() > 1e-6, (
          i, t)
      assert not np.any(np.asarray(g["a"])), (i, t)
  _check_directional_derivative(module, own, frozen["tower"], pixels, grads,
                                seed=4)
  # Away from B = 0 both factors learn.
  own = _random_b(own)
  grads = _grads(module, own, frozen["tower"], pixels)
  assert all(np.abs(g).max() > 1e-6 for g in jax.tree.leaves(grads))
  _check_directional_derivative(module, own, frozen["tower"], pixels, grads,
                                seed=5)


@pytest.mark.parametrize("method", ["vpt", "lora"])
def test_a_training_step_moves_only_the_methods_params(setup, method):
  config, tower_params, pixels, _ = setup
  if method == "vpt":
    module, params = _vpt_params(config, tower_params, 2, True)
  else:
    module = _lora(config, ALL)
    params = _lora_params(config, tower_params, ALL, random_b=False)
  own, frozen = partition.split(params, RULES)
  assert set(frozen) == {"tower"} and "tower" not in own
  tx = optax.sgd(0.1)
  updates, _ = tx.update(_grads(module, own, frozen["tower"], pixels),
                         tx.init(own), own)
  new_own = optax.apply_updates(own, updates)
  after = partition.merge(new_own, frozen)
  same = jax.tree.map(lambda x, y: np.array_equal(x, y), after["tower"],
                      tower_params)
  assert all(jax.tree.leaves(same))
  moved = jax.tree.map(lambda x, y: not np.array_equal(x, y), new_own, own)
  # LoRA's A has no gradient at B = 0; every B and every prompt moves.
  flat = traverse_util.flatten_dict(moved, sep="/")
  assert all(v for k, v in flat.items() if not k.endswith("/a")), flat


# --- Attention kernels and errors -------------------------------------


def test_every_attention_of_the_methods_is_differentiated(setup):
  """With "cudnn", only differentiated paths fall back to XLA: on a CPU
  (no cuDNN) the plain tower fails and the methods, whose every attention
  is differentiated, give the XLA result."""
  config, tower_params, pixels, _ = setup
  tower = vit.VisionTower(config, attention_impl="cudnn")
  with pytest.raises(Exception, match="cuDNN"):
    jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])(
        tower_params, pixels)
  for method in ("vpt", "lora"):
    if method == "vpt":
      make = lambda **kw: _vpt(config, 2, True, **kw)
      _, params = _vpt_params(config, tower_params, 2, True)
    else:
      make = lambda **kw: _lora(config, **kw)
      params = _lora_params(config, tower_params, ("query", "value"),
                            random_b=True)
    want = _apply(make())(params, pixels)
    got = _apply(make(attention_impl="cudnn"))(params, pixels)
    np.testing.assert_array_equal(got, want)


def test_tower_differentiated_flag_keeps_the_features(setup):
  config, tower_params, pixels, feats = setup
  tower = vit.VisionTower(config, attention_impl="cudnn")
  got = jax.jit(lambda p, x: tower.apply(
      {"params": p}, x, differentiated=True)[0])(tower_params, pixels)
  np.testing.assert_array_equal(got, feats)

  def split(p, x):
    v = {"params": p}
    t = tower.apply(v, x, method="embed")
    t = tower.apply(v, t, 0, 2, True, method="encode")
    t = tower.apply(v, t, 2, 3, differentiated=True, method="encode")
    return tower.apply(v, t, True, method="pool")

  np.testing.assert_allclose(jax.jit(split)(tower_params, pixels), feats,
                             rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_setting():
  config = _config("clip")
  pixels = jax.ShapeDtypeStruct((1, SIDE, SIDE, 3), jnp.float32)
  bad = [
      (peft.LoraFeatures(config, rank=0), "LoRA rank"),
      (peft.LoraFeatures(config, alpha=float("nan")), "LoRA alpha"),
      (peft.LoraFeatures(config, targets=("query", "fc1")), "'fc1'"),
      (peft.LoraFeatures(config, targets=("query", "query")), "twice"),
      (peft.LoraFeatures(config, targets=()), "LoRA targets"),
      (peft.VptFeatures(config, num_prompts=-1), "num_prompts"),
      (peft.VptFeatures(config, init_std=-0.1), "init_std"),
  ]
  for module, message in bad:
    with pytest.raises(UserError, match=message):
      jax.eval_shape(module.init, jax.random.key(0), pixels)


def test_init_params_names_a_wrong_tower_weight(setup):
  config, tower_params, _, _ = setup
  module = _lora(config)
  flat = traverse_util.flatten_dict(dict(tower_params), sep="/")
  flat["layers_1/attn/query/kernel"] = np.zeros((32, 16), np.float32)
  wrong = traverse_util.unflatten_dict(flat, sep="/")
  with pytest.raises(UserError, match="layers_1/attn/query/kernel"):
    peft.init_params(module, jax.random.key(0), wrong, SIDE)
  del flat["layers_1/attn/query/kernel"]
  with pytest.raises(UserError, match="layers_1/attn/query/kernel.* missing"):
    peft.init_params(module, jax.random.key(0),
                     traverse_util.unflatten_dict(flat, sep="/"), SIDE)
