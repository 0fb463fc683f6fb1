"""bench/plan.py: a plan from shapes alone against the same steps built,
compiled and run from real (allocated) params, views against hand counts
and the traced program, and the batch-fit solver against a hand case.

What is compared, and why the tolerances are what they are:
  * memory fields and FLOPs of the planned step against `memory_analysis()`
    and `cost_analysis()` of the step compiled from real params, loaded
    random experts and real batches, jitted as training (train._jitted_step)
    and evaluation (evaluate.make_model_fn) jit it: exact. The same program
    compiled twice gets the same deterministic buffer assignment; any
    difference means the plan built another program (other param shapes or
    dtypes, no donation, another batch or image side).
  * the planned memory without temporaries (argument + output - alias)
    against the bytes the real step holds after it ran (its inputs, less
    the donated and deleted state, plus its outputs): equal up to XLA CPU's
    tuple index table of the output (8 bytes, a pointer, per output
    buffer), which no array holds. Temporaries are only XLA's figure: a CPU
    reports no device high-water mark to check them against.
"""

import types

import jax
import numpy as np
import pytest

from medbridge_jax import evaluate
from medbridge_jax import optim
from medbridge_jax import sharding
from medbridge_jax import train
from medbridge_jax import train_state
from medbridge_jax.bench import flops
from medbridge_jax.bench import model_steps
from medbridge_jax.bench import plan
from medbridge_jax.errors import UserError
from medbridge_jax.experts.vit import VisionConfig
from medbridge_jax.model import focal_sampling

SPEC = "clip:width=32,layers=2,heads=2,patch=8,image=32,text_layers=1"
BATCH = 4
IMAGE = 64


def _vit(family, side, **kw):
  cfg = dict(family=family, hidden_size=32, num_layers=2, num_heads=2,
             mlp_dim=64, patch_size=8, image_size=side, act="gelu",
             eps=1e-6)
  cfg.update(kw)
  return VisionConfig(**cfg)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """The harness's set-up of two tiny loaded experts on 64 px images, real
  params on a one-device mesh, and the plan of the same configuration."""
  mp = pytest.MonkeyPatch()
  mp.setenv("MEDBRIDGE_CACHE", str(tmp_path_factory.mktemp("cache")))
  c = model_steps.make_config(SPEC, batch=BATCH, dtype="bfloat16",
                              views=None, num_experts=2, attention="auto",
                              image_size=IMAGE)
  c.mesh.data = 1
  setup = model_steps.build(c)
  mp.undo()
  shapes = [plan.ExpertShape("tiny", setup.expert.vision.config,
                             setup.side)] * 2
  return setup, shapes, plan.build(c, shapes)


def _bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _real_train(setup):
  """The train step jitted by training itself, on allocated arguments."""
  c, mesh = setup.config, setup.mesh
  replicated = sharding.replicated(mesh)
  tx = optim.make(c.train)
  params = jax.tree.map(lambda x: x.copy(), setup.trainable)
  run = types.SimpleNamespace(config=c, mesh=mesh, model=setup.model,
                              abstract_state=train_state.abstract(params, tx))
  step = train._jitted_step(run)  # pylint: disable=protected-access
  rows = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  shape = (BATCH, len(model_steps.LABELS))
  batch = dict(
      image=jax.device_put(rng.integers(0, 256, (BATCH, IMAGE, IMAGE),
                                        dtype=np.uint8), rows),
      targets=jax.device_put(rng.integers(0, 2, shape).astype(np.float32),
                             rows),
      mask=jax.device_put(np.ones(shape, np.float32), rows))
  state = train_state.create(params, tx, replicated)
  return step, (state, setup.frozen, batch, None)


def test_planned_train_step_equals_the_real_one(real):
  setup, shapes, abstract = real
  planned = plan.costs(plan.compile_step(abstract, "train", BATCH), BATCH)
  step, args = _real_train(setup)
  compiled = step.lower(*args).compile()
  got = plan.costs(compiled, BATCH)
  assert planned == got
  # Per image: the real program's own FLOP count over the batch.
  assert planned["flops_per_image"] == (
      compiled.cost_analysis()["flops"] / BATCH)
  m = compiled.memory_analysis()
  assert planned["peak_bytes"] == (
      m.argument_size_in_bytes + m.output_size_in_bytes
      + m.temp_size_in_bytes - m.alias_size_in_bytes)

  # The real step, run: what it holds afterwards.
  state, frozen, batch, _ = args
  in_bytes = _bytes((state, frozen, batch))
  state_bytes = _bytes(state)
  new_state, metrics = compiled(*args)
  jax.block_until_ready(new_state)
  assert all(x.is_deleted() for x in jax.tree.leaves(state))  # Donated.
  outputs = jax.tree.leaves((new_state, metrics))
  table = 8 * len(outputs)
  assert planned["argument_bytes"] == in_bytes
  assert planned["alias_bytes"] == state_bytes
  assert planned["output_bytes"] - table == _bytes(outputs)
  held = _bytes((new_state, frozen, batch, metrics))
  assert (planned["argument_bytes"] + planned["output_bytes"] - table
          - planned["alias_bytes"]) == held
  assert planned["temp_bytes"] > 0


