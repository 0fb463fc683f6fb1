"""The benchmark package: FLOP count, JSON lines, compile once, transfer
guard, the attention kernel chosen per path, and the commands its docstrings
show. Correctness only: no timings are asserted."""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax import default_config
from medbridge_jax import experts as experts_lib
from medbridge_jax.experts import from_config
from medbridge_jax import optim
from medbridge_jax import sharding
from medbridge_jax import train_step
from medbridge_jax.bench import flops
from medbridge_jax.bench import harness
from medbridge_jax.bench import timing
from medbridge_jax.errors import UserError
from medbridge_jax.experts import layers
from medbridge_jax.experts.vit import VisionConfig
from medbridge_jax.experts.vit import VisionTower
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("name", "date", "machine", "platform", "device_kind", "expert",
          "arch", "batch", "dtype", "images_per_s", "step_ms", "tflops",
          "ceiling_fraction", "overhead_ratio", "peak_memory_bytes",
          "compiles", "views", "experts", "attention_frozen",
          "attention_query")


def _vit(family="clip", **kw):
  cfg = dict(family=family, hidden_size=64, num_layers=4, num_heads=4,
             mlp_dim=256, patch_size=8, image_size=64, act="quick_gelu",
             eps=1e-5)
  cfg.update(kw)
  return VisionConfig(**cfg)


def test_flops_equal_a_hand_count():
  # The "tiny" expert: D=64, L=4, M=256, patch 8 at 64 px: 64 patches + the
  # class token, S=65 tokens.
  #   patch embedding    2 * 64 patches * (8*8*3) * 64       =  1,572,864
  #   q, k, v, out       4 layers * 4 * 2 * 65 * 64 * 64     =  8,519,680
  #   QK^T and AV        4 layers * 2 * 2 * 65 * 65 * 64     =  4,326,400
  #   MLP fc1 and fc2    4 layers * 2 * 2 * 65 * 64 * 256    = 17,039,360
  got = flops.vit_forward_flops(_vit())
  assert got == {"patch_embedding": 1_572_864,
                 "attention_projections": 8_519_680,
                 "attention_mixing": 4_326_400, "mlp": 17_039_360,
                 "total": 31_458_304}
  # SigLIP has no class token (S=64); a larger input has more patches.
  assert flops.vit_forward_flops(_vit("siglip"))["attention_mixing"] == (
      4 * 2 * 2 * 64 * 64 * 64)
  assert flops.vit_forward_flops(_vit(), side=128)["patch_embedding"] == (
      2 * 256 * 192 * 64)
  # ViT-B/16 at 224: ~35.1 GFLOP, i.e. ~22.5k images/s at 790 TFLOP/s
  # (the shared notes' figure for the H200).
  b16 = flops.vit_forward_flops(_vit(hidden_size=768, num_layers=12,
                                     num_heads=12, mlp_dim=3072,
                                     patch_size=16, image_size=224))
  assert 35.0e9 < b16["total"] < 35.2e9
  assert 22.4e3 < 790e12 / b16["total"] < 22.6e3


def test_measure_counts_compiles_and_guards_transfers():
  f = jax.jit(lambda x: x * 2)
  x, y = jnp.ones(4), jnp.ones(5)
  t = timing.measure(lambda: f(x), steps=3, warmup=2)
  assert t.compiles == 1 and len(t.seconds) == 3
  with timing.CompileCounter() as counter:
    f(x)  # Cached: no compile.
    f(y)  # A new shape: one compile.
    f(y)
  assert counter.count == 1
  # Timed calls run under transfer_guard("disallow"): an input still on the
  # host is refused instead of being copied on every step.
  with pytest.raises(Exception, match="Disallowed host-to-device"):
    timing.measure(lambda: f(np.ones(4, np.float32)), steps=1, warmup=1)


def test_choose_attention(monkeypatch):
  bf16, f32 = jnp.bfloat16, jnp.float32

  def pick(impl, dtype=bf16, head_dim=64, differentiated=False,
           masked=False, self_attention=True):
    return layers.choose_attention(impl, dtype, head_dim,
                                   differentiated=differentiated,
                                   masked=masked,
                                   self_attention=self_attention)

  assert pick(None) is None
  assert pick("xla") == "xla"
  assert pick("auto") == "xla"  # On this CPU.
  with pytest.raises(UserError, match="attention implementation"):
    pick("flash")
  monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: True)
  assert pick("auto") == "cudnn"
  assert pick("auto", differentiated=True) == "xla"
  assert pick("auto", dtype=f32) == "xla"
  assert pick("auto", head_dim=12) == "xla"
  assert pick("auto", masked=True) == "xla"
  assert pick("auto", self_attention=False) == "xla"  # SigLIP's pooling.
  assert pick("cudnn") == "cudnn"
  assert pick("cudnn", differentiated=True) == "xla"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("mode", ["non_destructive", "joint"])
