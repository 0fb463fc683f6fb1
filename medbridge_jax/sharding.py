"""The device mesh, the shardings on it, and multi-host start-up.

Data parallel only: one mesh axis, "data". Batches are split over it along
their first dimension; parameters and optimizer state are replicated. The
mesh uses Auto axis types so XLA's partitioner places the collectives (the
default Explicit axes of `jax.make_mesh` would ask for out_shardings on every
contraction over a sharded dimension).
"""

import os
from typing import Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from medbridge_jax import errors

DATA = "data"  # The one mesh axis.


def multihost_requested(env: Mapping[str, str] = os.environ) -> bool:
  """Whether this process is one of several launched together.

  True when asked explicitly (MEDBRIDGE_MULTIHOST=1, set by launch/), when a
  coordinator is named (JAX_COORDINATOR_ADDRESS), or when SLURM started more
  than one task. A single process never initialises: it would wait forever
  for peers.
  """
  flag = env.get("MEDBRIDGE_MULTIHOST", "").strip().lower()
  if flag in ("0", "false", "no"):
    return False
  if flag in ("1", "true", "yes"):
    return True
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  try:
    return int(env.get("SLURM_NTASKS", "1")) > 1
  except ValueError:
    return False


def distributed_arguments(env: Mapping[str, str] = os.environ
                          ) -> dict[str, int]:
  """`num_processes` / `process_id` from JAX_NUM_PROCESSES / JAX_PROCESS_ID.

  JAX reads JAX_COORDINATOR_ADDRESS itself, but the process count and id
  only from a cluster manager (SLURM, Open MPI, TPU metadata): a launch
  that names the coordinator by hand gives them in these two variables.
  Unset ones are left to JAX; a non-integer is a UserError naming it.
  """
  out = {}
  for var, arg in (("JAX_NUM_PROCESSES", "num_processes"),
                   ("JAX_PROCESS_ID", "process_id")):
    value = env.get(var, "").strip()
    if not value:
      continue
    try:
      out[arg] = int(value)
    except ValueError:
      raise errors.UserError(
          f"{var}={value!r} is not an integer") from None
  return out


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> bool:
  """Calls `jax.distributed.initialize()` on multi-host launches only.

  JAX finds the coordinator and this process's id itself (TPU metadata,
  SLURM variables), or from JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES
  and JAX_PROCESS_ID (`distributed_arguments`). On CPU the processes talk
  through gloo (JAX's default `jax_cpu_collectives_implementation`). Must
  run before any other JAX call.

  Returns:
    Whether it initialised.
  """
  if not multihost_requested(env):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_arguments(env)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # Nothing names the coordinator or the processes.
    raise errors.UserError(
        f"multi-host start-up: {errors.one_line(e)} (launch under SLURM or "
        f"on a TPU pod, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
        f"and JAX_PROCESS_ID; MEDBRIDGE_MULTIHOST=0 runs one process)"
    ) from None
  logging.info("jax.distributed: process %d of %d, %d local / %d devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def make_mesh(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D mesh over `mesh_config.data` devices (-1 = all) named "data"."""
  devices = jax.devices()
  n = int(mesh_config.data)
  if n == -1:
    n = len(devices)
  if n < 1 or n > len(devices):
    raise errors.UserError(
        f"config.mesh.data={mesh_config.data} but {len(devices)} device(s) "
        f"are available (use -1 for all)")
  if n != len(devices) and jax.process_count() > 1:
    raise errors.UserError(
        "config.mesh.data must be -1 (all devices) on multi-host runs")
  return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) dimension split over "data", the rest whole."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str,
                     grad_accum: int = 1) -> None:
  """UserError unless each micro-batch splits evenly over the data axis."""
  n = mesh.shape[DATA]
  if batch_size % grad_accum:
    raise errors.UserError(
        f"{what}={batch_size} is not divisible by "
        f"config.train.grad_accum={grad_accum}")
  if (batch_size // grad_accum) % n:
    raise errors.UserError(
        f"{what}={batch_size} (per micro-batch {batch_size // grad_accum}) "
        f"is not divisible by the {n} devices of the mesh")


def host_batch_size(global_batch_size: int,
                    process_count: int | None = None) -> int:
  """This process's share of a global batch; UserError if it does not divide.

  `process_count` defaults to `jax.process_count()`.
  """
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise errors.UserError(
        f"batch size {global_batch_size} is not divisible by the "
        f"{count} processes")
  return global_batch_size // count


def to_global(batch, mesh: jax.sharding.Mesh):
  """Host-local numpy batch (this process's rows) -> global sharded arrays.

  The global batch is the hosts' local batches stacked in host order, rows
  split over the "data" axis; each host's rows live on its own devices.
  """
  sharding = batch_sharding(mesh)
  local_devices = sum(1 for d in mesh.devices.flat
                      if d.process_index == jax.process_index())

  def one(x):
    x = np.asarray(x)
    if x.shape[0] % max(1, local_devices):
      raise errors.UserError(
          f"host batch of {x.shape[0]} rows does not split over this "
          f"host's {local_devices} devices; choose a batch size divisible by "
          "the number of devices")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(one, batch)
