"""Negative sampling: items outside a user's training part.

``sample_uniform`` and ``sample_popular`` draw from a ``numpy`` Generator
(sequence and evaluation examples); ``WindowTable`` holds every user's training
part and seen items so that ``window_negatives`` can draw a whole batch of
window negatives as a counter-based hash, without one Generator per example.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from deeprec_jax.data import preprocess

# Hashed redraws of a rejected window negative before the explicit complement
# takes over (at >= 25% acceptance, 64 rejections in a row have p < 1e-8).
_MAX_HASH_ATTEMPTS = 64
# Below this fraction of allowed items (or allowed popularity mass), sample
# from the explicit complement instead of rejecting draws.
_REJECTION_MIN_ACCEPTANCE = 0.25


def sample_uniform(rng: np.random.Generator, num_items: int, seen: np.ndarray,
                   shape: tuple[int, ...]) -> np.ndarray:
  """Items drawn uniformly from ``1..num_items`` minus sorted ``seen`` (0 if none)."""
  seen = seen[seen > 0]
  num_allowed = num_items - len(seen)
  if num_allowed <= 0:
    return np.zeros(shape, np.int64)
  if num_allowed < _REJECTION_MIN_ACCEPTANCE * num_items:
    allowed = np.setdiff1d(np.arange(1, num_items + 1), seen, assume_unique=True)
    return allowed[rng.integers(0, len(allowed), size=shape)]
  draws = rng.integers(1, num_items + 1, size=shape)
  rejected = _contains(seen, draws)
  while rejected.any():
    draws[rejected] = rng.integers(1, num_items + 1, size=int(rejected.sum()))
    rejected = _contains(seen, draws)
  return draws


def popularity_log_q(counts: np.ndarray) -> np.ndarray:
  """``float32[N + 1]``: log of each item's add-one-smoothed share of ``counts``.

  The logQ correction of a popularity sampler (``sample_popular``). The
  smoothing gives items never drawn (count 0) a finite value; entry 0
  (padding) is ``log(1e-30)``, never used.
  """
  smoothed = np.asarray(counts, np.float64) + 1.0
  smoothed[0] = 0.0
  return np.log(np.maximum(smoothed / smoothed.sum(), 1e-30)).astype(np.float32)


def sample_popular(rng: np.random.Generator, cdf: np.ndarray, seen: np.ndarray,
                   shape: tuple[int, ...]) -> np.ndarray:
  """Items drawn proportionally to ``diff(cdf)`` outside sorted ``seen``.

  ``cdf`` is the cumulative training count over ids ``0..num_items`` (item 0
  has count 0, so it is never drawn). Falls back to uniform sampling when the
  allowed items were never trained on.
  """
  counts = np.diff(cdf, prepend=0.0)
  seen = seen[seen > 0]
  total = cdf[-1]
  allowed_mass = total - counts[seen].sum()
  if allowed_mass <= 0:
    return sample_uniform(rng, len(cdf) - 1, seen, shape)
  if allowed_mass < _REJECTION_MIN_ACCEPTANCE * total:
    probs = counts.copy()
    probs[seen] = 0.0
    return rng.choice(len(probs), size=shape, p=probs / probs.sum())

  def draw(size):
    return np.searchsorted(cdf, rng.random(size) * total, side="right")

  draws = draw(shape)
  rejected = _contains(seen, draws)
  while rejected.any():
    draws[rejected] = draw(int(rejected.sum()))
    rejected = _contains(seen, draws)
  return draws


@dataclasses.dataclass(frozen=True)
class WindowTable:
  """Every user's training part and seen items, for whole-batch window examples.

  Attributes:
    train_items: int64 ``[sum of training lengths]``, the users' training parts
      (``preprocess.split_train``) one after another.
    train_offsets: int64 ``[num_users]``, where each user's part starts.
    seen_keys: sorted int64 ``user * (num_items + 1) + item`` for every item in
      a user's training part (never negatives; held-out items may be).
    num_seen: int64 ``[num_users]``, distinct items per user.
    num_items: items ``1..num_items``.
  """

  train_items: np.ndarray
  train_offsets: np.ndarray
  seen_keys: np.ndarray
  num_seen: np.ndarray
  num_items: int

  @classmethod
  def from_sequences(cls, sequences: Sequence[np.ndarray], num_items: int) -> WindowTable:
    """The table of every user's whole sequence (int64, user ``i`` at ``sequences[i]``)."""
    trains = [preprocess.split_train(seq) for seq in sequences]
    train_lengths = np.array([len(t) for t in trains], np.int64)
    seen = [np.unique(train) for train in trains]
    stride = num_items + 1
    seen_keys = np.concatenate(
        [np.zeros(0, np.int64)] + [user * stride + items for user, items in enumerate(seen)])
    return cls(train_items=np.concatenate([np.zeros(0, np.int64)] + trains),
               train_offsets=np.cumsum(train_lengths) - train_lengths,
               seen_keys=seen_keys, num_seen=np.array([len(s) for s in seen], np.int64),
               num_items=num_items)

  def is_seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Elementwise ``items[i] in the training part of users[i]`` (broadcasting)."""
    return _contains(self.seen_keys, users * (self.num_items + 1) + items)


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective avalanche of uint64 words (wrapping)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _hash_words(key: int, *words: np.ndarray) -> np.ndarray:
  """uint64 hash of ``key`` and the broadcast ``words`` (chained mixing)."""
  with np.errstate(over="ignore"):
    h = np.full(np.broadcast_shapes(*(np.shape(w) for w in words)), key, np.uint64)
    for word in words:
      h = _mix64(h + np.asarray(word).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
  return h


def window_negatives(table: WindowTable, users: np.ndarray, indices: np.ndarray,
                     shape: tuple[int, int], key: int) -> np.ndarray:
  """Uniform negatives outside each user's sequence: int64 ``[len(users), *shape]``.

  Draw ``a`` of slot ``s`` of example ``i`` is ``1 + hash(key, i, s, a) % N``,
  redrawn (``a + 1``) while the user has seen it. Users with under
  ``_REJECTION_MIN_ACCEPTANCE`` of the catalogue left, and the rare draw still
  rejected after ``_MAX_HASH_ATTEMPTS``, pick from the explicit complement;
  a user who has seen every item gets 0 (no negative).
  """
  slots = np.arange(math.prod(shape)).reshape(shape)
  user_grid = np.broadcast_to(users[:, None, None], (len(users),) + shape)
  index_grid = indices[:, None, None]
  num_items = table.num_items
  draws = np.zeros(user_grid.shape, np.int64)
  sparse = table.num_seen[users] > (1 - _REJECTION_MIN_ACCEPTANCE) * num_items
  pending = np.broadcast_to(~sparse[:, None, None], draws.shape).copy()
  for attempt in range(_MAX_HASH_ATTEMPTS):
    if not pending.any():
      break
    where = np.nonzero(pending)
    hashed = _hash_words(key, index_grid[where[0], 0, 0], slots[where[1:]], attempt)
    candidate = 1 + (hashed % np.uint64(num_items)).astype(np.int64)
    accepted = ~table.is_seen(user_grid[where], candidate)
    draws[tuple(w[accepted] for w in where)] = candidate[accepted]
    pending[tuple(w[accepted] for w in where)] = False
  pending |= sparse[:, None, None]
  for row in np.unique(np.nonzero(pending)[0]):  # The explicit complement.
    seen = table.seen_keys[np.searchsorted(table.seen_keys, users[row] * (num_items + 1)):]
    seen = seen[:table.num_seen[users[row]]] - users[row] * (num_items + 1)
    allowed = np.setdiff1d(np.arange(1, num_items + 1), seen, assume_unique=True)
    if not len(allowed):
      draws[row][pending[row]] = 0
      continue
    hashed = _hash_words(key, indices[row], slots[pending[row]], _MAX_HASH_ATTEMPTS)
    draws[row][pending[row]] = allowed[(hashed % np.uint64(len(allowed))).astype(np.int64)]
  return draws


def _contains(sorted_items: np.ndarray, items: np.ndarray) -> np.ndarray:
  """Elementwise ``items in sorted_items`` for a sorted 1-D array."""
  if not len(sorted_items):
    return np.zeros(items.shape, bool)
  pos = np.minimum(np.searchsorted(sorted_items, items), len(sorted_items) - 1)
  return sorted_items[pos] == items
