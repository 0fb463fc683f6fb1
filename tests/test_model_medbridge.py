"""The composed MedBridge model on two tiny random experts.

Two experts of different families, widths, depths and input sides (CLIP
width 32, 2 layers at 32 px; SigLIP width 48, 1 layer at 24 px) written as
Hugging Face folders and loaded through `experts.load`, as real checkpoints
are. Stored images are 64 px; crops are at each expert's native side (32
and 24 px). Everything is jitted: compilation dominates the run time.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax import methods
from medbridge_jax.errors import UserError
from medbridge_jax.experts import zero_shot
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition
from medbridge_jax.model import query_encoder
from tests import tiny_run

LABELS = ("effusion", "nodule", "pneumothorax")
SIDE = 64  # Stored image side.
SPECS = ("clip:width=32,layers=2,heads=2,patch=8,image=32,text_layers=1",
         "siglip:width=48,layers=1,heads=4,patch=8,image=24,text_layers=1")


def _size(tree) -> int:
  """Scalars in a pytree of arrays."""
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
  return tiny_run.random_experts_in(tmp_path_factory.mktemp("experts"), SPECS)


@pytest.fixture(scope="module")
def prompts(experts):
  return [zero_shot.prompt_embeddings(e, list(LABELS)) for e in experts]


def config(**model):
  c = default_config.get_default()
  c.data.image_size = SIDE
  c.model.focal.num_local = 2
  # Native crops without overlap: CLIP 32 px, starts 0 and 32 (2 x 2
  # windows, 5 views in evaluation); SigLIP 24 px, starts 0, 24 and the
  # flush 40 (3 x 3 windows, 10 views).
  c.model.focal.eval_overlap = 0.0
  c.model.queries.inject_layer = -1  # T1 = 1 for CLIP, 0 for SigLIP.
  for key, value in model.items():
    node = c.model
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def main(experts, prompts):
  """The default model (focal, queries, soft MoE, text init) and params."""
  model = medbridge.build(config(), experts, LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  return model, params, eval_fn(model)


def images(n=8, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, SIDE, SIDE))


class ProbeEncoder(nn.Module):
  """A QueryEncoder with its tower under "tower", as in an expert branch."""
  tower: nn.Module
  mode: str
  num_queries: int = 4
  inject_layer: int = 0

  @nn.compact
  def __call__(self, x):
    return query_encoder.QueryEncoder(self.num_queries, self.inject_layer,
                                      self.mode, name="encoder")(self.tower, x)


def eval_fn(model):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))


def test_shapes_dtypes_and_param_layout(main, experts):
  _, params, run = main
  assert set(params) == {"expert_0", "expert_1", "gate"}
  for k, e in enumerate(experts):
    assert set(params[f"expert_{k}"]) == {"tower", "encoder", "fusion", "head"}
    # The loaded weights, not random ones.
    got = jax.tree_util.tree_leaves(params[f"expert_{k}"]["tower"])
    want = jax.tree_util.tree_leaves(e.params["vision"])
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    assert params[f"expert_{k}"]["encoder"]["queries"].shape == (
        4, e.vision.config.hidden_size)
  n = partition.count(params)
  assert n["frozen"] == sum(_size(e.params["vision"])
                            for e in experts)
  logits, aux = run(params, images(8))
  assert logits.shape == (8, 3) and logits.dtype == jnp.float32
  assert aux["expert_logits"].shape == (8, 2, 3)
  assert aux["gates"].shape == (8, 2) and aux["balance_loss"].shape == ()
  np.testing.assert_allclose(aux["gates"].sum(1), 1.0, atol=1e-6)
  assert np.all(np.isfinite(logits))


def test_non_destructive_stream_is_the_plain_backbone(experts):
  """The frozen summary equals the expert's own image features, bit for bit."""
  e = experts[0]
  pixels = e.normalize_pixels(
      jax.random.uniform(jax.random.key(1), (4, 32, 32, 1)))
  probe = ProbeEncoder(e.vision.clone(), "non_destructive", 3, 1)
  queries = jax.random.normal(jax.random.key(0), (3, 32))
  variables = {"params": {"tower": e.params["vision"],
                          "encoder": {"queries": queries}}}
  out = jax.jit(probe.apply)(variables, pixels)
  assert out.shape == (4, 4, 32)
  np.testing.assert_array_equal(out[:, -1], e.image_features(pixels))
  # The queries really read the image: different images, different queries.
  assert not np.allclose(out[0, :3], out[1, :3])