def test_no_backward_runs_through_a_cudnn_path(mode, cache, monkeypatch):
  """On a (simulated) GPU the train step gives cuDNN to the frozen stream
  and never differentiates it: a stand-in kernel whose backward raises is
  traced through the real train step (jax.eval_shape: nothing compiles)."""
  monkeypatch.setenv("MEDBRIDGE_CACHE", cache)
  specs = ("clip:width=32,layers=3,heads=2,patch=8,image=32,text_layers=1",
           "siglip:width=32,layers=3,heads=2,patch=8,image=32,text_layers=1")
  experts = [experts_lib.load(from_config.random_expert_folder(s, i))
             for i, s in enumerate(specs)]
  c = default_config.get_default()
  c.model.compute_dtype = "bfloat16"
  c.model.attention_impl = "auto"
  c.model.queries.mode = mode
  c.model.head.text_init = False
  c.model.focal.crop_size = 32
  c.model.focal.num_local = 1
  c.data.image_size = 64
  labels = ("a", "b")
  model = medbridge.build(c, experts, labels)
  images = jax.ShapeDtypeStruct((8, 64, 64), jnp.uint8)
  key = jax.random.key(0)
  params = jax.eval_shape(lambda x: model.init(
      {"params": key, "focal": key}, x, train=True)["params"], images)
  trainable, frozen = partition.split(params)
  tx = optim.make(c.train)
  step = train_step.make_train_step(model, tx, optim.schedule(c.train), c,
                               sharding.make_mesh(c.mesh))
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
               opt_state=jax.eval_shape(tx.init, trainable))
  batch = dict(image=images,
               targets=jax.ShapeDtypeStruct((8, 2), jnp.float32),
               mask=jax.ShapeDtypeStruct((8, 2), jnp.float32))

  real = jax.nn.dot_product_attention

  @jax.custom_vjp
  def fake_cudnn(q, k, v):
    return real(q, k, v, implementation="xla")

  def fwd(q, k, v):
    return fake_cudnn(q, k, v), None

  def bwd(res, g):
    raise AssertionError("a backward pass ran through a cuDNN attention")

  fake_cudnn.defvjp(fwd, bwd)
  seen, odd = [], []

  def attention(q, k, v, mask=None, implementation=None, **kw):
    seen.append(implementation)
    if implementation == "cudnn":
      # Only the image tokens' self-attention, unmasked, in bf16.
      if mask is not None or q.dtype != jnp.bfloat16 or q.shape != k.shape:
        odd.append((q.shape, k.shape, q.dtype, mask is not None))
      return fake_cudnn(q, k, v)
    return real(q, k, v, mask=mask, implementation=implementation, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", attention)
  monkeypatch.setattr(layers, "_on_nvidia_gpu", lambda: True)
  jax.eval_shape(step, state, frozen, batch, None)
  assert "cudnn" in seen and "xla" in seen
  assert not odd, odd

  # Control: the stand-in does catch a backward when cuDNN is forced onto
  # the differentiated paths too.
  choose = layers.choose_attention
  monkeypatch.setattr(layers, "choose_attention", lambda impl, *a, **kw: (
      "cudnn" if impl == "auto" else choose(impl, *a, **kw)))
  with pytest.raises(AssertionError, match="backward pass"):
    # A new function: eval_shape would reuse the first trace of `step`.
    jax.eval_shape(lambda *a: step(*a), state, frozen, batch, None)


def test_parse_what_adds_what_each_measurement_needs():
  assert harness.parse_what("all") == harness.WHAT
  # train and eval are held to the forward, the forward to the matmul; the
  # order is always the run order, whatever the flag's.
  assert harness.parse_what("eval, train") == (
      "matmul", "forward", "train", "eval")
  assert harness.parse_what("forward") == ("matmul", "forward")
  assert harness.parse_what("pipeline,matmul") == ("matmul", "pipeline")
  for bad in ("bogus", "train,bogus", " , "):
    with pytest.raises(UserError, match="--what="):
      harness.parse_what(bad)


def test_every_command_in_the_bench_docstrings_exists():
  """Each standalone benchmark's docstring shows the command that runs it,
  and every `python -m` command the package's docstrings show names a
  module that exists."""
  folder = os.path.join(ROOT, "medbridge_jax", "bench")
  standalone = set()
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(folder, name)) as f:
      tree = ast.parse(f.read())
    doc = ast.get_docstring(tree) or ""
    assert "benchmarks/" not in doc and "bench_lib" not in doc, name
    for module in re.findall(r"python -m ([\w.]+)", doc):
      if module != module.lower():
        continue  # A placeholder, such as medbridge_jax.bench.NAME.
      assert importlib.util.find_spec(module) is not None, (name, module)
    if name != "__main__.py" and any(
        isinstance(n, ast.FunctionDef) and n.name == "main"
        for n in tree.body):
      standalone.add(name[:-3])
      assert f"python -m medbridge_jax.bench.{name[:-3]} " in doc, name
  assert standalone == {"decode_speed", "evidence_cost", "focal_probe",
                        "focal_zoom", "index_speed"}


