r"""Plans of real configurations, compiled ahead of time from shapes alone.

  python -m medbridge_jax.bench --plan
  python -m medbridge_jax.bench --plan --plan_configs=b16_224 \
      --image_size=1024 --plan_format=markdown

For each named configuration (`CONFIGS`: published experts' architectures,
from `expert_sizes.PUBLISHED`) on stored images of each side in
`IMAGE_SIZES`, the MedBridge train step and evaluation step of the default
config are built from experts whose weights are ShapeDtypeStructs (nothing
is downloaded or allocated), lowered on abstract arguments and compiled for
this process's first device (`jax.jit(...).lower(...).compile()`). Per step:

  views              per expert, views per image (focal_sampling.describe)
  flops_per_image    the compiled step's `cost_analysis()["flops"]` / batch
                     (XLA's count: every op, the backward and AdamW of the
                     train step included)
  peak_bytes         per device at the batch: `memory_analysis()`'s
                     argument + output + temp - alias bytes: the
                     arguments and outputs are held throughout, temp is
                     the one arena XLA packs every temporary into by
                     liveness, and an aliased (donated) argument is its
                     output's buffer, counted once. `xla_peak_bytes` is
                     XLA's `peak_memory_in_bytes` as reported (on XLA
                     CPU about the arguments alone: not used)
  max_batch_*        the largest batch per device under each GPU size
                     minus the reserve, from the line through peak_bytes
                     at two batches (memory is affine in the batch)
  images_per_s_bound the measured bf16 matmul ceiling (the harness's
                     matmul) / flops_per_image: an upper bound, never a
                     measured speed

Per device: a one-device mesh, as each device of a data-parallel run holds
the replicated parameters and state and its share of the batch (the
gradient all-reduce's buffers are not in it). Memory and FLOPs are those of
the compiler of the device the plan ran on (`platform`, `device_kind`): on
a CPU, XLA CPU's buffer assignment, which upcasts bf16 matmuls to float32
temporaries and fuses differently from XLA GPU; plan on the GPU for its
own figures.
"""

import dataclasses
import time
from typing import Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from medbridge_jax import default_config
from medbridge_jax import errors
from medbridge_jax import evaluate
from medbridge_jax import methods
from medbridge_jax import optim
from medbridge_jax import sharding
from medbridge_jax import train_state
from medbridge_jax import train_step as train_step_lib
from medbridge_jax.bench import expert_sizes
from medbridge_jax.bench import harness
from medbridge_jax.bench import model_steps
from medbridge_jax.bench import timing
from medbridge_jax.experts import expert as expert_lib
from medbridge_jax.experts.preprocessing import FAMILY_MEAN_STD
from medbridge_jax.experts.vit import VisionConfig
from medbridge_jax.experts.vit import VisionTower
from medbridge_jax.model import focal_sampling
from medbridge_jax.model import medbridge
from medbridge_jax.model import partition

STEPS = ("train", "eval")
IMAGE_SIZES = (1024, 2048)  # Stored image sides planned by default.
# GPU memory sizes (decimal GB, as sold: 80 GB H100 / A100, 141 GB H200;
# each reports a little more to the driver, so these are conservative).
GPU_GB = (80, 141)
# Fraction of a GPU's memory kept free: the CUDA context, cuDNN / cuBLAS
# workspaces and fragmentation. JAX preallocates 75% by default; a planned
# batch above that needs XLA_PYTHON_CLIENT_MEM_FRACTION=0.9.
RESERVE = 0.10
MEMORY_FIELDS = "argument + output + temp - alias"


@dataclasses.dataclass(frozen=True)
class ExpertShape:
  """One expert as the plan sees it: a tower architecture and the input
  side its views are cut to (positions are interpolated when it differs
  from `vision.image_size`)."""
  name: str
  vision: VisionConfig
  side: int


def _published(name: str, side: Optional[int] = None) -> ExpertShape:
  for p in expert_sizes.PUBLISHED:
    if p.name == name:
      return ExpertShape(name, p.vision, int(side or p.vision.image_size))
  raise KeyError(f"{name!r} is not in expert_sizes.PUBLISHED")


