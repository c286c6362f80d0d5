"""Row-sparse updates of the item table: a step reads and writes only the rows it touches.

A batch names a few thousand items (its inputs, targets and negatives), yet
dense Adam reads and writes the whole ``[rows, d]`` table and both its
moments every step, so the step's cost grows with the catalogue. Here the
train step (``train.make_train_step`` given a ``SparseOptimizer``):

1. collects the batch's item ids, unique and sorted (``touched_rows``): a
   static number ``U`` of slots, row 0 (padding) always first, unused slots
   holding the out-of-range id ``rows``;
2. gathers those rows into a ``[U, d]`` table and renumbers the batch's ids
   into it (``localize``): the model and the loss run on the small table and
   differentiate with respect to it, so no ``[rows, d]`` gradient exists;
3. updates the touched rows with a ``RowTransformation`` (lazy Adam or
   row-wise Adagrad) and scatters them back (out-of-range slots dropped);
   every other parameter goes through the ordinary optax chain.

With the table split by rows over the ``'model'`` mesh axis, the forward
pass's gather is a masked local gather plus an all-reduce of ``[U, d]`` over
``'model'``; the update (``SparseOptimizer(mesh=...)``) runs per shard: each
device maps the replicated ids to its own rows, and reads and writes only
those rows and their moments. ``docs/scaling.md`` counts the bytes. The math
differs from dense Adam only for untouched rows, which keep their values and
moments (docs/scaling.md).
Full softmax scores every item, so every row is touched: the same code then
updates all rows (dense by nature).
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from deeprec_jax import sharding
from deeprec_jax.models import item_embedding

Array = jax.Array
# train.item_optimizer values; 'dense' = the table is an ordinary optax leaf.
ITEM_OPTIMIZERS = ("dense", "lazy_adam", "rowwise_adagrad")
# Batch fields that hold item ids (rows of the table).
ITEM_ID_FIELDS = ("item_seq", "targets", "negatives")


def split_table(params: Mapping[str, Any]) -> tuple[dict[str, Any], Array]:
  """``params -> (every other parameter, the item table [rows, d])``."""
  outer, inner = item_embedding.ITEM_TABLE
  rest = dict(params)
  rest[outer] = {k: v for k, v in params[outer].items() if k != inner}
  return rest, params[outer][inner]


def join_table(rest: Mapping[str, Any], table: Array) -> dict[str, Any]:
  """Inverse of ``split_table`` (``table`` may be the small ``[U, d]`` one)."""
  outer, inner = item_embedding.ITEM_TABLE
  params = dict(rest)
  params[outer] = {**rest[outer], inner: table}
  return params


def _at_table_path(leaf: Any) -> dict[str, Any]:
  # Optimizer moments sit at the table's path, so sharding.param_shardings
  # splits them by rows like the table itself.
  outer, inner = item_embedding.ITEM_TABLE
  return {outer: {inner: leaf}}


def _leaf(tree: Mapping[str, Any]) -> Array:
  outer, inner = item_embedding.ITEM_TABLE
  return tree[outer][inner]


def touched_rows(id_arrays: Sequence[Array], num_rows: int) -> tuple[Array, list[Array]]:
  """The rows ``id_arrays`` name, and each array renumbered into them.

  Args:
    id_arrays: int arrays of row ids in ``[0, num_rows)``, any shapes.
    num_rows: rows of the table.

  Returns:
    ``(ids, local)``: ``ids int32[U]`` sorted unique ids with row 0 first,
    ``U = min(1 + total ids, num_rows)`` (static), unused slots set to
    ``num_rows``; ``local[i]`` has the shape of ``id_arrays[i]`` and
    ``ids[local[i]] == id_arrays[i]``.
  """
  flat = jnp.concatenate([jnp.zeros((1,), jnp.int32)]
                         + [jnp.ravel(a).astype(jnp.int32) for a in id_arrays])
  size = min(flat.size, num_rows)
  ids, inverse = jnp.unique(flat, size=size, fill_value=num_rows, return_inverse=True)
  inverse = jnp.ravel(inverse)[1:]
  local, start = [], 0
  for array in id_arrays:
    local.append(inverse[start:start + array.size].reshape(array.shape).astype(array.dtype))
    start += array.size
  return ids.astype(jnp.int32), local


def localize(batch: Mapping[str, Array], num_rows: int, *,
             all_rows: bool = False) -> tuple[Array, dict[str, Array]]:
  """``(ids, batch with its item ids renumbered into ids)``; see ``touched_rows``.

  ``all_rows`` (full softmax, which scores every item): ``ids = arange(num_rows)``
  and the batch unchanged.
  """
  if all_rows:
    return jnp.arange(num_rows, dtype=jnp.int32), dict(batch)
  fields = [name for name in ITEM_ID_FIELDS if batch.get(name) is not None]
  ids, local = touched_rows([batch[name] for name in fields], num_rows)
  return ids, {**batch, **dict(zip(fields, local, strict=True))}


def gather(table: Array, ids: Array) -> Array:
  """``table[ids]``: ``[U, ...]``, zeros for the out-of-range slots."""
  return jnp.take(table, ids, axis=0, mode="fill", fill_value=0)


def scatter(table: Array, ids: Array, rows: Array) -> Array:
  """``table`` with rows ``ids`` set to ``rows``; out-of-range slots dropped."""
  return table.at[ids].set(rows.astype(table.dtype), mode="drop")


class RowTransformation(NamedTuple):
  """An optax-style transformation over the touched rows of one table.

  ``init(table [rows, d]) -> state``; ``update(ids int32[U], row_grads [U, d],
  state, rows [U, d]) -> (row_updates [U, d], state)``: the returned state
  differs from the old one only at ``ids``; ``rows + row_updates`` are the new
  rows.
  """

  init: Callable[[Array], Any]
  update: Callable[[Array, Array, Any, Array], tuple[Array, Any]]


class LazyAdamState(NamedTuple):
  count: Array  # int32[]: steps taken, for the bias correction (as TF's LazyAdam)
  mu: Any  # first moment at the table's path, [rows, d]
  nu: Any  # second moment, [rows, d]


def lazy_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0,
              decoupled: bool = False) -> RowTransformation:
  """Adam on the touched rows only; untouched rows keep their values and moments.

  On a touched row this is exactly ``optax.adam`` (``decoupled``:
  ``optax.adamw``'s ordering; else ``add_decayed_weights`` before Adam, the
  L2 penalty), with the bias correction of the global step count.
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(table: Array) -> LazyAdamState:
    # Two arrays, not one twice: a donated state must not alias its buffers.
    return LazyAdamState(count=jnp.zeros([], jnp.int32),
                         mu=_at_table_path(jnp.zeros_like(table)),
                         nu=_at_table_path(jnp.zeros_like(table)))

  def update(ids, row_grads, state, rows):
    if weight_decay and not decoupled:
      row_grads = row_grads + weight_decay * rows
    mu_rows = (1 - b1) * row_grads + b1 * gather(_leaf(state.mu), ids)
    nu_rows = (1 - b2) * row_grads**2 + b2 * gather(_leaf(state.nu), ids)
    count = optax.safe_increment(state.count)
    mu_hat = mu_rows / (1 - b1**count).astype(mu_rows.dtype)
    nu_hat = nu_rows / (1 - b2**count).astype(nu_rows.dtype)
    direction = mu_hat / (jnp.sqrt(nu_hat) + eps)
    if weight_decay and decoupled:
      direction = direction + weight_decay * rows
    updates = -schedule(state.count) * direction
    return updates, LazyAdamState(
        count=count, mu=_at_table_path(scatter(_leaf(state.mu), ids, mu_rows)),
        nu=_at_table_path(scatter(_leaf(state.nu), ids, nu_rows)))

  return RowTransformation(init, update)


