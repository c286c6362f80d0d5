"""Synthetic batches with the shapes (and roughly the padding) of ML-1M.

No real data is needed to time a compiled step: only shapes and dtypes matter
for dense compute. Lengths are still drawn so that some rows are left-padded,
as in the real ML-1M batches (6,040 users, 3,416 items; a median user has
about 96 interactions, so at maxlen 200 many rows are padded), because the
padding fraction decides how much of the masked softmax is live.

Layouts follow docs/contracts.md ("Batches").
"""

from __future__ import annotations

import numpy as np

# The SASRec paper's ML-1M numbers (after its 5-core filtering).
ML1M_USERS = 6040
ML1M_ITEMS = 3416
ML1M_MEDIAN_LENGTH = 96


def _lengths(rng: np.random.Generator, batch: int, max_len: int) -> np.ndarray:
  """Sequence lengths in ``[2, max_len]``, log-normal around the ML-1M median."""
  lengths = np.exp(rng.normal(np.log(ML1M_MEDIAN_LENGTH), 0.9, size=batch))
  return np.clip(lengths.astype(np.int64), 2, max_len)


def _left_padded(rng: np.random.Generator, batch: int, max_len: int, num_items: int,
                 lengths: np.ndarray) -> np.ndarray:
  items = rng.integers(1, num_items + 1, size=(batch, max_len), dtype=np.int64)
  keep = np.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
  return np.where(keep, items, 0).astype(np.int32)


def autoregressive_batch(*, batch: int, max_len: int, num_items: int, num_users: int,
                         num_negatives: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
  """SASRec / RNN training batch: ``item_seq``, ``targets``, ``negatives``, ``user``."""
  rng = np.random.default_rng(seed)
  lengths = _lengths(rng, batch, max_len + 1)
  seq = _left_padded(rng, batch, max_len + 1, num_items, lengths)
  item_seq, targets = seq[:, :-1], seq[:, 1:]
  negatives = rng.integers(1, num_items + 1, size=(batch, max_len, num_negatives))
  negatives = np.where(targets[..., None] > 0, negatives, 0).astype(np.int32)
  return {"item_seq": np.ascontiguousarray(item_seq), "targets": np.ascontiguousarray(targets),
          "negatives": negatives,
          "user": rng.integers(0, num_users, size=(batch,)).astype(np.int32)}


def masked_batch(*, batch: int, max_len: int, num_items: int, num_users: int,
                 mask_prob: float = 0.2, num_negatives: int = 1,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """BERT4Rec cloze batch: masked positions hold ``num_items + 1``."""
  rng = np.random.default_rng(seed)
  lengths = _lengths(rng, batch, max_len)
  seq = _left_padded(rng, batch, max_len, num_items, lengths)
  masked = (rng.random(seq.shape) < mask_prob) & (seq > 0)
  masked[:, -1] = True  # the slot evaluation asks about
  item_seq = np.where(masked, num_items + 1, seq).astype(np.int32)
  targets = np.where(masked, seq, 0).astype(np.int32)
  negatives = rng.integers(1, num_items + 1, size=(batch, max_len, num_negatives))
  return {"item_seq": item_seq, "targets": targets, "negatives": negatives.astype(np.int32),
          "user": rng.integers(0, num_users, size=(batch,)).astype(np.int32)}


def window_batch(*, batch: int, window: int, num_targets: int, num_items: int,
                 num_users: int, num_negatives: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
  """Caser training batch: ``item_seq [B, L]``, ``targets [B, T]``, ``negatives [B, T, k]``."""
  rng = np.random.default_rng(seed)
  item_seq = rng.integers(1, num_items + 1, size=(batch, window)).astype(np.int32)
  item_seq[: batch // 8, : window // 2] = 0  # a few windows near a sequence start
  return {"item_seq": item_seq,
          "targets": rng.integers(1, num_items + 1, size=(batch, num_targets)).astype(np.int32),
          "negatives": rng.integers(1, num_items + 1,
                                    size=(batch, num_targets, num_negatives)).astype(np.int32),
          "user": rng.integers(0, num_users, size=(batch,)).astype(np.int32)}


def eval_batch(*, batch: int, max_len: int, num_items: int, num_users: int,
               exclude_width: int, num_sampled_negatives: int = 100, masked: bool = False,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Evaluation batch: ``item_seq``, ``target``, ``exclude``, ``sampled_negatives``, ..."""
  rng = np.random.default_rng(seed)
  lengths = _lengths(rng, batch, max_len)
  item_seq = _left_padded(rng, batch, max_len, num_items, lengths)
  if masked:
    item_seq[:, -1] = num_items + 1
  exclude = rng.integers(1, num_items + 1, size=(batch, exclude_width))
  exclude = np.where(np.arange(exclude_width)[None] < lengths[:, None] * 2, exclude, 0)
  return {"item_seq": item_seq,
          "target": rng.integers(1, num_items + 1, size=(batch,)).astype(np.int32),
          "exclude": exclude.astype(np.int32),
          "sampled_negatives": rng.integers(1, num_items + 1, size=(batch, num_sampled_negatives)
                                            ).astype(np.int32),
          "user": (np.arange(batch) % max(num_users, 1)).astype(np.int32),
          "weight": np.ones((batch,), np.float32)}
