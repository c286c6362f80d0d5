"""Sequence packing: several left-padded sequences side by side in one row.

``pack_layout`` places sequences into rows, ``pack_batch`` and
``packed_train_batch`` copy batches into that layout with ``segment_ids`` and
``positions``; ``packing_kwargs`` and ``time_kwargs`` give a batch's model kwargs.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# Per-position timestamps a timed batch carries (``times.timed_rows``);
# packed like the items.
TIME_KEYS = ("time_seq", "query_time")


def pack_layout(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Places sequences of ``lengths`` into rows of ``row_len`` (first-fit decreasing).

  Args:
    lengths: ``int[B]``, each in ``[1, row_len]``.
    row_len: L.

  Returns:
    ``(row, end, num_rows)``: sequence i occupies columns
    ``[end[i] - lengths[i], end[i])`` of row ``row[i]``. Each row is filled
    from the right, so any unused columns are left padding.
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and (lengths.min() < 1 or lengths.max() > row_len):
    raise ValueError(f"sequence lengths must be in [1, {row_len}]; got "
                     f"{lengths.min()}..{lengths.max()}.")
  row = np.zeros(len(lengths), np.int64)
  end = np.zeros(len(lengths), np.int64)
  free = np.zeros(len(lengths), np.int64)  # free columns of each opened row
  num_rows = 0
  for i in np.argsort(-lengths, kind="stable"):
    fits = np.flatnonzero(free[:num_rows] >= lengths[i])
    r = int(fits[0]) if len(fits) else num_rows
    if r == num_rows:
      free[r] = row_len
      num_rows += 1
    row[i], end[i] = r, free[r]
    free[r] -= lengths[i]
  return row, end, num_rows


def packing_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The model kwargs of a packed batch (``segment_ids``, ``positions``); {} if unpacked."""
  return {key: batch[key] for key in ("segment_ids", "positions") if key in batch}


def time_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The model kwargs of a timed batch (``time_seq``, ``query_time``); {} if it has none."""
  return {key: batch[key] for key in TIME_KEYS if key in batch}


def pack_batch(batch: Mapping[str, np.ndarray], num_rows: int) -> dict[str, np.ndarray]:
  """Packs a sequence batch's left-padded rows side by side into fewer rows.

  Most users' histories are shorter than L (on ML-1M at L = 200 half of the
  batch is padding), so sequences share rows: each keeps its items, targets and
  negatives, gets a segment id (attention stays within a segment) and keeps
  the positional rows it had alone (right-aligned), so that a model honouring
  ``segment_ids`` and ``positions`` (those whose spec ``packs``: SASRec,
  BERT4Rec) gives every position the output it would have unpacked, and the
  loss (a mean over targets) is unchanged.

  Args:
    batch: ``item_seq int32[B, L]``, ``targets int32[B, L]``, ``negatives
      int32[B, L, k]``, ``user int32[B]``; every row non-empty.
    num_rows: R, at least ``pack_layout``'s row count (extra rows are empty).

  Returns:
    ``item_seq``, ``targets``, ``negatives`` (and ``time_seq``,
    ``query_time`` where the batch has them) with R rows, ``segment_ids
    int32[R, L]`` (0 at padding, 1.. within a row), ``positions int32[R, L]``
    (the positional row: ``L - n + j`` for item j of a length-n sequence; 0 at
    padding) and ``user int32[R]`` (zeros: a packed row has several users).
  """
  item_seq = np.asarray(batch["item_seq"])
  row, end, needed = pack_layout(np.count_nonzero(item_seq, axis=1), item_seq.shape[1])
  if num_rows < needed:
    raise ValueError(f"pack_batch: the batch needs {needed} rows, got num_rows={num_rows}.")
  return _place(batch, row, end, num_rows)


def _place(batch: Mapping[str, np.ndarray], row: np.ndarray, end: np.ndarray,
           num_rows: int) -> dict[str, np.ndarray]:
  """Copies each row of ``batch`` to columns ``[end - n, end)`` of packed row ``row``."""
  item_seq = np.asarray(batch["item_seq"])
  row_len = item_seq.shape[1]
  lengths = np.count_nonzero(item_seq, axis=1)
  negatives = np.asarray(batch["negatives"])
  packed = {
      "item_seq": np.zeros((num_rows, row_len), np.int32),
      "targets": np.zeros((num_rows, row_len), np.int32),
      "negatives": np.zeros((num_rows, row_len, negatives.shape[-1]), np.int32),
      "segment_ids": np.zeros((num_rows, row_len), np.int32),
      "positions": np.zeros((num_rows, row_len), np.int32),
      "user": np.zeros((num_rows,), np.int32),
  }
  segments_in_row = np.zeros(num_rows, np.int32)
  for i in range(len(item_seq)):
    n, r = int(lengths[i]), int(row[i])
    cols = slice(int(end[i]) - n, int(end[i]))
    segments_in_row[r] += 1
    packed["item_seq"][r, cols] = item_seq[i, row_len - n:]
    packed["targets"][r, cols] = batch["targets"][i, row_len - n:]
    packed["negatives"][r, cols] = negatives[i, row_len - n:]
    packed["segment_ids"][r, cols] = segments_in_row[r]
    packed["positions"][r, cols] = np.arange(row_len - n, row_len)
    for key in TIME_KEYS:
      if key in batch:
        packed.setdefault(key, np.zeros((num_rows, row_len), np.int32))[r, cols] = (
            batch[key][i, row_len - n:])
  return packed


def packed_train_batch(indices: np.ndarray, *, make_batch: Callable[..., dict[str, np.ndarray]],
                       input_lengths: np.ndarray, max_len: int, row_multiple: int,
                       process_index: int, process_count: int) -> dict[str, np.ndarray]:
  """This process's rows of the packed global batch of example ``indices``.

  The layout is computed over the whole global batch, so the packed rows do
  not depend on how many processes share them; this process loads only the
  examples that land in its rows.
  """
  indices = np.asarray(indices)
  row, end, needed = pack_layout(input_lengths[indices], max_len)
  multiple = math.lcm(row_multiple, process_count)
  num_rows = -(-needed // multiple) * multiple
  local_rows = num_rows // process_count
  first = process_index * local_rows
  mine = np.flatnonzero((row >= first) & (row < first + local_rows))
  return _place(make_batch(indices[mine]), row[mine] - first, end[mine], local_rows)
