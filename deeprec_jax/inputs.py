"""The model input that asks for the next item, from a history (numpy only).

One rule, shared by evaluation batches (``data.pipeline.eval_batches``), the
library's top-K (``recommend``) and the exported artifact's loader
(``serving.artifact``). This module imports numpy alone, so that the loader
can use it without the data pipeline (Grain, TFDS) or the model code.
"""

from __future__ import annotations

import numpy as np


def eval_input(history: np.ndarray, *, task: str, max_len: int, num_items: int) -> np.ndarray:
  """The model input that asks for the item after ``history``.

  The most recent ``max_len`` items, left-padded with 0; 'masked' models
  (BERT4Rec) get the most recent ``max_len - 1`` items and the mask token
  ``num_items + 1`` in the last slot.

  Args:
    history: model item ids, oldest first.
    task: the model's training task (``models.TASKS``).
    max_len: L, model input length.
    num_items: N.

  Returns:
    ``int32[max_len]``, left-padded with 0.
  """
  history = np.asarray(history)
  if task == "masked":
    inputs = np.append(history[max(len(history) - (max_len - 1), 0):], num_items + 1)
  else:
    inputs = history[max(len(history) - max_len, 0):]
  item_seq = np.zeros((max_len,), np.int32)
  item_seq[max_len - len(inputs):] = inputs
  return item_seq
