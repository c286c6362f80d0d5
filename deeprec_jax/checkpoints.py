"""Orbax checkpoints: the latest N plus the best by a validation metric.

A checkpoint holds the train state (params, optimizer state, step, RNG key)
and a small JSON record (epoch, best metric so far, evaluations without
improvement). The data position is the step: batches are a pure function of
(seed, epoch, step), so restoring the step restores the data stream.

Orbax writes each step into a temporary directory and renames it when the
write is complete, so a process killed mid-save leaves the previous
checkpoints untouched; the unfinished directory is removed on the next start.
A step that is damaged anyway (a truncated file, a step directory copied in
half) is skipped by ``restore_first_intact``, which says which and why, and
falls back to the next candidate; nothing is deleted.
"""

import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from deeprec_jax import sharding
from deeprec_jax.models import item_embedding


def create_manager(workdir: str, *, keep: int, best_metric: str) -> ocp.CheckpointManager:
  """A manager under ``workdir/checkpoints`` keeping ``keep`` latest + the best.

  Args:
    workdir: the experiment directory.
    keep: how many of the most recent checkpoints to keep.
    best_metric: validation metric (higher is better) that picks the best
      checkpoint; every save passes it in ``metrics``.
  """
  def metric_of(metrics: dict[str, float]) -> float:
    return float(metrics[best_metric])

  # max_to_keep with best_fn keeps the best N, not the latest (Orbax 0.12):
  # both kinds are asked for explicitly instead.
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=metric_of, reverse=False, n=1),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=metric_of,
      best_mode="max",
      enable_async_checkpointing=False,
      cleanup_tmp_directories=True,
      create=True,
  )
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=("state", "record"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, record: dict[str, Any],
         metrics: dict[str, float]) -> None:
  """Saves ``state`` and the JSON ``record`` at ``step`` and waits for the write."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             record=ocp.args.JsonSave(record)),
               metrics=metrics, force=True)
  manager.wait_until_finished()


def newest_first(manager: ocp.CheckpointManager) -> list[int]:
  """Every step in the checkpoint directory, newest first."""
  return sorted(manager.all_steps(), reverse=True)


def best_first(manager: ocp.CheckpointManager, best_metric: str) -> list[int]:
  """Steps by saved validation ``best_metric``, best first; then those without, newest first."""
  scored, unscored = [], []
  for step in newest_first(manager):
    try:
      scored.append((-float(manager.metrics(step)[best_metric]), -step))
    except Exception:  # noqa: BLE001 - a step whose metrics cannot be read is still a candidate.
      unscored.append(step)
  return [-step for _, step in sorted(scored)] + unscored


def restore_first_intact(manager: ocp.CheckpointManager, steps: Sequence[int],
                         abstract_state: Any) -> tuple[int, Any, dict[str, Any], list[int]]:
  """Restores the first of ``steps`` that reads back whole.

  Args:
    manager: from ``create_manager``.
    steps: candidates in order of preference (``newest_first``, ``best_first``).
    abstract_state: shapes and shardings to restore into (see ``restore``).

  Returns:
    ``(step, state, record, skipped)``: ``skipped`` are the damaged steps
    tried before ``step``, each logged with its error.

  Raises:
    FileNotFoundError: if ``steps`` is empty or every step is damaged.
  """
  skipped = []
  for step in steps:
    try:
      state, record = restore(manager, step, abstract_state)
    except Exception as error:  # noqa: BLE001 - Orbax/tensorstore raise many types here.
      reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
      logging.warning("checkpoint step %d in %s is damaged, skipped (%s)", step,
                      manager.directory, reason)
      skipped.append(step)
      continue
    if skipped:
      logging.warning("restored step %d instead of damaged step(s) %s", step, skipped)
    return step, state, record, skipped
  where = f" (damaged: {skipped})" if skipped else ""
  raise FileNotFoundError(f"no intact checkpoint in {manager.directory}{where}.")


def set_aside(manager: ocp.CheckpointManager, steps: Sequence[int]) -> list[str]:
  """Moves damaged ``steps`` to ``<workdir>/damaged_checkpoints/`` (kept, not deleted).

  A resumed run saves its next checkpoints at those steps again, which Orbax
  would refuse while the damaged directories hold the names.
  """
  directory = str(manager.directory)
  target_dir = os.path.join(os.path.dirname(directory), "damaged_checkpoints")
  os.makedirs(target_dir, exist_ok=True)
  moved = []
  for step in steps:
    target = os.path.join(target_dir, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(os.path.join(directory, str(step)), target)
    logging.warning("moved damaged checkpoint step %d to %s", step, target)
    moved.append(target)
  manager.reload()
  return moved


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict[str, Any]]:
  """Restores ``(state, record)`` at ``step`` with the shapes and shardings of ``abstract_state``.

  Checkpoints written before the item table was padded once at creation hold
  it (and its optimizer moments) with another row count: those are read as
  saved and converted to today's rows (``_convert_item_tables``).
  """
  saved_rows = _saved_item_table_rows(manager, step)
  rows = _item_table_rows(abstract_state)
  if saved_rows is None or saved_rows == rows:
    return _restore(manager, step, abstract_state)
  logging.info("checkpoint %d holds a %d-row item table: converting it to %d rows", step,
               saved_rows, rows)
  state, record = _restore(manager, step, _with_item_table_rows(abstract_state, saved_rows))
  return _convert_item_tables(state, abstract_state), record


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
             ) -> tuple[Any, dict[str, Any]]:
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
  record = dict(restored["record"])
  record.pop("item_table_rows", None)  # Written by older code; the shapes say it now.
  return restored["state"], record


def _is_item_table(path: tuple[Any, ...]) -> bool:
  names = tuple(getattr(key, "key", None) for key in path[-2:])
  return names == item_embedding.ITEM_TABLE


def _item_table_rows(abstract_state: Any) -> int:
  table, param = item_embedding.ITEM_TABLE
  return abstract_state["params"][table][param].shape[0]


def _saved_item_table_rows(manager: ocp.CheckpointManager, step: int) -> int | None:
  path = os.path.join(str(manager.directory), str(step), "state")
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata
  table, param = item_embedding.ITEM_TABLE
  try:
    return int(tree["params"][table][param].shape[0])
  except (KeyError, TypeError, AttributeError):
    return None


def _with_item_table_rows(abstract_state: Any, rows: int) -> Any:
  """``abstract_state`` with every item-table leaf (table, moments) of ``rows`` rows, replicated."""
  def rule(path, leaf):
    if not _is_item_table(path) or len(leaf.shape) != 2:
      return leaf
    return jax.ShapeDtypeStruct((rows, leaf.shape[1]), leaf.dtype,
                                sharding=sharding.replicated(leaf.sharding.mesh))

  return jax.tree_util.tree_map_with_path(rule, abstract_state)


def _convert_item_tables(state: Any, abstract_state: Any) -> Any:
  """Cuts or zero-pads every item-table leaf to the rows of ``abstract_state``.

  Rows past the model's real ones are zero in a table and in its moments
  (they never get a gradient), so nothing is lost either way.
  """
  def rule(path, leaf, target):
    if not _is_item_table(path) or len(target.shape) != 2:
      return leaf
    leaf = np.asarray(leaf.addressable_data(0))[: target.shape[0]]  # Replicated.
    leaf = np.pad(leaf, ((0, target.shape[0] - leaf.shape[0]), (0, 0)))
    return jax.device_put(leaf, target.sharding)

  return jax.tree_util.tree_map_with_path(rule, state, abstract_state)