def encoder_cost(expert, mode, grad):
  """FLOPs XLA counts for the query encoder's forward (and backward)."""
  def run(queries, tower_params, x):
    variables = {"params": {"tower": tower_params,
                            "encoder": {"queries": queries}}}
    return jnp.sum(jnp.square(ProbeEncoder(expert.vision.clone(), mode).apply(
        variables, x)))
  side = expert.image_size
  x = jnp.zeros((4, side, side, 3))
  q = jnp.zeros((4, expert.vision.config.hidden_size))
  fn = jax.grad(run) if grad else run
  compiled = jax.jit(fn).lower(q, expert.params["vision"], x).compile()
  return compiled.cost_analysis()["flops"]




def test_non_destructive_training_costs_about_one_forward(experts):
  """No backward pass runs through the frozen image stream."""
  e = experts[0]
  forward = encoder_cost(e, "non_destructive", grad=False)
  nd = encoder_cost(e, "non_destructive", grad=True)
  joint = encoder_cost(e, "joint", grad=True)
  # Backward of the 4 query tokens only (17 image tokens): far below a
  # second pass over the image stream, which the joint mode pays. (With
  # ViT-B/16's 197 tokens the extra is a few percent.)
  print(f"flops: forward {forward:.3g}, non_destructive grad {nd:.3g}, "
        f"joint grad {joint:.3g}")
  assert nd < 1.35 * forward, (nd, forward)
  assert joint > 1.8 * forward, (joint, forward)


def test_eight_devices_agree_with_one(main):
  model, params, run = main
  assert jax.device_count() == 8
  # The sharded run gets uint8 images (as the pipeline delivers them); the
  # model scales them on the device exactly as x / 255.
  x8 = jax.random.randint(jax.random.key(5), (8, SIDE, SIDE), 0, 256,
                          jnp.int32).astype(jnp.uint8)
  x = x8.astype(jnp.float32) / 255.0
  single = run(params, x)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  xs = jax.device_put(x8, data)
  ps = jax.device_put(params, repl)
  sharded = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False),
                    in_shardings=(repl, data))(ps, xs)
  assert len(sharded[0].sharding.device_set) == 8
  np.testing.assert_allclose(sharded[0], single[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sharded[1]["gates"], single[1]["gates"],
                             atol=1e-5)


def test_bfloat16_compute(main, experts, prompts):
  _, params, run = main
  c = config(compute_dtype="bfloat16")
  model16 = medbridge.build(c, experts, LABELS, prompts)
  logits16, aux16 = eval_fn(model16)(params, images(8))
  logits32, _ = run(params, images(8))
  assert logits16.dtype == jnp.float32
  assert aux16["expert_logits"].dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, atol=0.25)