# Named configurations: experts in order (expert_0, expert_1, ...).
CONFIGS = {
    "b16_224": (_published("CLIP ViT-B/16"), _published("SigLIP B/16-224")),
    # Both read 448 px views (32 x 32 patches) with interpolated positions.
    "l14_so400m_448": (_published("CLIP ViT-L/14-336", 448),
                       _published("SigLIP So400m/14-384", 448)),
    # DINOv2-B/14 (RAD-DINO is that architecture): vision-only, so its head
    # starts without text initialisation.
    "dinov2_b14_518": (dataclasses.replace(
        _published("RAD-DINO"), name="DINOv2-B/14"),),
}


def parse_configs(names: str) -> Tuple[str, ...]:
  """The configuration names of a comma-separated list, or "all"."""
  if names.strip() == "all":
    return tuple(CONFIGS)
  out = tuple(n.strip() for n in names.split(",") if n.strip())
  unknown = [n for n in out if n not in CONFIGS]
  if unknown or not out:
    raise errors.UserError(f"--plan_configs={names!r}: use all or a "
                           f"comma-separated subset of {','.join(CONFIGS)}")
  return out


def make_config(image_size: int, *, train_batch: int, eval_batch: int,
                dtype: str = "bfloat16", attention: str = "auto"
                ) -> ml_collections.ConfigDict:
  """The default config on `image_size` px images, batches per device.

  Heads start without text initialisation (nothing to embed prompts with;
  it does not change a step's cost). One device on the mesh.
  """
  c = default_config.get_default()
  c.data.image_size = int(image_size)
  c.model.compute_dtype = dtype
  c.model.attention_impl = attention
  c.model.head.text_init = False
  c.train.batch_size = int(train_batch)
  c.eval.batch_size = int(eval_batch)
  c.mesh.data = 1
  return c


def abstract_expert(shape: ExpertShape) -> expert_lib.Expert:
  """An `Expert` whose vision weights are ShapeDtypeStructs (float32, as
  `experts.load` keeps them) and which has no text tower."""
  v = shape.vision
  tower = VisionTower(v)
  pixels = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3),
                                jnp.float32)
  params = jax.eval_shape(tower.init, jax.random.key(0), pixels)["params"]
  mean, std = FAMILY_MEAN_STD.get(v.family, FAMILY_MEAN_STD["clip"])
  return expert_lib.Expert(
      name=shape.name, path="", family=v.family, image_size=int(shape.side),
      image_mean=mean, image_std=std, vision=tower, text=None,
      params={"vision": params}, max_length=0, format="abstract",
      vision_only_reason="planned from shapes, no weights")


@dataclasses.dataclass
class Abstract:
  """A built model with its parameters as ShapeDtypeStructs."""
  config: ml_collections.ConfigDict
  model: medbridge.MedBridge
  mesh: jax.sharding.Mesh
  trainable: dict
  frozen: dict

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)


def build(config: ml_collections.ConfigDict,
          shapes: Sequence[ExpertShape]) -> Abstract:
  """`config`'s method around abstract experts of `shapes`."""
  experts = [abstract_expert(s) for s in shapes]
  model = methods.build(config, experts, model_steps.LABELS)
  mesh = sharding.make_mesh(config.mesh)
  params = medbridge.abstract_params(model, int(config.data.image_size))
  trainable, frozen = partition.split(
      params, methods.partition_rules(config, experts))
  return Abstract(config, model, mesh, trainable, frozen)


def views(config: ml_collections.ConfigDict, shapes: Sequence[ExpertShape],
          step: str) -> list:
  """Per expert, views per image in a train or eval step."""
  rows = focal_sampling.describe(int(config.data.image_size),
                                 [s.side for s in shapes], config.model.focal)
  return [r["train_views" if step == "train" else "eval_views"]
          for r in rows]


def _on(x, where) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)


def step_args(a: Abstract, step: str, batch: int) -> tuple:
  """Abstract arguments of a train step ((state, frozen, batch, None)) or
  an eval step ((trainable, frozen, images)) at `batch` images."""
  replicated = sharding.replicated(a.mesh)
  rows = sharding.batch_sharding(a.mesh)
  size = a.image_size
  images = jax.ShapeDtypeStruct((batch, size, size), jnp.uint8,
                                sharding=rows)
  frozen = jax.tree.map(lambda x: _on(x, replicated), a.frozen)
  if step == "eval":
    trainable = jax.tree.map(lambda x: _on(x, replicated), a.trainable)
    return trainable, frozen, images
  state = train_state.abstract(a.trainable, optim.make(a.config.train),
                               replicated)
  labels = jax.ShapeDtypeStruct((batch, len(model_steps.LABELS)),
                                jnp.float32, sharding=rows)
  return state, frozen, dict(image=images, targets=labels, mask=labels), None


