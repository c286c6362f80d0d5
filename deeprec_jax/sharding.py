"""Device mesh, shardings and host<->global arrays: the one place for them.

The mesh has two axes, ``('data', 'model')``:

* batches are split over ``'data'`` on their first (example) axis;
* the item embedding table ``params['item_embed']['embedding']`` and its
  optimizer moments are split by rows over ``'model'``, so a catalogue of
  ``N`` items costs ``N * d / model_size`` floats per device instead of
  ``N * d``;
* every other parameter is replicated.

Everything is expressed with ``jax.jit`` and ``NamedSharding``; XLA inserts
the collectives (the gradient all-reduce over ``'data'``, the log-sum-exp and
rank counts over ``'model'``), so the train and eval steps are written as if
for one device. With the default model axis of size 1 this is plain data
parallelism with replicated parameters.

The table is created with its rows rounded up to a multiple of
``item_embedding.ROW_MULTIPLE``, so every model axis that divides that
multiple splits it evenly and nothing here pads or cuts it.

Multi-process runs (``initialize_distributed``): the mesh spans the devices
of all processes, ``'model'`` innermost so that its collectives stay within a
host when ``model_parallel`` is at most the devices per host. Each process
loads only the rows of every global batch that its devices hold
(``batch_block``) and ``to_global`` assembles the global array from them.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deeprec_jax.models import item_embedding

DATA_AXIS = "data"
MODEL_AXIS = "model"


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


def make_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
  """A ``('data', 'model')`` mesh over the first ``num_devices`` devices (0 = all).

  Args:
    num_devices: ``config.train.num_devices``; 0 = every visible device.
    model_parallel: ``config.train.model_parallel``, the size of the
      ``'model'`` axis; the ``'data'`` axis gets the rest.

  Returns:
    A mesh of shape ``(devices // model_parallel, model_parallel)``. Its axes
    are ``Auto``: XLA propagates shardings from the jit boundaries inward.
  """
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"config key train.num_devices={num_devices} but only "
                       f"{len(devices)} devices are visible.")
    devices = devices[:num_devices]
  if model_parallel < 1 or len(devices) % model_parallel:
    raise ValueError(f"config key train.model_parallel={model_parallel} must be a positive "
                     f"divisor of the {len(devices)} devices in the mesh "
                     f"(train.num_devices={num_devices}, 0 = all).")
  if item_embedding.ROW_MULTIPLE % model_parallel:
    raise ValueError(f"config key train.model_parallel={model_parallel} must divide "
                     f"{item_embedding.ROW_MULTIPLE}, the multiple the item table's rows "
                     "are padded to (models/item_embedding.py).")
  shape = (len(devices) // model_parallel, model_parallel)
  # jax.make_mesh orders devices for the physical topology (TPU rings, GPUs by
  # id); process-major on CPU and GPU, so 'model' stays within a process.
  return jax.make_mesh(shape, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device: scalars, metrics, every parameter but the item table."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: split along its first (example) axis over ``'data'``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def item_table_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of the item table ``[rows, d]`` (or a ``[rows]`` moment): rows over ``'model'``."""
  return NamedSharding(mesh, PartitionSpec(MODEL_AXIS, *(None,) * (ndim - 1)))


def _is_item_table(path: tuple[Any, ...], leaf: Any) -> bool:
  table_path = item_embedding.ITEM_TABLE
  names = tuple(getattr(key, "key", None) for key in path[-len(table_path):])
  return names == table_path and len(np.shape(leaf)) in (1, 2)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
  """The sharding of every leaf of params, optimizer state or a whole train state.

  The rule: a 2-D leaf at ``...['item_embed']['embedding']`` (the table itself
  and the moments an optimizer keeps per parameter, whose trees mirror
  params), or a 1-D one there (row-wise Adagrad's one moment per row), is
  split by rows over ``'model'``; everything else is replicated.

  Args:
    tree: a pytree of arrays or ``jax.ShapeDtypeStruct``s.
    mesh: from ``make_mesh``.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``tree``.
  """
  def rule(path, leaf):
    if _is_item_table(path, leaf):
      return item_table_sharding(mesh, len(np.shape(leaf)))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(rule, tree)


def shard(tree: Any, mesh: Mesh) -> Any:
  """Places params, optimizer or train state on the mesh by ``param_shardings``.

  Every process must pass the same values (true of a seeded init).
  """
  return jax.device_put(tree, param_shardings(tree, mesh))


def check_batch_size(global_batch_size: int, mesh: Mesh, key: str) -> None:
  """Raises a clear error unless the batch splits evenly over ``'data'`` (hence processes)."""
  data_size = mesh.shape[DATA_AXIS]
  if global_batch_size % data_size:
    raise ValueError(f"config key {key}={global_batch_size} must be divisible by the "
                     f"size of the 'data' mesh axis ({data_size} = devices / "
                     "train.model_parallel).")


def batch_block(mesh: Mesh) -> tuple[int, int]:
  """Which rows of every global batch this process feeds: ``(index, count)``.

  The batch is cut into ``count`` equal blocks and this process loads block
  ``index`` (the pipeline's ``process_index``/``process_count``). Usually
  that is ``(jax.process_index(), jax.process_count())``; when the 'model'
  axis spans processes (e.g. one process per GPU with ``model_parallel >
  1``), the processes of one 'data' row load the same block.

  Raises:
    ValueError: if this process's devices do not cover a contiguous,
      aligned range of the 'data' axis (a mesh this code never builds).
  """
  rows = sorted({row for (row, _), device in np.ndenumerate(mesh.devices)
                 if device.process_index == jax.process_index()})
  per_process = len(rows)
  data_size = mesh.shape[DATA_AXIS]
  if (not rows or rows != list(range(rows[0], rows[0] + per_process))
      or rows[0] % per_process or data_size % per_process):
    raise ValueError(f"process {jax.process_index()} holds rows {rows} of the 'data' mesh "
                     "axis: expected a contiguous block; check train.num_devices and "
                     "train.model_parallel.")
  return rows[0] // per_process, data_size // per_process


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into one global, sharded array."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}
