"""Scores of many sampled items per position, through the catalogue matmul.

A loss with ``k`` sampled negatives per position (gSASRec's 256) scores
``[B, L, k]`` items. Gathering their rows writes a ``[B, L, k, D]`` tensor
(3.3 GB at gSASRec's ML-1M shapes), and its gradient is a scatter-add of as
many rows, which XLA runs as one serial loop on the CPU. When ``k`` is a
sizable fraction of the catalogue it is cheaper to score every item with one
matmul per block of rows and pick the ``k`` columns: the block's logits stay
in cache, and the backward pass is two more matmuls plus a scatter of scalars.
"""

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Rows of logits per block: [512, N + 1] float32 is ~7 MB for ML-1M's catalogue.
ROW_CHUNK = 512
# Score through the catalogue when k * this >= N + 1: at ML-1M shapes the
# catalogue path wins from k ~ 64 (benchmarks/README.md, "Many negatives").
MIN_FRACTION_INVERSE = 64


def prefers_catalogue(num_scored: int, table_rows: int) -> bool:
  """Whether ``num_scored`` items per position are cheaper scored via the whole table."""
  return num_scored * MIN_FRACTION_INVERSE >= table_rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(rows: Array, table: Array, items: Array, chunk: int) -> Array:
  return _blocked_fwd(rows, table, items, chunk)[0]


def _blocks(x: Array, chunk: int) -> Array:
  return x.reshape(-1, chunk, *x.shape[1:])


def _blocked_fwd(rows, table, items, chunk):
  def block(xs):
    h, block_items = xs  # [c, D], [c, m]
    return jnp.take_along_axis(h @ table.T, block_items, axis=-1)

  scores = jax.lax.map(block, (_blocks(rows, chunk), _blocks(items, chunk)))
  return scores.reshape(items.shape), (rows, table, items)


def _blocked_bwd(chunk, residuals, grad):
  rows, table, items = residuals

  def block(table_grad, xs):
    h, block_items, block_grad = xs  # [c, D], [c, m], [c, m]
    # d scores / d logits is a selection: repeated items add up.
    dense = jnp.zeros((chunk, table.shape[0]), grad.dtype).at[
        jnp.arange(chunk)[:, None], block_items].add(block_grad)
    return table_grad + dense.T @ h, dense @ table

  xs = (_blocks(rows, chunk), _blocks(items, chunk), _blocks(grad, chunk))
  table_grad, rows_grad = jax.lax.scan(block, jnp.zeros_like(table), xs)
  return rows_grad.reshape(rows.shape), table_grad, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def gathered_logits(hidden: Array, table: Array, items: Array,
                    row_chunk: int = ROW_CHUNK) -> Array:
  """``sum(hidden[..., None, :] * table[items], -1)`` without gathering rows.

  Args:
    hidden: ``float32[..., D]``.
    table: ``float32[N + 1, D]``.
    items: ``int[..., m]`` with the same leading shape as ``hidden``; any
      index in ``[0, N]``, repeats allowed.
    row_chunk: rows of logits per block (static).

  Returns:
    ``float32[..., m]``, the same values and gradients as the gather (up to
    float32 summation order).
  """
  if hidden.shape[:-1] != items.shape[:-1]:
    raise ValueError(f"hidden {hidden.shape} and items {items.shape}: expected the same "
                     "leading shape.")
  rows = hidden.reshape(-1, hidden.shape[-1])
  flat_items = items.reshape(-1, items.shape[-1])
  chunk = min(row_chunk, -(-rows.shape[0] // 8) * 8)
  pad = -rows.shape[0] % chunk
  rows = jnp.pad(rows, [(0, pad), (0, 0)])
  flat_items = jnp.pad(flat_items, [(0, pad), (0, 0)])  # Padded rows score item 0, dropped.
  scores = _blocked(rows, table, flat_items, chunk)
  return scores[:scores.shape[0] - pad].reshape(items.shape)