class RowwiseAdagradState(NamedTuple):
  count: Array  # int32[]: steps taken, for the learning-rate schedule
  accumulator: Any  # sum over steps of each row's mean squared gradient, [rows]


def rowwise_adagrad(learning_rate: optax.ScalarOrSchedule, eps: float = 1e-8,
                    initial_accumulator: float = 0.0,
                    weight_decay: float = 0.0) -> RowTransformation:
  """Row-wise Adagrad (TorchRec's / FBGEMM's EXACT_ROWWISE_ADAGRAD): one moment per row.

  ``acc[r] += mean_j g[r, j]^2``, ``update[r] = -lr * g[r] / (sqrt(acc[r]) + eps)``;
  ``weight_decay`` is an L2 penalty added to the gradient. A third of
  Adam's optimizer memory is ``rows`` floats instead of ``2 * rows * d``.
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(table: Array) -> RowwiseAdagradState:
    accumulator = jnp.full(table.shape[:1], initial_accumulator, table.dtype)
    return RowwiseAdagradState(count=jnp.zeros([], jnp.int32),
                               accumulator=_at_table_path(accumulator))

  def update(ids, row_grads, state, rows):
    if weight_decay:
      row_grads = row_grads + weight_decay * rows
    acc_rows = gather(_leaf(state.accumulator), ids) + jnp.mean(row_grads**2, axis=-1)
    updates = -schedule(state.count) * row_grads / (jnp.sqrt(acc_rows)[:, None] + eps)
    return updates, RowwiseAdagradState(
        count=optax.safe_increment(state.count),
        accumulator=_at_table_path(scatter(_leaf(state.accumulator), ids, acc_rows)))

  return RowTransformation(init, update)


class SparseOptimizer(NamedTuple):
  """Every parameter through ``dense`` (optax), the item table row-wise through ``rows``.

  ``clip_norm > 0`` clips the joint gradient (both parts) to that global
  norm, as ``optax.clip_by_global_norm`` would the dense gradient: the norm of
  the touched rows' gradient is the dense table gradient's norm. With
  ``mesh``, the row update runs per shard of the row-split table
  (``jax.shard_map``): each device reads and writes its own rows and
  moments, with no collective.
  """

  dense: optax.GradientTransformation
  rows: RowTransformation
  clip_norm: float = 0.0
  mesh: jax.sharding.Mesh | None = None

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    rest, table = split_table(params)
    return {"dense": self.dense.init(rest), "items": self.rows.init(table)}

  def apply(self, params: Mapping[str, Any], opt_state: Mapping[str, Any], rest_grads: Any,
            ids: Array, row_grads: Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """One step: ``(new params, new opt_state)``; rows outside ``ids`` are unchanged."""
    if self.clip_norm > 0:
      norm = optax.global_norm((rest_grads, row_grads))
      scale = jnp.where(norm < self.clip_norm, 1.0, self.clip_norm / norm)
      rest_grads, row_grads = jax.tree.map(lambda g: g * scale.astype(g.dtype),
                                           (rest_grads, row_grads))
    rest, table = split_table(params)
    updates, dense_state = self.dense.update(rest_grads, opt_state["dense"], rest)
    update_rows = self._update_rows
    if self.mesh is not None:
      table_spec = sharding.param_shardings(params, self.mesh)[item_embedding.ITEM_TABLE[0]][
          item_embedding.ITEM_TABLE[1]].spec
      state_specs = jax.tree.map(lambda s: s.spec,
                                 sharding.param_shardings(opt_state["items"], self.mesh))
      update_rows = jax.shard_map(
          functools.partial(self._update_rows, shard_axis=sharding.MODEL_AXIS),
          mesh=self.mesh, in_specs=(table_spec, state_specs, PartitionSpec(), PartitionSpec()),
          out_specs=(table_spec, state_specs))
    table, items_state = update_rows(table, opt_state["items"], ids, row_grads)
    return (join_table(optax.apply_updates(rest, updates), table),
            {"dense": dense_state, "items": items_state})

  def _update_rows(self, table: Array, state: Any, ids: Array, row_grads: Array, *,
                   shard_axis: str | None = None) -> tuple[Array, Any]:
    """The rows ``ids`` of ``table`` (one shard of it, under ``shard_axis``) updated."""
    if shard_axis is not None:  # ids -> this shard's rows; others out of range (dropped)
      shard_rows = table.shape[0]
      local = ids - jax.lax.axis_index(shard_axis) * shard_rows
      ids = jnp.where((local >= 0) & (local < shard_rows), local, shard_rows)
    rows = gather(table, ids)
    row_updates, state = self.rows.update(ids, row_grads, state, rows)
    return scatter(table, ids, rows + row_updates), state