def jitted(a: Abstract, step: str):
  """The step jitted as training (`train._jitted_step`: state donated and
  kept replicated) and evaluation (`evaluate.make_model_fn`) jit it."""
  if step == "eval":
    return evaluate.make_model_fn(a.model)
  c, replicated = a.config, sharding.replicated(a.mesh)
  state = train_state.abstract(a.trainable, optim.make(c.train))
  return jax.jit(
      train_step_lib.make_train_step(a.model, optim.make(c.train),
                                     optim.schedule(c.train), c, a.mesh),
      donate_argnums=(0,),
      out_shardings=(jax.tree.map(lambda _: replicated, state), replicated))


def compile_step(a: Abstract, step: str, batch: int) -> jax.stages.Compiled:
  """The step compiled ahead of time for `batch` images per device."""
  if step not in STEPS:
    raise ValueError(f"step {step!r} not in {STEPS}")
  return jitted(a, step).lower(*step_args(a, step, batch)).compile()


def costs(compiled: jax.stages.Compiled, batch: int) -> dict:
  """FLOPs per image and the memory fields of a compiled step."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0]
  m = compiled.memory_analysis()
  out = dict(flops_per_image=float(cost["flops"]) / batch,
             argument_bytes=int(m.argument_size_in_bytes),
             output_bytes=int(m.output_size_in_bytes),
             alias_bytes=int(m.alias_size_in_bytes),
             temp_bytes=int(m.temp_size_in_bytes),
             xla_peak_bytes=getattr(m, "peak_memory_in_bytes", None))
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                       + out["temp_bytes"] - out["alias_bytes"])
  return out


def largest_batch(b1: int, m1: int, b2: int, m2: int, budget: int) -> int:
  """The largest batch b with m(b) <= budget on the line through (b1, m1)
  and (b2, m2) (bytes at batches b1 < b2); 0 when not even one image fits
  the budget. Integer arithmetic: exact at the boundary."""
  if not b1 < b2:
    raise ValueError(f"batches must increase: {b1}, {b2}")
  if m2 <= m1:
    raise ValueError(f"memory must grow with the batch: {m1} bytes at {b1}, "
                     f"{m2} at {b2}")
  # m(b) = m1 + (b - b1) * (m2 - m1) / (b2 - b1) <= budget.
  return max(0, b1 + ((budget - m1) * (b2 - b1)) // (m2 - m1))


def _budget(gb: float, reserve: float) -> int:
  return int(gb * 1e9 * (1.0 - reserve))


def plan_step(a: Abstract, shapes: Sequence[ExpertShape], step: str,
              batch: int, *, reserve: float = RESERVE,
              ceiling_tflops: Optional[float] = None) -> dict:
  """One step's record: views, FLOPs per image, memory at `batch` and at
  twice it, the batch that fits each of `GPU_GB`, the throughput bound."""
  start = time.perf_counter()
  at = costs(compile_step(a, step, batch), batch)
  at2 = costs(compile_step(a, step, 2 * batch), 2 * batch)
  seconds = time.perf_counter() - start
  per_image = (at2["peak_bytes"] - at["peak_bytes"]) / batch
  per_view = views(a.config, shapes, step)
  out = dict(step=step, batch=batch, views=per_view,
             tower_forwards=sum(per_view), **at,
             memory_fields=MEMORY_FIELDS, fit_batch=2 * batch,
             fit_peak_bytes=at2["peak_bytes"],
             bytes_per_image=per_image,
             fixed_bytes=at["peak_bytes"] - per_image * batch,
             reserve=reserve)
  for gb in GPU_GB:
    out[f"max_batch_{gb}gb"] = largest_batch(
        batch, at["peak_bytes"], 2 * batch, at2["peak_bytes"],
        _budget(gb, reserve))
  out["ceiling_tflops"] = ceiling_tflops
  out["images_per_s_bound"] = (
      None if not ceiling_tflops else
      ceiling_tflops * 1e12 / at["flops_per_image"])
  out["compile_s"] = round(seconds, 1)
  return out


def ceiling(dtype: str, matmul_size: int, steps: int, warmup: int) -> float:
  """The harness's matmul ceiling (TFLOP/s) on this process's device."""
  (record,) = harness.run(what="matmul", dtype=dtype, steps=steps,
                          warmup=warmup, matmul_size=matmul_size)
  return float(record["ceiling_tflops"])


def memory_source() -> str:
  """What the memory figures are, on this process's device."""
  d = jax.local_devices()[0]
  if d.platform == "cpu":
    return ("XLA CPU buffer assignment (bf16 matmuls run in float32 "
            "temporaries; not a GPU's figure)")
  return f"XLA {d.platform.upper()} buffer assignment ({d.device_kind})"


