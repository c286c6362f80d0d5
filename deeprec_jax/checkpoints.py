"""Orbax checkpoints: the latest N plus the best by a validation metric.

A checkpoint holds the train state (params, optimizer state, step, RNG key)
and a small JSON record (epoch, best metric so far, evaluations without
improvement). The data position is the step: batches are a pure function of
(seed, epoch, step), so restoring the step restores the data stream.

Orbax writes each step into a temporary directory and renames it when the
write is complete, so a process killed mid-save leaves the previous
checkpoints untouched; the unfinished directory is removed on the next start.
"""

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


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


def restore_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON record saved at ``step``, without reading the state."""
  restored = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
  return dict(restored["record"])


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict[str, Any]]:
  """Restores ``(state, record)`` at ``step`` with the shardings of ``abstract_state``."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["record"])