def test_planned_eval_step_equals_the_real_one(real):
  setup, _, abstract = real
  planned = plan.costs(plan.compile_step(abstract, "eval", BATCH), BATCH)
  fn = evaluate.make_model_fn(setup.model)
  images = jax.device_put(
      np.random.default_rng(1).integers(0, 256, (BATCH, IMAGE, IMAGE),
                                        dtype=np.uint8),
      sharding.batch_sharding(setup.mesh))
  args = (setup.trainable, setup.frozen, images)
  compiled = fn.lower(*args).compile()
  assert planned == plan.costs(compiled, BATCH)
  assert planned["flops_per_image"] == (
      compiled.cost_analysis()["flops"] / BATCH)
  probs = compiled(*args)
  assert probs.shape == (BATCH, len(model_steps.LABELS))
  assert planned["alias_bytes"] == 0
  assert planned["argument_bytes"] == _bytes(args)
  assert planned["output_bytes"] == probs.nbytes  # One buffer: no table.


def test_flops_per_image_do_not_grow_with_the_batch(real):
  """Per image means per image: twice the batch, about the same figure,
  and at least the N x K frozen tower forwards it holds."""
  _, shapes, abstract = real
  one = plan.costs(plan.compile_step(abstract, "eval", BATCH), BATCH)
  two = plan.costs(plan.compile_step(abstract, "eval", 2 * BATCH),
                   2 * BATCH)
  assert two["flops_per_image"] == pytest.approx(one["flops_per_image"],
                                                 rel=0.02)
  towers = sum(plan.views(abstract.config, shapes, "eval")) * (
      flops.vit_forward_flops(shapes[0].vision, shapes[0].side)["total"])
  assert towers < one["flops_per_image"] < 3 * towers
  # Memory grows with the batch: the line the fit draws rises.
  assert two["peak_bytes"] > one["peak_bytes"]


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.parametrize("step", plan.STEPS)
def test_views_are_the_towers_inputs(step):
  """Views per expert: `focal_sampling.describe`, hand counts, and the
  batch of each expert's patch convolution in the traced step."""
  shapes = (plan.ExpertShape("a", _vit("clip", 32), 32),
            plan.ExpertShape("b", _vit("siglip", 24), 24))
  c = plan.make_config(IMAGE, train_batch=BATCH, eval_batch=BATCH)
  abstract = plan.build(c, shapes)
  got = plan.views(c, shapes, step)
  rows = focal_sampling.describe(IMAGE, [32, 24], c.model.focal)
  assert got == [r[f"{step}_views"] for r in rows]
  # By hand: training 1 global + 4 random crops each; evaluation 1 + the
  # sliding windows, stride round(crop * 0.75): 32 px crops start at 0,
  # 24, 32 (3 x 3); 24 px crops at 0, 18, 36, 40 (4 x 4).
  assert got == ([5, 5] if step == "train" else [10, 17])
  closed = jax.make_jaxpr(plan.jitted(abstract, step))(
      *plan.step_args(abstract, step, BATCH))
  batches = {}
  for e in _equations(closed.jaxpr):
    if e.primitive.name == "conv_general_dilated":
      lhs = e.invars[0].aval.shape  # (views x B, side, side, 3)
      batches.setdefault(lhs[1], set()).add(lhs[0])
  assert batches == {32: {got[0] * BATCH}, 24: {got[1] * BATCH}}


def test_views_of_the_named_configurations():
  """By hand, stride round(crop * 0.75), the last window flush: 224 px
  crops on 1024 px start at 0, 168, ..., 672, 800 (6 per side); 448 px at
  0, 336, 576 (3) and on 2048 px 0, ..., 1344, 1600 (6); 518 px at 0, 388,
  776, 1164, 1530 on 2048 px (5) and 0, 388, 506 on 1024 px (3)."""
  want = {("b16_224", 1024): [37, 37], ("b16_224", 2048): [1 + 12 ** 2] * 2,
          ("l14_so400m_448", 1024): [10, 10],
          ("l14_so400m_448", 2048): [37, 37],
          ("dinov2_b14_518", 1024): [10], ("dinov2_b14_518", 2048): [26]}
  for (name, size), eval_views in want.items():
    c = plan.make_config(size, train_batch=1, eval_batch=1)
    assert plan.views(c, plan.CONFIGS[name], "eval") == eval_views, name
    assert plan.views(c, plan.CONFIGS[name], "train") == [5] * len(
        eval_views)
  sides = {n: [s.side for s in v] for n, v in plan.CONFIGS.items()}
  assert sides == {"b16_224": [224, 224], "l14_so400m_448": [448, 448],
                   "dinov2_b14_518": [518]}


