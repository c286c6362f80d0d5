"""Jitted, batched full-ranking evaluation.

``make_eval_step`` builds a pure function ``eval_step(params, batch)`` that
scores every item for each user of an evaluation batch (docs/contracts.md, "Batches":
``item_seq``, ``target``, ``exclude``, ``sampled_negatives``, ``user``,
``weight``) and returns weighted metric *sums* plus ``'count'``, so that
batches, devices and hosts combine by addition. ``evaluate`` adds those sums
up on device over an iterable of batches and divides once at the end.

The caller decides how ``eval_step`` is compiled: plain ``jax.jit`` on one
device, or ``jax.jit`` with ``in_shardings``/``out_shardings`` for data
parallelism (batch split on its first axis, the item table replicated or
split by rows over the mesh's 'model' axis, see ``sharding``; the sums, and
with a split table the rank counts, then become all-reduces inside the
compiled step, and the ``[B, N + 1]`` scores stay split by item).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from deeprec_jax import metrics, models
from deeprec_jax.data import packing

Array = jax.Array
Batch = Mapping[str, Any]
EvalStep = Callable[..., dict[str, Array]]
# Pictures the image tower encodes at a time in evaluation's catalogue pass.
ENCODE_CHUNK = 1024


def score_items(model: nn.Module, params: Any, num_items: int, item_seq: Array, *,
                user: Array | None = None, item_vectors: Array | None = None,
                times: Mapping[str, Array] | None = None) -> Array:
  """Scores of every item after each history: ``float32[B, N + 1]``.

  ``hidden = model.apply(..., last_only=True)`` in inference mode; ``[B, 1, D]``
  outputs are the last position (the state after the whole history, or
  BERT4Rec's mask slot), ``[B, D]`` outputs are used as they are; then
  ``scores = h @ item_vectors.T`` in float32. Column 0 is padding: rank or
  recommend through ``metrics``, which masks it.

  Args:
    model: a linen module following the model contract (README).
    params: its parameters.
    num_items: ``N``; the item table is ``models.item_table(params, N)``.
    item_seq: ``int[B, L]`` left-padded histories, as in an eval batch.
    user: ``int[B]`` user ids, or ``None``.
    item_vectors: ``float[N + 1, D]`` from ``models.item_vectors`` (required
      by image encoders, computed once per evaluation); None = the id table.
    times: ``time_seq`` and ``query_time`` ``int[B, L]`` for models that read
      timestamps (``models.uses_timestamps``); None otherwise.

  Returns:
    ``float32[B, N + 1]``.
  """
  inputs = {} if item_vectors is None else {"item_vectors": item_vectors}
  inputs.update(times or {})
  hidden = model.apply({"params": params}, item_seq, user=user, last_only=True, **inputs)
  if hidden.ndim == 3:
    hidden = hidden[:, -1]
  table = models.item_vectors(model, params, num_items) if item_vectors is None else item_vectors
  return jnp.einsum("bd,nd->bn", hidden.astype(jnp.float32), table.astype(jnp.float32))


def top_k(model: nn.Module, params: Any, num_items: int, item_seq: Array, exclude: Array,
          k: int, *, user: Array | None = None, mesh: Mesh | None = None,
          item_vectors: Array | None = None) -> tuple[Array, Array]:
  """The ``k`` best items after each history (``score_items``, then ``metrics.top_k_items``).

  With ``mesh`` (a model axis of size > 1 and the item table split over it)
  the scores stay split by item and each device ranks only its own items;
  only ``k`` candidates per device are gathered. Jit it, e.g.
  ``jax.jit(functools.partial(top_k, model, num_items=N, k=10, mesh=mesh))``.

  Args:
    model: a linen module following the model contract (README).
    params: its parameters (the model's own shapes).
    num_items: ``N``.
    item_seq: ``int[B, L]`` left-padded histories.
    exclude: ``int[B, H]`` items never to recommend (0-padded).
    k: how many items to return.
    user: ``int[B]`` user ids, or ``None``.
    mesh: the run's mesh, or ``None`` for one ``jax.lax.top_k``.
    item_vectors: as in ``score_items`` (image encoders).

  Returns:
    ``(items int32[B, k], scores float32[B, k])``, best first.
  """
  scores = score_items(model, params, num_items, item_seq, user=user, item_vectors=item_vectors)
  return metrics.top_k_items(scores, exclude, k, mesh=mesh)


def make_eval_step(model: nn.Module, num_items: int, ks: Sequence[int],
                   exclude_history: bool = True, *, ties: str = "pessimistic",
                   cold_items: Any = None, scorer: Callable[..., Array] | None = None
                   ) -> EvalStep:
  """Builds ``eval_step(params, batch[, item_vectors]) -> {metric: weighted sum, 'count'}``.

  For each row: the scores of all items (``score_items``: the last hidden
  state against the item table, in float32), the full rank of
  ``batch['target']`` (``metrics.full_ranks``) and, when the batch has
  ``sampled_negatives`` with ``S > 0``, the sampled rank too.

  Args:
    model: a linen module following the model contract (README).
    num_items: ``N``; the item table is ``models.item_table(params, N)``.
    ks: cut-offs for HR/NDCG/MRR, e.g. ``config.eval.ks``.
    exclude_history: rank without the items in ``batch['exclude']`` (the
      target is never excluded). Padding (item 0) is always excluded.
    ties: tie rule for ranks, see ``metrics`` (default pessimistic).
    cold_items: item ids withheld from training (``cold_start``); if given,
      every metric and ``count`` are also summed over the rows whose target is
      one of them (``'cold/<name>'``) and over the others (``'warm/<name>'``).
    scorer: ``(params, batch, item_vectors) -> float32[B, N + 1]`` for models
      outside the contract (the CTR model's ``rank_logits``); None =
      ``score_items``.

  Returns:
    A pure function of ``(params, batch)`` (no Python-side state, no host
    transfers) returning float32 scalars: ``'hr@K'``, ``'ndcg@K'``,
    ``'mrr@K'`` for each K, the same with prefix ``'sampled_'`` when sampled
    negatives are present, each the sum over rows of ``weight * value``, and
    ``'count'``, the sum of ``weight``.
  """
  # Fail here, not at the first trace inside a training run.
  if not ks or any(int(k) != k or k < 1 for k in ks):
    raise ValueError(f"config key eval.ks: expected positive integer cut-offs, got {ks!r}.")
  ks = tuple(int(k) for k in ks)
  metrics.check_ties(ties)

  is_cold = None
  if cold_items is not None and len(cold_items):
    is_cold = jnp.zeros(num_items + 1, bool).at[jnp.asarray(cold_items)].set(True)

  def eval_step(params: Any, batch: Batch, item_vectors: Array | None = None
                ) -> dict[str, Array]:
    scores = (score_items(model, params, num_items, batch["item_seq"], user=batch.get("user"),
                          item_vectors=item_vectors, times=packing.time_kwargs(batch))
              if scorer is None else scorer(params, batch, item_vectors))
    target = batch["target"]
    exclude = batch["exclude"] if exclude_history else None
    per_row = metrics.rank_metrics(metrics.full_ranks(scores, target, exclude, ties=ties), ks)
    negatives = batch.get("sampled_negatives")
    if negatives is not None and negatives.shape[-1] > 0:  # Static: shapes are known at trace.
      sampled = metrics.sampled_ranks(scores, target, negatives, ties=ties)
      per_row.update(metrics.rank_metrics(sampled, ks, prefix="sampled_"))

    weight = batch.get("weight")
    weight = (jnp.ones(target.shape, jnp.float32) if weight is None
              else jnp.asarray(weight, jnp.float32))
    # `where`, not only a multiply: a padding row (weight 0) may hold any
    # target, and must not bring a nan into the sums.
    sums = {name: jnp.sum(jnp.where(weight > 0, weight * value, 0.0))
            for name, value in per_row.items()}
    sums["count"] = jnp.sum(weight)
    if is_cold is not None:
      cold = is_cold[target]
      for prefix, rows in (("cold/", cold), ("warm/", ~cold)):
        sums.update({prefix + name: jnp.sum(jnp.where(rows & (weight > 0), weight * value, 0.0))
                     for name, value in per_row.items()})
        sums[prefix + "count"] = jnp.sum(jnp.where(rows, weight, 0.0))
    return sums

  return eval_step


def evaluate(eval_step: EvalStep, params: Any, batches: Iterable[Batch], *,
             item_vectors: Array | None = None) -> dict[str, float]:
  """Runs ``eval_step`` over ``batches`` and returns weighted means.

  The per-batch sums stay on device and are added there; the only host
  transfer is one ``jax.device_get`` at the end, so batches are dispatched
  asynchronously.

  Args:
    eval_step: from ``make_eval_step``, normally already ``jax.jit``-ed by the
      caller (with shardings for data parallelism). A function that is not
      jitted yet is wrapped in ``jax.jit`` here.
    params: model parameters, as ``eval_step`` expects them.
    batches: evaluation batches (numpy or ``jax.Array``), e.g. one pass of the
      validation or test pipeline.
    item_vectors: the catalogue's ``models.item_vectors``, computed once by
      the caller and given to every step (image encoders); None = not passed.

  Returns:
    ``{metric: sum(weight * value) / sum(weight)}`` plus ``'count'``, the
    total weight (the number of real users evaluated). ``'cold/<metric>'``
    and ``'warm/<metric>'`` are divided by their own ``count`` (0 without rows).

  Raises:
    ValueError: if there are no batches or the total weight is 0.
  """
  if not hasattr(eval_step, "lower"):  # Not a jax.jit-wrapped function yet.
    eval_step = jax.jit(eval_step)
  totals = None
  for batch in batches:
    sums = (eval_step(params, batch) if item_vectors is None
            else eval_step(params, batch, item_vectors))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("evaluate() got no batches.")
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  if count <= 0:
    raise ValueError("evaluate() got only padding rows (total weight 0).")
  counts = {prefix: float(totals.pop(prefix + "count")) for prefix in ("cold/", "warm/")
            if prefix + "count" in totals}
  results = {}
  for name, value in totals.items():
    prefix = name[:5] if name[:5] in counts else ""
    total = counts[prefix] if prefix else count
    results[name] = float(value) / total if total > 0 else 0.0
  results["count"] = count
  results.update({prefix + "count": value for prefix, value in counts.items()})
  return results
