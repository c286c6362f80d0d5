"""Interactions -> per-user chronological sequences of remapped item ids.

`preprocess` runs these steps in order, logging users, items, interactions
and average length before and after each:

1. implicit feedback: keep ratings >= `rating_threshold` (when > 0 and the
   source has ratings);
2. chronological order per user, ties broken by file order (stable);
3. `max_history`: keep each user's most recent N interactions. This runs
   before the k-core, so that the k-core guarantee holds for the output;
4. iterative k-core: drop users with fewer than `min_user_interactions`
   and items with fewer than `min_item_interactions` interactions until none
   is left. Counts are interactions, not distinct items. Users need at least
   3 interactions whatever `min_user_interactions` says, because leave-one-out
   takes the last item for test and the one before for validation: shorter
   users are dropped here (and the log says so);
5. id remap: items -> 1..num_items in ascending original id (0 = padding),
   so 1-based contiguous ids (SASRec's text files) map to themselves; users
   in ascending original id.

Leave-one-out (`split_train`, `split_eval`): the last item is the test
target, the second last the validation target, everything before them the
training part.
"""

import dataclasses
from collections.abc import Callable

import numpy as np
from absl import logging

from deeprec_jax.data import sources

# Leave-one-out needs a training part, a validation and a test item.
MIN_SEQUENCE_LENGTH = 3


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceData:
  """Per-user chronological item sequences in remapped ids.

  Attributes:
    sequences: one int64 array per user (rows in `user_ids` order), remapped
      item ids in 1..num_items, oldest first; every one has >= 3 items.
    user_ids: int64 [num_users], the original id of each user row, ascending.
    item_ids: int64 [num_items + 1], the original id of each remapped item,
      ascending; item_ids[0] = -1 stands for the padding id 0.
    num_items: number of items; ids run 1..num_items, all used.
    item_genres: bool [num_items + 1, len(genre_names)] multi-hot genres of
      each remapped item (row 0, padding, and items without side information
      are all False), or None when the source has no genres.
    genre_names: the genre of each column of `item_genres`, sorted; () when
      there are none.
    time_seqs: one int64 array per user, aligned with `sequences`: each
      interaction's timestamp (the source's; file order where it has none),
      non-decreasing; None when not kept.
  """

  sequences: list[np.ndarray]
  user_ids: np.ndarray
  item_ids: np.ndarray
  num_items: int
  item_genres: np.ndarray | None = None
  genre_names: tuple[str, ...] = ()
  time_seqs: list[np.ndarray] | None = None

  @property
  def num_users(self) -> int:
    return len(self.sequences)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(s) for s in self.sequences))

  def stats(self) -> dict[str, float]:
    """Users, items, interactions and average sequence length."""
    return dict(
        users=self.num_users,
        items=self.num_items,
        interactions=self.num_interactions,
        avg_length=self.num_interactions / max(self.num_users, 1),
    )


def _stats(user: np.ndarray, item: np.ndarray) -> str:
  num_users = len(np.unique(user))
  return (f"{num_users} users, {len(np.unique(item))} items, {len(user)} interactions, "
          f"avg length {len(user) / max(num_users, 1):.1f}")