def test_largest_batch_on_a_hand_line():
  gb = 10 ** 9
  # m(b) = 10 GB + 1.5 GB * b, known at b = 4 (16 GB) and 8 (22 GB).
  # 80 GB less 10%: 72 GB, (72 - 10) / 1.5 = 41.3 -> 41.
  assert plan.largest_batch(4, 16 * gb, 8, 22 * gb, 72 * gb) == 41
  # Exactly on the line at b = 42 (73 GB): 42 fits, one byte less does not.
  assert plan.largest_batch(4, 16 * gb, 8, 22 * gb, 73 * gb) == 42
  assert plan.largest_batch(4, 16 * gb, 8, 22 * gb, 73 * gb - 1) == 41
  # Not even one image: 0.
  assert plan.largest_batch(4, 16 * gb, 8, 22 * gb, 11 * gb) == 0
  with pytest.raises(ValueError, match="increase"):
    plan.largest_batch(8, 16 * gb, 4, 22 * gb, 72 * gb)
  with pytest.raises(ValueError, match="grow"):
    plan.largest_batch(4, 16 * gb, 8, 16 * gb, 72 * gb)


def test_plan_step_fits_the_line_through_two_compiles(real, monkeypatch):
  """plan_step's record: the fit from the peaks at B and 2B, and the
  throughput bound from the ceiling and the FLOPs per image."""
  _, shapes, abstract = real
  peaks = {BATCH: 3 * 10 ** 9, 2 * BATCH: 5 * 10 ** 9}

  def fake_costs(compiled, batch):
    del compiled
    return dict(flops_per_image=2e9, argument_bytes=peaks[batch],
                output_bytes=0, alias_bytes=0, temp_bytes=0,
                xla_peak_bytes=None, peak_bytes=peaks[batch])

  monkeypatch.setattr(plan, "compile_step", lambda *a: None)
  monkeypatch.setattr(plan, "costs", fake_costs)
  r = plan.plan_step(abstract, shapes, "train", BATCH, reserve=0.1,
                     ceiling_tflops=100.0)
  # 0.5 GB per image over 1 GB fixed: (72 - 1) / 0.5 = 142;
  # (126.9 - 1) / 0.5 = 251.8 -> 251.
  assert r["bytes_per_image"] == 0.5e9 and r["fixed_bytes"] == 1e9
  assert r["max_batch_80gb"] == 142 and r["max_batch_141gb"] == 251
  assert r["images_per_s_bound"] == pytest.approx(100e12 / 2e9)
  assert r["views"] == [5, 5] and r["tower_forwards"] == 10


def test_markdown_table():
  rec = dict(command="python -m medbridge_jax.bench --plan", date="d",
             machine="m", cpu_count=2, platform="cpu", device_kind="cpu",
             jax="0", dtype="bfloat16", memory_source="XLA CPU",
             reserve=0.1, ceiling_tflops=0.5, config="b16_224",
             image_size=1024, step="train", batch=32, views=[5, 5],
             flops_per_image=123.4e9, peak_bytes=3 * 2 ** 30,
             bytes_per_image=2 ** 26, max_batch_80gb=7, max_batch_141gb=9,
             images_per_s_bound=4.05)
  table = plan.markdown([rec])
  assert "`python -m medbridge_jax.bench --plan`" in table
  assert ("| b16_224 | 1024 | train | 32 | 5 + 5 | 123.4 | 3.0 | 64 | 7 | "
          "9 | 4.05 |") in table
  header = [l for l in table.splitlines() if l.startswith("| config")][0]
  rule = table.splitlines()[table.splitlines().index(header) + 1]
  assert header.count("|") == rule.count("|")
  rec.update(images_per_s_bound=22512.4)
  assert plan.markdown([rec]).endswith("| 22,512 |")
  rec.update(images_per_s_bound=0.0012596)
  assert plan.markdown([rec]).endswith("| 0.00126 |")


def test_bad_names_and_batches():
  with pytest.raises(UserError, match="--plan_configs='nope'"):
    plan.parse_configs("nope")
  assert plan.parse_configs("all") == tuple(plan.CONFIGS)
  assert plan.parse_configs(" dinov2_b14_518 ") == ("dinov2_b14_518",)
  with pytest.raises(UserError, match="--batch=0"):
    next(plan.run(train_batch=0))
  with pytest.raises(UserError, match="--plan_reserve=1.0"):
    next(plan.run(reserve=1.0))
