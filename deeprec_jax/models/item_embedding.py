"""The item table every model shares: one layer, one parameter path, rows padded once.

Scores are ``hidden @ item_table.T`` for every model, so the table is the one
parameter that losses, metrics, sharding and checkpoints all need to find. It
lives at ``params[ITEM_TABLE[0]][ITEM_TABLE[1]]`` and has ``table_rows(rows)``
rows: the model's ``rows`` real rows (row 0 = padding, then items 1..N, then
any extra token) followed by zero rows up to a multiple of ``ROW_MULTIPLE``.
The multiple is fixed so that the ``'model'`` mesh axis splits the table
evenly for every ``train.model_parallel`` dividing it: the table is never
padded, cut or re-padded after creation. Padding rows are never looked up or
scored (``models.item_table`` slices the real rows), so their gradient is zero
and they stay zero under any optimizer here.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Path of the item table inside params (and inside optimizer states that
# mirror params, such as Adam's moments).
ITEM_TABLE = ("item_embed", "embedding")
# Path of a separate output table (``model.output_table``: the scored item
# vectors are its rows, the inputs keep ITEM_TABLE's), as gSASRec has.
OUTPUT_TABLE = ("output_embed", "embedding")
# Rows are rounded up to a multiple of this: every power of two up to 128
# divides it, so any sensible model axis splits the table evenly.
ROW_MULTIPLE = 128
# flax's nn.Embed initializer (the RNN and Caser tables use it).
DEFAULT_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def table_rows(rows: int) -> int:
  """Rows of the stored table for a model with ``rows`` real rows."""
  return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def pad_rows(table: Any) -> Any:
  """Appends zero rows to a ``[rows, dim]`` table up to ``table_rows(rows)``."""
  rows = table.shape[0]
  pad = ((0, table_rows(rows) - rows), (0, 0))
  return np.pad(table, pad) if isinstance(table, np.ndarray) else jnp.pad(table, pad)


class ItemEmbedding(nn.Module):
  """The item table ``float32[table_rows(num_rows), dim]`` and its lookup.

  Create it with ``name=ITEM_TABLE[0]`` so that it sits at the shared path.
  ``init`` creates the full table; ``apply`` looks ids up in whatever table
  ``params`` holds there (the row-sparse step's ``[U, dim]`` rows).

  Attributes:
    num_rows: real rows (``num_items + 1``, or more for extra tokens).
    dim: embedding width.
    embedding_init: initializer of the real rows, called with shape
      ``(num_rows, dim)`` so that they do not depend on the padding.
    dtype: dtype of the looked-up vectors (None: float32, the param dtype).
  """

  num_rows: int
  dim: int
  embedding_init: Any = DEFAULT_INIT
  dtype: Any = None

  def setup(self) -> None:
    def init(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
      return pad_rows(self.embedding_init(key, (self.num_rows, self.dim), dtype))

    if self.has_variable("params", ITEM_TABLE[1]):
      # apply(): the given table, whatever its rows. A row-sparse train step
      # (row_sparse.py) passes only the rows its batch touches, renumbered;
      # self.param would insist on the full table's shape.
      self.embedding = self.get_variable("params", ITEM_TABLE[1])
    else:
      self.embedding = self.param(ITEM_TABLE[1], init, (table_rows(self.num_rows), self.dim),
                                  jnp.float32)

  def __call__(self, item_ids: jax.Array) -> jax.Array:
    """``int[...] -> [..., dim]``: the rows of ``item_ids``."""
    table = self.embedding if self.dtype is None else self.embedding.astype(self.dtype)
    return jnp.take(table, item_ids, axis=0)