def _check_arguments(rating_threshold, min_user_interactions, min_item_interactions, max_history):
  if not np.isfinite(rating_threshold) or rating_threshold < 0:
    raise ValueError(f"rating_threshold must be a finite number >= 0, got {rating_threshold!r}")
  for name, value in (("min_user_interactions", min_user_interactions),
                      ("min_item_interactions", min_item_interactions),
                      ("max_history", max_history)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {value!r}")
  if 0 < max_history < MIN_SEQUENCE_LENGTH:
    raise ValueError(
        f"max_history must be 0 (keep all) or >= {MIN_SEQUENCE_LENGTH} (leave-one-out needs "
        f"{MIN_SEQUENCE_LENGTH} items), got {max_history}")


def _check_not_empty(user, rating_threshold, min_user_interactions, min_item_interactions):
  if not len(user):
    raise ValueError(
        "no interactions left after preprocessing; loosen rating_threshold="
        f"{rating_threshold}, min_user_interactions={min_user_interactions} or "
        f"min_item_interactions={min_item_interactions}")


def k_core(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
  """Marks the interactions of the maximal (min_user, min_item)-core.

  Repeatedly drops every interaction whose user has fewer than `min_user` or
  whose item has fewer than `min_item` interactions left; a dropped one can
  never belong to the core, so the fixed point is the maximal core.

  Args:
    user: int64 [n] user ids.
    item: int64 [n] item ids.
    min_user: interactions each kept user needs (0 = no constraint).
    min_item: interactions each kept item needs (0 = no constraint).

  Returns:
    bool [n], True for the interactions kept.
  """
  _, user_index = np.unique(user, return_inverse=True)
  _, item_index = np.unique(item, return_inverse=True)
  keep = np.ones(len(user), dtype=bool)
  while True:
    user_count = np.bincount(user_index[keep], minlength=user_index.max(initial=-1) + 1)
    item_count = np.bincount(item_index[keep], minlength=item_index.max(initial=-1) + 1)
    drop = keep & ((user_count[user_index] < min_user) | (item_count[item_index] < min_item))
    if not drop.any():
      return keep
    keep &= ~drop


def preprocess(
    interactions: sources.Interactions,
    *,
    rating_threshold: float = 0.0,
    min_user_interactions: int = 0,
    min_item_interactions: int = 0,
    max_history: int = 0,
    keep_short_users: bool = False,
    log: Callable[[str], None] | None = logging.info,
) -> SequenceData:
  """Turns raw interactions into per-user chronological sequences (see module doc).

  Args:
    interactions: the raw data, original ids.
    rating_threshold: keep ratings >= this (0 = keep all; ignored without ratings).
    min_user_interactions: k-core, users need at least this many (0 = off;
      at least 3 are always needed, for leave-one-out).
    min_item_interactions: k-core, items need at least this many (0 = off).
    max_history: keep each user's most recent N interactions (0 = all, else >= 3).
    keep_short_users: keep users with fewer than 3 interactions as
      training-only users (``split_train`` is their whole sequence; they are
      never evaluated), as the SASRec reference code does; otherwise the
      k-core drops them.
    log: receives one line per step; None = silent.

  Returns:
    The SequenceData.

  Raises:
    ValueError: an invalid argument (named in the message), or no
      interactions left after filtering.
  """
  _check_arguments(rating_threshold, min_user_interactions, min_item_interactions, max_history)
  log = log or (lambda message: None)
  user, item, timestamp = interactions.user, interactions.item, interactions.timestamp
  file_order = np.arange(len(user))
  log(f"raw: {_stats(user, item)}")

  def keep_rows(keep: np.ndarray, step: str) -> None:
    nonlocal user, item, timestamp, file_order
    before = _stats(user, item)
    user, item, timestamp, file_order = user[keep], item[keep], timestamp[keep], file_order[keep]
    log(f"{step}: {before} -> {_stats(user, item)}")

  if rating_threshold > 0:
    if interactions.rating is None:
      log(f"implicit feedback: the source has no ratings; rating_threshold={rating_threshold} "
          "ignored")
    else:
      keep_rows(interactions.rating >= rating_threshold,
                f"implicit feedback (rating >= {rating_threshold})")

  _check_not_empty(user, rating_threshold, min_user_interactions, min_item_interactions)

  # Sorted once (by user, then time, then file order); later steps keep the order.
  order = np.lexsort((file_order, timestamp, user))
  user, item, timestamp, file_order = user[order], item[order], timestamp[order], file_order[order]

  if max_history:
    # Position counted from each user's most recent interaction (0 = latest).
    is_last = np.append(user[1:] != user[:-1], True)
    run_end = np.flatnonzero(is_last)
    position_from_end = np.repeat(run_end, np.diff(run_end, prepend=-1)) - np.arange(len(user))
    keep_rows(position_from_end < max_history, f"max_history={max_history} (most recent kept)")

  min_user = max(min_user_interactions, 1 if keep_short_users else MIN_SEQUENCE_LENGTH)
  reason = ""
  if min_user != min_user_interactions:
    reason = f", raised from {min_user_interactions} for leave-one-out"
  if keep_short_users:
    short = np.count_nonzero(np.bincount(np.unique(user, return_inverse=True)[1])
                             < MIN_SEQUENCE_LENGTH) if len(user) else 0
    log(f"keep_short_users: {short} users with < {MIN_SEQUENCE_LENGTH} interactions kept as "
        "training-only users")
  keep_rows(k_core(user, item, min_user, min_item_interactions),
            f"k-core (users >= {min_user}{reason}; items >= {min_item_interactions})")
  _check_not_empty(user, rating_threshold, min_user_interactions, min_item_interactions)

  user_ids, user_rows = np.unique(user, return_index=True)
  original_items, remapped = np.unique(item, return_inverse=True)
  remapped = remapped.astype(np.int64) + 1
  # Rows are grouped by user in ascending id, so each user is one slice.
  sequences = np.split(remapped, user_rows[1:])
  time_seqs = np.split(timestamp.astype(np.int64), user_rows[1:])
  item_ids = np.concatenate([[-1], original_items]).astype(np.int64)

  item_genres, genre_names = None, ()
  if interactions.item_genres is not None:
    genre_names = tuple(sorted({g for gs in interactions.item_genres.values() for g in gs}))
    column = {g: j for j, g in enumerate(genre_names)}
    item_genres = np.zeros((len(item_ids), len(genre_names)), dtype=bool)
    for row, original in enumerate(original_items, start=1):
      for genre in interactions.item_genres.get(int(original), ()):
        item_genres[row, column[genre]] = True

  data = SequenceData(
      sequences=sequences,
      user_ids=user_ids.astype(np.int64),
      item_ids=item_ids,
      num_items=len(original_items),
      item_genres=item_genres,
      genre_names=genre_names,
      time_seqs=time_seqs,
  )
  stats = data.stats()
  log(f"remapped ids: {stats['users']} users, items 1..{stats['items']}, "
      f"{stats['interactions']} interactions, avg length {stats['avg_length']:.1f}")
  return data


def split_train(sequence: np.ndarray) -> np.ndarray:
  """The training part of a leave-one-out split: all but the last two items.

  A sequence too short to hold out two items (a training-only user, see
  ``keep_short_users``) trains on all of it.
  """
  return sequence[:-2] if len(sequence) >= MIN_SEQUENCE_LENGTH else sequence


def split_eval(sequence: np.ndarray, split: str) -> tuple[np.ndarray, int]:
  """History and target of a leave-one-out evaluation.

  Args:
    sequence: int64 [n] one user's chronological items, n >= 3.
    split: 'valid' -> (sequence[:-2], sequence[-2]);
      'test' -> (sequence[:-1], sequence[-1]).

  Returns:
    (history int64 [n - 2] or [n - 1], target item id).

  Raises:
    ValueError: an unknown split, or a sequence shorter than 3.
  """
  if len(sequence) < MIN_SEQUENCE_LENGTH:
    raise ValueError(f"sequence must hold >= {MIN_SEQUENCE_LENGTH} items for leave-one-out, "
                     f"got {len(sequence)}")
  if split == "valid":
    return sequence[:-2], int(sequence[-2])
  if split == "test":
    return sequence[:-1], int(sequence[-1])
  raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
