"""Ranking metrics (HR, NDCG, MRR @K), full and sampled, computed on device.

Definitions, for one user with target item ``t`` and scores ``s`` over the
columns ``0..N`` (column 0 = padding):

* **Candidates** compete with the target: every item ``j`` in ``1..N`` with
  ``j != t`` and ``j`` not in the user's ``exclude`` list. Column 0 and the
  excluded items are never candidates; the target itself is never excluded,
  even if it appears in ``exclude``.
* **Rank** (0-based) of the target: the number of candidates that beat it.
  Ties go *against* the target (``ties='pessimistic'``, the default): a
  candidate beats the target when ``s_j >= s_t``. So the rank is
  ``#(s_j > s_t) + #(s_j == s_t)`` over candidates, the target is placed last
  among the items tied with it, and a model that scores every item the same
  gets the worst rank instead of a perfect one. ``ties='optimistic'`` counts
  only ``s_j > s_t`` (what an argsort with the target first gives). Without
  ties the two agree. A NaN target score gets the worst rank (all candidates);
  a NaN candidate score never beats the target.
* ``hr@K = [rank < K]``, ``ndcg@K = [rank < K] / log2(rank + 2)``,
  ``mrr@K = [rank < K] / (rank + 1)``: with one relevant item per user the
  ideal DCG is 1, so NDCG needs no normaliser.
* **Sampled** metrics rank the target among itself and ``S`` sampled
  negatives instead of the whole catalogue (the SASRec / BERT4Rec protocol);
  a sampled negative equal to 0 (padding) or to the target is ignored. Their
  names carry the prefix ``'sampled_'``.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from deeprec_jax import sharding

Array = jax.Array
TIES = ("pessimistic", "optimistic")


def check_ties(ties: str) -> None:
  """Raises ValueError unless ``ties`` is one of ``TIES``."""
  if ties not in TIES:
    raise ValueError(f"unknown tie rule {ties!r}; expected one of {', '.join(TIES)}.")


def excluded_mask(num_columns: int, exclude: Array | None, batch_size: int) -> Array:
  """Columns that may never be ranked or recommended: padding and ``exclude``.

  Args:
    num_columns: ``N + 1``, the width of the score matrix.
    exclude: ``int[B, H]`` item ids to leave out, 0-padded, or ``None``.
    batch_size: ``B``.

  Returns:
    ``bool[B, N + 1]``, True where the item is excluded (always column 0).
  """
  mask = jnp.zeros((batch_size, num_columns), dtype=bool).at[:, 0].set(True)
  if exclude is not None and exclude.shape[-1]:
    # A scatter of B * H entries; comparing against every item instead would
    # build a [B, H, N + 1] array.
    rows = jnp.arange(batch_size)[:, None]
    mask = mask.at[rows, exclude].set(True, mode="drop")
  return mask


def _count_beating(candidate_scores: Array, target_scores: Array, candidates: Array,
                   ties: str) -> Array:
  """Rank: how many candidates beat the target, per row (int32)."""
  check_ties(ties)
  t = target_scores[:, None]
  beats = candidate_scores >= t if ties == "pessimistic" else candidate_scores > t
  rank = jnp.sum(candidates & beats, axis=-1, dtype=jnp.int32)
  worst = jnp.sum(candidates, axis=-1, dtype=jnp.int32)
  return jnp.where(jnp.isnan(target_scores), worst, rank)


def full_ranks(scores: Array, target: Array, exclude: Array | None = None, *,
               ties: str = "pessimistic") -> Array:
  """0-based rank of each target among all non-excluded items.

  Args:
    scores: ``float[B, N + 1]`` over all items, column 0 = padding.
    target: ``int[B]`` target items in ``1..N``.
    exclude: ``int[B, H]`` items to leave out (0-padded), or ``None``. The
      target is never excluded.
    ties: ``'pessimistic'`` (ties beat the target) or ``'optimistic'``.

  Returns:
    ``int32[B]`` ranks (see the module docstring).
  """
  batch_size, num_columns = scores.shape
  target_scores = jnp.take_along_axis(scores, target[:, None], axis=1)[:, 0]
  candidates = ~excluded_mask(num_columns, exclude, batch_size)
  candidates &= jnp.arange(num_columns) != target[:, None]
  return _count_beating(scores, target_scores, candidates, ties)


def sampled_ranks(scores: Array, target: Array, negatives: Array, *,
                  ties: str = "pessimistic") -> Array:
  """0-based rank of each target among itself and its sampled negatives.

  Args:
    scores: ``float[B, N + 1]`` over all items, column 0 = padding.
    target: ``int[B]`` target items.
    negatives: ``int[B, S]`` sampled items; 0 or the target itself is ignored.
    ties: ``'pessimistic'`` (ties beat the target) or ``'optimistic'``.

  Returns:
    ``int32[B]`` ranks in ``0..S``.
  """
  target_scores = jnp.take_along_axis(scores, target[:, None], axis=1)[:, 0]
  negative_scores = jnp.take_along_axis(scores, negatives, axis=1)
  candidates = (negatives > 0) & (negatives != target[:, None])
  return _count_beating(negative_scores, target_scores, candidates, ties)


def rank_metrics(ranks: Array, ks: Sequence[int], prefix: str = "") -> dict[str, Array]:
  """HR, NDCG and MRR at each cut-off, per row, so callers can weight and sum.

  Args:
    ranks: ``int[B]`` 0-based ranks.
    ks: cut-offs, e.g. ``(1, 5, 10, 20)``.
    prefix: prepended to every name, e.g. ``'sampled_'``.

  Returns:
    ``{f'{prefix}hr@{k}', f'{prefix}ndcg@{k}', f'{prefix}mrr@{k}'}`` for each
    ``k``, each ``float32[B]``.
  """
  r = ranks.astype(jnp.float32)
  out = {}
  for k in ks:
    if int(k) != k or k < 1:
      raise ValueError(f"metric cut-offs (config.eval.ks) must be positive integers, got {k!r}.")
    hit = ranks < k
    out[f"{prefix}hr@{k}"] = hit.astype(jnp.float32)
    out[f"{prefix}ndcg@{k}"] = jnp.where(hit, 1.0 / jnp.log2(r + 2.0), 0.0)
    out[f"{prefix}mrr@{k}"] = jnp.where(hit, 1.0 / (r + 1.0), 0.0)
  return out


def top_k_items(scores: Array, exclude: Array | None, k: int, *,
                mesh: Mesh | None = None) -> tuple[Array, Array]:
  """The ``k`` best items per row, never padding or an excluded item.

  Ties are broken towards the lower item id (``jax.lax.top_k``). If fewer than
  ``k`` items remain, the tail holds excluded ids with score ``-inf``.

  Args:
    scores: ``float[B, N + 1]`` over all items, column 0 = padding.
    exclude: ``int[B, H]`` items never to recommend (0-padded), or ``None``.
    k: how many items to return.
    mesh: the run's mesh (``sharding.make_mesh``) when the item axis of
      ``scores`` is split over its ``'model'`` axis (``train.model_parallel >
      1``): then each device takes the top ``k`` of its own items and only
      those candidates are gathered (``sharded_top_k``). ``None`` or a model
      axis of size 1: one ``jax.lax.top_k``. Both give the same result.

  Returns:
    ``(items int32[B, k], scores float[B, k])``, best first.
  """
  batch_size, num_columns = scores.shape
  masked = jnp.where(excluded_mask(num_columns, exclude, batch_size), -jnp.inf, scores)
  if mesh is None or mesh.shape[sharding.MODEL_AXIS] == 1:
    top_scores, items = jax.lax.top_k(masked, k)
  else:
    top_scores, items = sharded_top_k(masked, k, mesh)
  return items.astype(jnp.int32), top_scores


def sharded_top_k(scores: Array, k: int, mesh: Mesh) -> tuple[Array, Array]:
  """``jax.lax.top_k`` over the last axis, split over the mesh's ``'model'`` axis.

  Each device takes the top ``k`` of its columns, the ``m * k`` candidates
  (m = model axis size) are all-gathered, and a second top ``k`` merges them.
  Every true top-``k`` column is in its own shard's top ``k``, and the
  candidates arrive in column order, so values, ids and tie order equal a
  single ``top_k`` over all columns, without gathering the ``[B, N]`` scores.

  Args:
    scores: ``float[B, C]``. Padded here with ``-inf`` columns to a multiple
      of the model axis size; with ``k <= C`` a padding column never comes
      before a real one (ties go to the lower id).
    k: how many columns to return, ``<= C``.
    mesh: a mesh with axes ``('data', 'model')``.

  Returns:
    ``(values float[B, k], column ids int32[B, k])``, best first.
  """
  batch_size, num_columns = scores.shape
  if not 1 <= k <= num_columns:
    raise ValueError(f"top k={k} must lie in [1, {num_columns}] (the number of items + 1).")
  shards = mesh.shape[sharding.MODEL_AXIS]
  padding = -num_columns % shards
  scores = jnp.pad(scores, ((0, 0), (0, padding)), constant_values=-jnp.inf)
  width = scores.shape[1] // shards
  local_k = min(k, width)
  # Split rows over 'data' too when they divide, else every data row of the
  # mesh ranks the whole batch (recommendation batches have any size).
  rows = sharding.DATA_AXIS if batch_size % mesh.shape[sharding.DATA_AXIS] == 0 else None

  def local_top_k(local_scores):
    values, ids = jax.lax.top_k(local_scores, local_k)
    ids = ids + jax.lax.axis_index(sharding.MODEL_AXIS) * width  # Global column ids.
    values = jax.lax.all_gather(values, sharding.MODEL_AXIS, axis=1, tiled=True)
    ids = jax.lax.all_gather(ids, sharding.MODEL_AXIS, axis=1, tiled=True)
    values, positions = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(ids, positions, axis=1)

  # check_vma=False: the merged result is the same on every 'model' device
  # (it is computed from all-gathered inputs), which the type check cannot
  # see through lax.all_gather.
  return jax.shard_map(local_top_k, mesh=mesh, in_specs=PartitionSpec(rows, sharding.MODEL_AXIS),
                       out_specs=PartitionSpec(rows, None), check_vma=False)(scores)
