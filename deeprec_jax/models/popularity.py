"""Most-popular baseline: every user gets the same ranking, by training count.

It fits the model contract with ``dim = 1``: ``hidden`` is all ones and the
item table (``[num_items + 1, 1]`` real rows) holds each item's score, so
``hidden @ item_table.T`` ranks items by that score for everyone. The scores
are not learned by gradient descent but set by ``fit_params`` from the item
counts of the training parts (the model can still be trained; it then learns
a popularity prior from the loss).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deeprec_jax.models import item_embedding, layers, validation

# Bit pattern of the smallest normal float32 (about 1.18e-38), minus one: keys
# below skip the subnormals, which XLA on CPU may flush to zero (ties again).
_SUBNORMAL_BITS = 0x007FFFFF


def _float32_to_key(values: np.ndarray) -> np.ndarray:
  """Order-preserving map of normal float32 values (and 0) to consecutive int64.

  Adjacent keys are adjacent float32 numbers, so ``key - 1`` is the next
  smaller float32 (skipping subnormals).
  """
  magnitude = np.abs(values).astype(np.float32).view(np.int32).astype(np.int64)
  key = np.where(magnitude > 0, magnitude - _SUBNORMAL_BITS, 0)
  return np.where(values < 0, -key, key)


def _key_to_float32(keys: np.ndarray) -> np.ndarray:
  """Inverse of ``_float32_to_key``."""
  bits = np.where(keys != 0, np.abs(keys) + _SUBNORMAL_BITS, 0).astype(np.int32)
  magnitude = bits.view(np.float32)
  return np.where(keys < 0, -magnitude, magnitude).astype(np.float32)


def fit_params(item_counts: np.ndarray) -> dict[str, Any]:
  """Popularity scores from training counts, as the model's ``params``.

  Item ``j`` scores ``log1p(item_counts[j])`` in float32, except that ties
  are broken deterministically: items are ordered by count (descending), then
  id (ascending), and an item whose score would not be strictly below the
  previous item's is moved down to the next smaller float32. Scores therefore
  are all distinct (the ranking does not depend on how the evaluator breaks
  ties) and within a few float32 ulps of ``log1p(count)``; counts that float32
  cannot tell apart (e.g. 10**7 and 10**7 + 1) are still ranked by count. (A
  fixed ``-id * eps`` would not do: with 3,416 items and counts in the
  thousands, as on ML-1M, an ``eps`` small enough to keep the count order is
  below float32 resolution.) Row 0 (padding) gets the lowest score.

  Args:
    item_counts: ``int[num_items + 1]``, how often each item occurs in the
      training parts; ``item_counts[0]`` (padding) is ignored.

  Returns:
    ``{'item_embed': {'embedding': float32[table_rows(num_items + 1), 1]}}``,
    the scores followed by the table's zero padding rows.
  """
  counts = np.asarray(item_counts)
  if counts.ndim != 1 or counts.shape[0] < 2:
    raise ValueError(f"item_counts must be [num_items + 1] with num_items >= 1, "
                     f"got shape {counts.shape}.")
  if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
    raise ValueError(f"item_counts must be non-negative integers, got dtype {counts.dtype}, "
                     f"min {counts.min()}.")
  counts = counts.astype(np.int64)
  ids = np.arange(1, counts.shape[0])
  order = ids[np.lexsort((ids, -counts[1:]))]  # by count desc, then id asc
  target = _float32_to_key(np.log1p(counts[order].astype(np.float64)).astype(np.float32))
  # keys[k] = min(target[k], keys[k - 1] - 1) = min_{j <= k}(target[j] + j) - k.
  rank = np.arange(order.shape[0])
  keys = np.minimum.accumulate(target + rank) - rank
  embedding = np.empty((counts.shape[0], 1), np.float32)
  embedding[order, 0] = _key_to_float32(keys)
  embedding[0, 0] = _key_to_float32(keys[-1:] - 1)[0]
  table, param = item_embedding.ITEM_TABLE
  return {table: {param: item_embedding.pad_rows(embedding)}}


class Model(nn.Module):
  """Same ranking for everyone: ``hidden = 1``, scores = the item table.

  Attributes:
    num_items: catalogue size; item ids are ``1..num_items``, 0 is padding.
    num_users: unused.
    max_len: unused.
    dtype: accepted for a uniform config; the output is float32 ones.
  """

  num_items: int
  num_users: int
  max_len: int
  dtype: str = "float32"

  def __post_init__(self) -> None:
    validation.check(validation.is_int(self.num_items) and self.num_items >= 1,
                     "model.num_items (from the dataset)", "an int >= 1", self.num_items)
    validation.compute_dtype(self.dtype)
    super().__post_init__()

  @nn.compact
  def __call__(self, item_seq: jax.Array, *, deterministic: bool = True,
               user: jax.Array | None = None, last_only: bool = False,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Args: ``item_seq int32[B, L]``; ``last_only`` keeps L = 1; no packing; the rest is ignored.

    Returns:
      ``hidden float32[B, L, 1]`` of ones.
    """
    del user, deterministic
    layers.reject_packing("popularity", segment_ids, positions)
    if last_only:
      item_seq = item_seq[:, -1:]
    embed = item_embedding.ItemEmbedding(self.num_items + 1, 1, name=item_embedding.ITEM_TABLE[0])
    # The table is only read by the scorer; touching it creates the parameter.
    _ = embed.embedding
    return jnp.ones(item_seq.shape + (1,), jnp.float32)