def run(*, names: Sequence[str] = tuple(CONFIGS),
        image_sizes: Sequence[int] = IMAGE_SIZES, train_batch: int = 32,
        eval_batch: int = 0, dtype: str = "bfloat16",
        attention: str = "auto", reserve: float = RESERVE,
        matmul_size: int = 0, steps: int = 10, warmup: int = 2,
        command: str = "") -> Iterator[dict]:
  """One record per configuration, image size and step, as each is
  planned. `eval_batch` 0: the default config's."""
  eval_batch = eval_batch or int(default_config.get_default().eval.batch_size)
  if train_batch < 1 or eval_batch < 1:
    raise errors.UserError(f"--batch={train_batch} and --plan_eval_batch="
                           f"{eval_batch} must be >= 1")
  if not 0.0 <= reserve < 1.0:
    raise errors.UserError(f"--plan_reserve={reserve} must be in [0, 1)")
  top = ceiling(dtype, matmul_size, steps, warmup)
  base = dict(timing.machine(), name="plan", command=command, dtype=dtype,
              attention=attention, memory_source=memory_source())
  for name in names:
    shapes = CONFIGS[name]
    for size in image_sizes:
      config = make_config(size, train_batch=train_batch,
                           eval_batch=eval_batch, dtype=dtype,
                           attention=attention)
      a = build(config, shapes)
      for step in STEPS:
        batch = train_batch if step == "train" else eval_batch
        yield dict(base, config=name, experts=[s.name for s in shapes],
                   expert_sides=[s.side for s in shapes], image_size=size,
                   **plan_step(a, shapes, step, batch, reserve=reserve,
                               ceiling_tflops=top))


def _gib(x: float) -> str:
  return f"{x / 2**30:,.1f}"


def _rate(x: Optional[float]) -> str:
  """Images/s: whole above 100, else three significant digits (a CPU's
  bound is a fraction of one)."""
  if x is None:
    return "-"
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def markdown(records: Sequence[dict]) -> str:
  """A markdown table of `run`'s records, headed by command, machine, date
  and device."""
  if not records:
    return "(no configurations planned)"
  r0 = records[0]
  gpus = " | ".join(f"max batch {gb} GB" for gb in GPU_GB)
  lines = [
      f"Plan: `{r0['command']}`, {r0['date']}, machine {r0['machine']} "
      f"({r0['cpu_count']} CPUs), compiled for {r0['platform']} "
      f"({r0['device_kind']}), jax {r0['jax']}, {r0['dtype']}.",
      f"Memory per device: {r0['memory_source']}; peak = {MEMORY_FIELDS} "
      f"of `memory_analysis()`; max batch from the line through two "
      f"batches, {r0['reserve']:.0%} of each GPU kept free. images/s: an "
      f"upper bound, the matmul ceiling ({r0['ceiling_tflops']:.3f} "
      f"TFLOP/s here) / FLOPs per image.", "",
      f"| config | image px | step | batch / device | views per expert | "
      f"GFLOP / image | peak GiB / device | MiB / image | {gpus} | "
      f"images/s bound |",
      "| --- " * (9 + len(GPU_GB)) + "|"]
  for r in records:
    fits = " | ".join(str(r[f"max_batch_{gb}gb"]) for gb in GPU_GB)
    lines.append(
        f"| {r['config']} | {r['image_size']} | {r['step']} | {r['batch']} | "
        f"{' + '.join(str(v) for v in r['views'])} | "
        f"{r['flops_per_image'] / 1e9:,.1f} | {_gib(r['peak_bytes'])} | "
        f"{r['bytes_per_image'] / 2**20:,.0f} | {fits} | "
        f"{_rate(r['images_per_s_bound'])} |")
  return "\n".join(lines)
