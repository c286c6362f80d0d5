"""Timestamps of sequence examples, for models whose attention reads them.

A timed batch carries ``time_seq`` (each input's timestamp) and
``query_time`` (the time of the request each position answers) beside
``item_seq``; HSTU's relative time bias buckets ``query_time[i] -
time_seq[j]``. Records hold ``time_seq`` since builder version 1.1.0.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np


def check_task(task: str) -> None:
  """Timestamps follow sequence examples; window examples (Caser) have none."""
  if task == "window":
    raise ValueError("timestamps (a model with model.time_buckets > 0) need a sequence task "
                     "('autoregressive' or 'masked'), not 'window'.")


def timed_rows(times: np.ndarray, num_inputs: int, task: str) -> tuple[np.ndarray, np.ndarray]:
  """The timestamps of a sequence example's last ``num_inputs`` inputs and of their queries.

  An autoregressive input at position t predicts the item after it, so its
  query happens at that item's time; a masked input (the mask slot too) is
  its own query.

  Args:
    times: int64 ``[n]``, the timestamps of the sequence up to and including
      the item the last input predicts (autoregressive: the next item, at
      evaluation the target; masked: the last input's own item, at
      evaluation the target in the mask slot).
    num_inputs: inputs in the example (its last ones).
    task: 'autoregressive' or 'masked'.

  Returns:
    ``(time_seq, query_time)``, int32 ``[num_inputs]`` each.
  """
  if task == "masked":
    inputs = times[len(times) - num_inputs:]
    return inputs.astype(np.int32), inputs.astype(np.int32)
  window = times[len(times) - num_inputs - 1:]
  return window[:-1].astype(np.int32), window[1:].astype(np.int32)


def record_times(record: Mapping[str, Any], length: int) -> np.ndarray:
  """A record's ``time_seq`` (int64 ``[length]``), with a clear error for old records."""
  if "time_seq" not in record:
    raise ValueError("this dataset's records have no 'time_seq' (prepared before timestamps "
                     "were kept): delete its TFDS cache folder (config key data.data_dir) to "
                     "rebuild it, or set model.time_buckets=0.")
  times = np.asarray(record["time_seq"], np.int64)
  if len(times) and (times.min() < 0 or times.max() > np.iinfo(np.int32).max):
    raise ValueError(f"record of user {record.get('user')}: timestamps must be in [0, 2^31) "
                     f"(int32 seconds), got {times.min()}..{times.max()}; convert them to "
                     "seconds.")
  if len(times) != length:
    raise ValueError(f"record of user {record.get('user')}: time_seq has {len(times)} entries "
                     f"for {length} items.")
  return times