def test_cli_prints_json_lines(cache):
  env = dict(os.environ, MEDBRIDGE_CACHE=cache, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "medbridge_jax.bench", "--expert=tiny",
         "--batch=8", "--views=2", "--experts=1", "--image_size=128",
         "--steps=2", "--warmup=1", "--what=all", "--pipeline_images=4",
         "--pipeline_workers=1", "--input_size=256"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  by_name = {r["name"]: r for r in lines}
  assert list(by_name) == ["matmul", "forward", "train", "eval", "pipeline"]
  for r in lines:
    assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
    assert r["platform"] == "cpu" and r["batch"] == 8
    assert r["dtype"] == "float32" and r["expert"] == "tiny"
    assert r["peak_memory_bytes"] is None  # The CPU does not report it.
  assert by_name["matmul"]["tflops"] > 0
  for name in ("forward", "train", "eval"):
    r = by_name[name]
    assert r["images_per_s"] > 0 and r["step_ms"] > 0
    assert r["tflops"] > 0 and r["ceiling_fraction"] > 0
    # Warm-up + 2 timed calls of the same shapes: compiled once, and the
    # timed calls ran under transfer_guard("disallow").
    assert r["compiles"] == 1, r
    assert r["transfer_guard"] == "disallow"
    assert r["attention_frozen"] == r["attention_query"] == "xla"
    assert r["experts"] == 1
  assert by_name["forward"]["overhead_ratio"] is None
  assert by_name["train"]["views"] == 2
  # 128 px, 64 px windows overlapping 25%: 3 x 3 windows + the global view.
  assert by_name["eval"]["views"] == 10
  assert by_name["train"]["overhead_ratio"] > 0
  assert by_name["eval"]["overhead_ratio"] > 0
  p = by_name["pipeline"]
  assert p["workers"] == 1 and p["input_size"] == 256
  assert p["images_per_s"] > 0 and p["images_per_s_per_worker"] > 0
  assert p["workers_to_feed_train"] >= 1


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_bf16_frozen_stream_keeps_float32_params():
  """--dtype=bfloat16: every matmul and conv of the tower runs in bf16 on
  float32 params cast at use."""
  tower = VisionTower(_vit(num_layers=2), dtype=jnp.bfloat16,
                      attention_impl="auto")
  pixels = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(tower.init, jax.random.key(0), pixels)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  closed = jax.make_jaxpr(lambda p, x: tower.apply(p, x)[0])(params, pixels)
  heavy = [e for e in _equations(closed.jaxpr)
           if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert len(heavy) > 10
  for e in heavy:
    assert {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}, e


def test_pipeline_shards_read_what_the_raw_files_decode_to(tmp_path):
  """The "shards" measurement times records equal to decoding the data
  set's own files at the working side (what the pipeline would read)."""
  from medbridge_jax.bench import input_speed  # pylint: disable=g-import-not-at-top
  from medbridge_jax.data import images, tfds_builders  # pylint: disable=g-import-not-at-top
  data_dir = input_speed.write_shards(str(tmp_path), 64)
  index = tfds_builders.prepared_index("synthetic", data_dir, "train", 64)
  root = os.path.join(str(tmp_path), "generated")
  root = os.path.join(root, os.listdir(root)[0])
  n, read = input_speed._reader(data_dir, 64)  # pylint: disable=protected-access
  assert n == len(index) > 0
  for i in (0, n - 1):
    want = images.read_image(os.path.join(root, index.paths[i]), 64)
    np.testing.assert_array_equal(read(i), want)
