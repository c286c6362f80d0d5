"""Device mesh, shardings and host<->global arrays: the one place for them.

Data parallelism is expressed with ``jax.jit`` over a ``('data',)`` mesh:
parameters and optimizer state are replicated, batches are split on their
first axis. XLA inserts the gradient all-reduce itself, so the train step is
written as if for one device.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-process run when one is configured; a no-op otherwise.

  With explicit arguments (or the ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` environment variables) this calls
  ``jax.distributed.initialize``; on SLURM and TPU pods JAX detects the rest
  itself when ``DEEPREC_DISTRIBUTED=auto`` is set.

  Args:
    coordinator_address: ``host:port`` of process 0.
    num_processes: total number of processes.
    process_id: this process's index in ``[0, num_processes)``.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError("a multi-process run needs the coordinator address, the number of "
                       "processes and this process's id; got "
                       f"{coordinator_address=}, {num_processes=}, {process_id=}.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif os.environ.get("DEEPREC_DISTRIBUTED") == "auto":
    jax.distributed.initialize()  # SLURM / TPU pod auto-detection.
  else:
    return
  logging.info("joined a %d-process run as process %d with %d local devices",
               jax.process_count(), jax.process_index(), jax.local_device_count())


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D ``('data',)`` mesh over the first ``num_devices`` devices (0 = all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"config key train.num_devices={num_devices} but only "
                       f"{len(devices)} devices are visible.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: split along its first (example) axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a clear error unless the batch splits evenly over the mesh."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices or global_batch_size % jax.process_count():
    raise ValueError(f"config key {key}={global_batch_size} must be divisible by the "
                     f"number of devices ({num_devices}) and processes "
                     f"({jax.process_count()}).")


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into one global, sharded array."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
