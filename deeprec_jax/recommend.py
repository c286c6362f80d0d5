"""Top-K recommendations for given histories, in the dataset's original ids."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deeprec_jax import evaluate
from deeprec_jax.data import pipeline


def encode_history(history: Sequence[int], item_ids: np.ndarray, where: str = "history"
                   ) -> np.ndarray:
  """Maps original item ids to the model's ids ``1..N``.

  Args:
    history: original item ids, oldest first.
    item_ids: ``int64[N + 1]``, original id of each model id (``Dataset.item_ids``).
    where: how to name the input in an error message (flag, file and line).

  Returns:
    ``int64[len(history)]`` model ids.

  Raises:
    ValueError: naming every id the dataset does not know.
  """
  lookup = {int(original): index for index, original in enumerate(item_ids) if index > 0}
  unknown = [item for item in history if int(item) not in lookup]
  if unknown:
    raise ValueError(f"{where}: item ids not in the dataset: {unknown[:10]}"
                     f"{' ...' if len(unknown) > 10 else ''}")
  return np.asarray([lookup[int(item)] for item in history], np.int64)


def encode_user(user: int, user_ids: np.ndarray, where: str = "--user") -> int:
  """Maps an original user id to the model's user index ``0..num_users - 1``.

  Raises:
    ValueError: naming the id if the dataset does not know it.
  """
  matches = np.flatnonzero(np.asarray(user_ids) == int(user))
  if not len(matches):
    raise ValueError(f"{where}: user id {user} is not in the dataset.")
  return int(matches[0])


def user_history(dataset: Any, user: int) -> np.ndarray:
  """Every item of user index ``user`` in the dataset (model ids, oldest first)."""
  return np.asarray(dataset.source[user]["item_seq"], np.int64)


def recommend(trainer: Any, params: Any, histories: Sequence[np.ndarray], *, top_k: int = 10,
              exclude_seen: bool = True,
              users: Sequence[int] | None = None) -> list[list[tuple[int, float]]]:
  """The ``top_k`` items for each history, as ``(original item id, score)``.

  Args:
    trainer: a ``train.Trainer`` (model, dataset, config).
    params: its parameters.
    histories: model ids (``encode_history``), oldest first, one per user.
    top_k: how many items to return per history.
    exclude_seen: leave items of the history out of the ranking.
    users: the user index of each history (``encode_user``), for models that
      are personalized by user id (Caser); None for session models.

  Returns:
    One list of ``top_k`` pairs per history, best first.

  Raises:
    ValueError: for no history, ``top_k`` outside ``[1, num_items]``, or a
      model that reads timestamps.
  """
  dataset, config = trainer.dataset, trainer.config
  if trainer.with_times:
    raise ValueError("config key model.time_buckets: recommendations take item histories "
                     "only, without timestamps; a model with a time bias (time_buckets > 0) "
                     "needs them.")
  if not histories:
    raise ValueError("no history to recommend for.")
  if not 1 <= top_k <= dataset.num_items:
    raise ValueError(f"top_k={top_k}: expected an int in [1, {dataset.num_items}] (the "
                     "catalogue size).")
  item_seq = np.stack([
      pipeline.eval_input(history, task=trainer.task, max_len=config.data.max_len,
                          num_items=dataset.num_items) for history in histories]).astype(np.int32)
  width = max([len(h) for h in histories] + [1])
  exclude = np.zeros((len(histories), width), np.int32)
  if exclude_seen:
    for row, history in enumerate(histories):
      exclude[row, :len(history)] = history

  user = None if users is None else jnp.asarray(users, jnp.int32)

  # Image encoders: the catalogue's vectors once, from the run's pictures.
  images = getattr(trainer, "images", None)
  vectors = None if images is None else trainer.item_vectors(params)

  @jax.jit
  def top_items(params, item_seq, exclude, user, vectors):
    return evaluate.top_k(trainer.model, params, dataset.num_items, item_seq, exclude, top_k,
                          user=user, mesh=trainer.mesh, item_vectors=vectors)

  items, scores = jax.device_get(top_items(params, jnp.asarray(item_seq), jnp.asarray(exclude),
                                           user, vectors))
  return [[(int(dataset.item_ids[i]), float(s)) for i, s in zip(row_items, row_scores, strict=True)
           if np.isfinite(s)] for row_items, row_scores in zip(items, scores, strict=True)]