@pytest.mark.parametrize("fusion", [True, False])
def test_all_off_is_the_zero_shot_linear_probe(experts, prompts, fusion):
  """Focal, queries, (fusion) and MoE off + text init: the experts'
  zero-shot logits, a linear classifier on the pooled frozen features."""
  c = config(**{"focal.enabled": False, "queries.enabled": False,
                "moe.enabled": False, "fusion.enabled": fusion})
  # No prompt embeddings given: build computes them from config.zero_shot.
  model = medbridge.build(c, experts, LABELS)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  assert set(params["expert_0"]) == {"tower", "head"} and "gate" not in params
  x = images(4, seed=6)
  logits, aux = eval_fn(model)(params, x)
  for k, e in enumerate(experts):
    view = focal_sampling.resize(x, e.image_size)
    feats = e.image_features(e.normalize_pixels(view[..., None]))
    pair = zero_shot.logits(feats, prompts[k], e)
    np.testing.assert_allclose(aux["expert_logits"][:, k],
                               pair[..., 0] - pair[..., 1],
                               atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(aux["gates"], 0.5)
  np.testing.assert_allclose(logits, aux["expert_logits"].mean(1), atol=1e-6)


def test_a_vision_only_expert_starts_at_zero_beside_a_text_initialised_one(
    experts, prompts):
  """The same towers, the SigLIP one without its text: its head starts at
  zero (its logits are 0), the CLIP head is still the zero-shot one; CoOp,
  which needs text, names the vision-only expert."""
  vision_only = dataclasses.replace(
      experts[1], text=None, make_tokenizer=None, max_length=0,
      params={"vision": experts[1].params["vision"]},
      vision_only_reason="no tokenizer files in the test")
  mixed = [experts[0], vision_only]
  c = config(**{"focal.enabled": False, "queries.enabled": False,
                "moe.enabled": False})
  assert medbridge.label_prompts(c, mixed, LABELS)[1] is None
  model = medbridge.build(c, mixed, LABELS)
  params = medbridge.init_params(model, jax.random.key(0), mixed, SIDE)
  assert not np.any(np.asarray(params["expert_1"]["head"]["kernel"]))
  logits, aux = eval_fn(model)(params, images(2, seed=7))
  np.testing.assert_array_equal(aux["expert_logits"][:, 1], 0.0)
  e = experts[0]
  view = focal_sampling.resize(images(2, seed=7), e.image_size)
  pair = zero_shot.logits(e.image_features(e.normalize_pixels(view[..., None])),
                          prompts[0], e)
  np.testing.assert_allclose(aux["expert_logits"][:, 0],
                             pair[..., 0] - pair[..., 1], atol=1e-4, rtol=1e-4)
  c.method.name = "coop"
  with pytest.raises(UserError, match=f"CoOp.*{vision_only.name} is "
                     "vision-only"):
    methods.build(c, mixed, LABELS)


def test_init_params_names_a_wrong_tower_shape(main, experts):
  model, _, _ = main
  bad = dataclasses.replace(experts[0], params={
      "vision": jax.tree_util.tree_map(lambda a: a, experts[0].params["vision"])
  })
  bad.params["vision"]["position_embedding"] = np.zeros((3, 32), np.float32)
  with pytest.raises(UserError, match="position_embedding"):
    medbridge.init_params(model, jax.random.key(0), [bad, experts[1]], SIDE)


def test_config_errors(experts, prompts):
  with pytest.raises(UserError, match="inject_layer"):
    query_encoder.resolve_layer(-3, 2)
  # Caught when the model is built, before anything is traced.
  for changes, key in (
      ({"focal.crop_size": 96}, "model.focal.crop_size=96"),
      ({"focal.global_side": 20}, "model.focal.global_side=20"),
      ({"focal.global_side": 128}, "model.focal.global_side=128"),
      ({"focal.enabled": False, "focal.global_view": False},
       "model.focal.global_view"),
      ({"focal.global_view": False, "fusion.keep_global": True},
       "model.fusion.keep_global")):
    with pytest.raises(UserError, match=key):
      medbridge.build(config(**changes), experts, LABELS, prompts)
  # Native crops bigger than the stored images (a 32 px expert on 24 px).
  c = config()
  c.data.image_size = 24
  with pytest.raises(UserError, match="crop_size=0 gives expert 0"):
    medbridge.build(c, experts, LABELS, prompts)


def test_keep_global_fusion_heads_see_both_token_sets(experts, prompts):
  model = medbridge.build(config(**{"fusion.keep_global": True}), experts,
                          LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  t = 4 + 1  # Q queries + the frozen summary, per set
  for k in range(len(experts)):
    assert params[f"expert_{k}"]["head"]["kernel"].shape[0] == 2 * t
  logits, aux = eval_fn(model)(params, images(4))
  assert logits.shape == (4, 3) and np.all(np.isfinite(logits))
  np.testing.assert_allclose(aux["gates"].sum(1), 1.0, atol=1e-6)


def tower_calls(model, params, x, train=False, key=None):
  """{expert index: [(pixels, tokens) of each tower.embed call]}, in order
  (one jitted apply; the intercepted values are returned as outputs)."""

  def run(params, x, key):
    calls = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "embed":
        k = int(context.module.path[0].split("_")[1])
        calls.setdefault(k, []).append((args[0], out))
      return out

    rngs = {"focal": key} if key is not None else None
    with nn.intercept_methods(record):
      model.apply({"params": params}, x, train=train, rngs=rngs)
    return calls

  return jax.tree.map(np.asarray, jax.jit(run)(params, x, key))


def unnormalize(pixels, expert):
  """Normalised NHWC pixels -> the [0, 1] grey values they came from."""
  return pixels[..., 0] * expert.image_std[0] + expert.image_mean[0]


def coordinates(n):
  """Images whose pixel (r, c) is (r * SIDE + c) / SIDE^2 (+ a shift per
  image): each crop's top-left pixel gives its corner back."""
  base = np.arange(SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)
  return np.stack([(base + 0.05 * i) / SIDE**2 for i in range(n)])


def corner_of(crop):
  """(row, col) of a crop of a `coordinates` image."""
  i = int(np.floor(crop[0, 0] * SIDE**2 + 1e-3))
  return i // SIDE, i % SIDE


def test_each_expert_evaluates_its_own_native_windows(main, experts):
  """Evaluation: every sliding window of each expert's own input side,
  unresized, hand-computed for 64 px images without overlap."""
  model, params, _ = main
  x = np.asarray(jax.random.uniform(jax.random.key(8), (2, SIDE, SIDE)))
  calls = tower_calls(model, params, jnp.asarray(x))
  starts = {0: [0, 32], 1: [0, 24, 40]}  # 32 px and 24 px crops
  for k, e in enumerate(experts):
    (pixels, _), = calls[k]  # one batch: the global view and the crops
    side = e.image_size
    views = unnormalize(pixels, e).reshape(2, -1, side, side)
    windows = [(r, c) for r in starts[k] for c in starts[k]]
    assert views.shape[1] == 1 + len(windows)
    for b in range(2):
      for i, (r, c) in enumerate(windows):
        np.testing.assert_allclose(views[b, 1 + i],
                                   x[b, r:r + side, c:c + side], atol=1e-5)


def test_training_crops_share_centres_across_experts(main, experts):
  """Training: each expert's crop is its own side around one centre per
  crop, clamped into the image; the experts' corners must agree on it."""
  model, params, _ = main
  x = coordinates(8)
  calls = tower_calls(model, params, jnp.asarray(x), train=True,
                      key=jax.random.key(21))
  corners = {}
  for k, e in enumerate(experts):
    (pixels, _), = calls[k]
    side = e.image_size
    views = unnormalize(pixels, e).reshape(8, 3, side, side)[:, 1:]
    corners[k] = np.asarray([[corner_of(v) for v in row] for row in views])
  centre = np.arange(SIDE)
  placed = {k: np.clip(centre - e.image_size // 2, 0,
                       SIDE - e.image_size)
            for k, e in enumerate(experts)}
  moved = 0
  for b in range(8):
    for i in range(2):
      for axis in range(2):
        fits = [set(centre[placed[k] == corners[k][b, i, axis]])
                for k in range(2)]
        assert fits[0] & fits[1], (b, i, axis, corners[0][b, i],
                                   corners[1][b, i])
        moved += corners[0][b, i, axis] != corners[1][b, i, axis]
  assert moved > 0  # Different sides: the corners themselves differ.


def test_global_view_off_feeds_the_local_views_only(experts, prompts):
  model = medbridge.build(config(**{"focal.global_view": False}), experts,
                          LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  x = images(2, seed=9)
  calls = tower_calls(model, params, x)
  # N - 1 = 4 and 9 views (no global view) per image in evaluation.
  assert [len(calls[k][0][0]) for k in range(2)] == [2 * 4, 2 * 9]
  calls = tower_calls(model, params, x, train=True, key=jax.random.key(0))
  assert [len(calls[k][0][0]) for k in range(2)] == [2 * 2, 2 * 2]
  logits, _ = eval_fn(model)(params, x)
  assert np.all(np.isfinite(logits))


def test_global_side_reads_a_larger_whole_image(main, experts, prompts):
  """A 48 px global view: its own pass through each tower, with
  interpolated positions ((48 / 8)^2 patches, + CLIP's class token)."""
  base_model, params, run = main
  model = medbridge.build(config(**{"focal.global_side": 48}), experts,
                          LABELS, prompts)
  x = images(2, seed=10)
  calls = tower_calls(model, params, x)
  for k, e in enumerate(experts):
    (g_pixels, g_tokens), (l_pixels, l_tokens) = calls[k]
    prefix = e.vision.config.num_prefix_tokens
    assert g_pixels.shape[:3] == (2, 48, 48)
    assert g_tokens.shape[:2] == (2, 6 * 6 + prefix)
    side = e.image_size
    grid = (side // 8) ** 2
    assert l_pixels.shape[1:3] == (side, side)
    assert l_tokens.shape[1] == grid + prefix
  # The same parameters fit; the whole-image view changes the output.
  got = eval_fn(model)(params, x)[0]
  assert not np.allclose(got, run(params, x)[0], atol=1e-4)
  calls = tower_calls(model, params, x, train=True, key=jax.random.key(1))
  assert [len(p) for (p, _), _ in calls.values()] == [2, 2]  # global views
  assert [len(p) for _, (p, _) in calls.values()] == [2 * 2, 2 * 2]  # crops


def test_global_side_alone_is_zero_shot_on_the_larger_image(experts,
                                                            prompts):
  """Everything else off: the expert's own image features of the image
  resized to 48 px (positions interpolated by the expert) -> zero-shot."""
  c = config(**{"focal.enabled": False, "focal.global_side": 48,
                "queries.enabled": False, "moe.enabled": False})
  model = medbridge.build(c, experts, LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  x = images(3, seed=11)
  _, aux = eval_fn(model)(params, x)
  view = jax.image.resize(x, (3, 48, 48), "linear", antialias=True)
  for k, e in enumerate(experts):
    feats = e.image_features(e.normalize_pixels(view[..., None]))
    pair = zero_shot.logits(feats, prompts[k], e)
    np.testing.assert_allclose(aux["expert_logits"][:, k],
                               pair[..., 0] - pair[..., 1],
                               atol=1e-4, rtol=1e-4)


def test_fusion_off_is_a_max_over_views_of_pooled_features(experts,
                                                           prompts):
  """Focal on, queries and fusion off: the zero-shot classifier on the
  element-wise max over every view's pooled frozen feature, the views cut
  by numpy slicing at the hand-computed windows."""
  c = config(**{"queries.enabled": False, "moe.enabled": False,
                "fusion.enabled": False})
  model = medbridge.build(c, experts, LABELS, prompts)
  params = medbridge.init_params(model, jax.random.key(0), experts, SIDE)
  assert set(params["expert_0"]) == {"tower", "head"}  # no fusion block
  x = np.asarray(images(2, seed=12))
  _, aux = eval_fn(model)(params, jnp.asarray(x))
  starts = {0: [0, 32], 1: [0, 24, 40]}
  for k, e in enumerate(experts):
    side = e.image_size
    crops = [x[:, r:r + side, c:c + side] for r in starts[k]
             for c in starts[k]]
    views = [np.asarray(jax.image.resize(x, (2, side, side), "linear",
                                         antialias=True))] + crops
    feats = np.stack([e.image_features(e.normalize_pixels(v[..., None]))
                      for v in views])
    pair = zero_shot.logits(feats.max(0), prompts[k], e)
    np.testing.assert_allclose(aux["expert_logits"][:, k],
                               pair[..., 0] - pair[..., 1],
                               atol=1e-4, rtol=1e-4)
