"""Training losses over hidden states and the shared item table.

Every loss sees only ``(hidden, item_table, targets, negatives)``, never a model:

  * ``hidden``: ``float[B, L, D]``, one state per target position, or
    ``float[B, D]`` for window models (Caser), where one state predicts all
    ``T`` targets of its row and is broadcast against ``targets [B, T]``.
  * ``item_table``: ``float[N + 1, D]``, rows ``0..N`` of the shared item
    embedding (``models.item_table``); row 0 is padding and never an item.
  * ``targets``: ``int[B, L]`` or ``int[B, T]``; 0 means "no target here" and
    the position contributes nothing to the loss or its gradient.
  * ``negatives``: ``int[B, L, k]`` / ``int[B, T, k]`` (or anything that
    broadcasts to ``targets.shape + (k,)``). A negative equal to 0 (padding) or
    to its own target is ignored: the sampler may collide with the positive,
    and scoring the positive as a negative would push it both ways at once.

Each loss returns the mean over real targets (``targets > 0``) of a
per-target loss, or ``(mean, count)`` with ``return_count=True`` (count of real
targets, float32) so that a caller can log it or re-weight across shards. A
batch without any real target has loss 0. Logits are computed in float32 even
when ``hidden`` is bfloat16: the log-sum-exp over thousands of items and the
sigmoid tails lose too much in 8 mantissa bits.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[..., Array | tuple[Array, Array]]


def _align(hidden: Array, targets: Array) -> Array:
  """Returns ``hidden`` in float32 with one axis per target axis.

  Window models give ``[B, D]`` for ``targets [B, T]``: a singleton target axis
  lets the same state broadcast against all ``T`` targets without copying it.
  """
  if hidden.ndim == targets.ndim:
    hidden = hidden[..., None, :]
  elif hidden.ndim != targets.ndim + 1:
    raise ValueError(f"hidden {hidden.shape} does not match targets {targets.shape}: expected "
                     "hidden [*targets.shape, D] or, for window models, [B, D] with targets "
                     "[B, T].")
  return hidden.astype(jnp.float32)


def _item_logits(hidden: Array, item_table: Array, items: Array) -> Array:
  """Scores of a few items per position: ``hidden [..., D]``, ``items [..., m]`` -> ``[..., m]``.

  Gathers the ``m`` rows instead of scoring the whole catalogue.
  """
  embeddings = jnp.take(item_table, items, axis=0).astype(jnp.float32)  # [..., m, D]
  return jnp.sum(hidden[..., None, :] * embeddings, axis=-1)


def _valid_negatives(targets: Array, negatives: Array) -> tuple[Array, Array]:
  """Broadcasts ``negatives`` to ``targets.shape + (k,)`` and says which count."""
  if negatives is None:
    raise ValueError("this loss needs sampled negatives (batch['negatives']); only "
                     "train.loss='softmax' works without them.")
  negatives = jnp.broadcast_to(negatives, targets.shape + negatives.shape[-1:])
  valid = (negatives > 0) & (negatives != targets[..., None])
  return negatives, valid


def _masked_mean(per_target: Array, targets: Array,
                 return_count: bool) -> Array | tuple[Array, Array]:
  """Mean of ``per_target`` over ``targets > 0``; 0 when there is none."""
  mask = targets > 0
  count = jnp.sum(mask, dtype=jnp.float32)
  # `where`, not a multiply: a padded position may hold inf/nan (e.g. -inf
  # logits of the padding row), and 0 * inf would leak nan into the sum.
  loss = jnp.sum(jnp.where(mask, per_target, 0.0)) / jnp.maximum(count, 1.0)
  return (loss, count) if return_count else loss


def bce_sampled(hidden: Array, item_table: Array, targets: Array, negatives: Array, *,
                return_count: bool = False) -> Array | tuple[Array, Array]:
  """SASRec's binary cross-entropy with sampled negatives.

  Per real target ``t`` with positive logit ``s_pos`` and negative logits
  ``s_neg_1..s_neg_k``::

    loss_t = -log sigmoid(s_pos) - sum_k log sigmoid(-s_neg_k)

  i.e. the negative terms are *summed* per target (not averaged over ``k``),
  and the result is averaged over real targets. With ``k = 1`` this is exactly
  SASRec's ``sum(-log σ(pos) - log σ(-neg)) / sum(is_target)``. Ignored
  negatives (0 or equal to the target) contribute 0.

  Args:
    hidden: ``float[B, L, D]`` or ``float[B, D]`` (window models).
    item_table: ``float[N + 1, D]``, row 0 = padding.
    targets: ``int[B, L]`` or ``int[B, T]``; 0 = no target.
    negatives: ``int[..., k]`` broadcastable to ``targets.shape + (k,)``.
    return_count: also return the number of real targets.

  Returns:
    Scalar float32 loss, or ``(loss, count)``.
  """
  h = _align(hidden, targets)
  negatives, valid = _valid_negatives(targets, negatives)
  pos = _item_logits(h, item_table, targets[..., None])[..., 0]
  neg = _item_logits(h, item_table, negatives)
  # -log σ(x) = softplus(-x) and -log σ(-x) = softplus(x), both stable.
  per_target = jax.nn.softplus(-pos) + jnp.sum(jnp.where(valid, jax.nn.softplus(neg), 0.0), -1)
  return _masked_mean(per_target, targets, return_count)


def sampled_softmax(hidden: Array, item_table: Array, targets: Array, negatives: Array, *,
                    log_q: Array | None = None,
                    return_count: bool = False) -> Array | tuple[Array, Array]:
  """Cross-entropy over the ``1 + k`` logits ``[s_pos, s_neg_1..s_neg_k]``.

  ``loss_t = logsumexp([s_pos, s_neg_valid...]) - s_pos``, averaged over real
  targets; ignored negatives (0 or equal to the target) get a ``-inf`` logit.

  Args:
    hidden: ``float[B, L, D]`` or ``float[B, D]`` (window models).
    item_table: ``float[N + 1, D]``, row 0 = padding.
    targets: ``int[B, L]`` or ``int[B, T]``; 0 = no target.
    negatives: ``int[..., k]`` broadcastable to ``targets.shape + (k,)``.
    log_q: optional ``float[N + 1]``, log-probability with which the sampler
      draws each item. When given, ``log_q[item]`` is subtracted from every
      logit (positive and negatives): the logQ correction (Bengio & Senecal;
      Yi et al., RecSys 2019) without which a popularity sampler would
      over-penalise popular items. Off by default; for a
      uniform sampler it is a constant shift and changes nothing.
    return_count: also return the number of real targets.

  Returns:
    Scalar float32 loss, or ``(loss, count)``.
  """
  h = _align(hidden, targets)
  negatives, valid = _valid_negatives(targets, negatives)
  items = jnp.concatenate([targets[..., None], negatives], axis=-1)  # [..., 1 + k]
  logits = _item_logits(h, item_table, items)
  if log_q is not None:
    logits = logits - jnp.take(log_q, items, axis=0).astype(jnp.float32)
  valid = jnp.concatenate([jnp.ones_like(valid[..., :1]), valid], axis=-1)
  logits = jnp.where(valid, logits, -jnp.inf)
  per_target = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
  return _masked_mean(per_target, targets, return_count)


# Rows of logits per step of the streamed log-sum-exp: [512, N + 1] float32 is
# ~7 MB for ML-1M's catalogue, small enough to stay in cache between the
# matmul, the exp and the reductions that read it.
CATALOGUE_ROW_CHUNK = 512


def _row_chunks(x: Array, chunk: int) -> Array:
  """``[R, ...]`` -> ``[ceil(R / chunk), chunk, ...]``, zero-padded at the end."""
  pad = -x.shape[0] % chunk
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(-1, chunk, *x.shape[1:])


def _unchunk(x: Array, rows: int) -> Array:
  return x.reshape(-1, *x.shape[2:])[:rows]


def _catalogue_logits(hidden: Array, table: Array) -> Array:
  """``hidden [r, D] @ table[N + 1, D].T`` with the padding column at ``-inf``."""
  logits = hidden @ table.T
  return jnp.where(jnp.arange(table.shape[0]) == 0, -jnp.inf, logits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def catalogue_logsumexp(hidden: Array, table: Array, row_chunk: int = CATALOGUE_ROW_CHUNK
                        ) -> Array:
  """``logsumexp_{j=1..N}(hidden @ table[j])`` per row, streamed over rows.

  Equal to ``logsumexp(hidden @ table[1:].T, axis=-1)``, but the ``[R, N + 1]``
  logits never exist at once: rows go through in chunks of ``row_chunk``, and
  the backward pass recomputes each chunk's logits from ``hidden``, ``table``
  and the saved ``[R]`` log-normalisers instead of keeping them. Plain autodiff
  of the same expression writes and reads ``[R, N + 1]`` several times over
  and was 3x slower on a 2-core CPU (benchmarks/README.md); the extra matmul
  of the recomputation is cheaper than that memory traffic.

  Args:
    hidden: ``float32[R, D]``.
    table: ``float32[N + 1, D]``; row 0 is padding and never scored.
    row_chunk: rows per step (static).

  Returns:
    ``float32[R]``.
  """
  return _catalogue_logsumexp_fwd(hidden, table, row_chunk)[0]


def _catalogue_logsumexp_fwd(hidden, table, row_chunk):
  rows = hidden.shape[0]
  chunk = max(1, min(row_chunk, rows))
  lse = jax.lax.map(lambda h: jax.nn.logsumexp(_catalogue_logits(h, table), axis=-1),
                    _row_chunks(hidden, chunk))
  lse = _unchunk(lse, rows)
  return lse, (hidden, table, lse)


def _catalogue_logsumexp_bwd(row_chunk, residuals, grad):
  hidden, table, lse = residuals
  rows = hidden.shape[0]
  chunk = max(1, min(row_chunk, rows))

  def step(table_grad, xs):
    h, chunk_lse, chunk_grad = xs  # [c, D], [c], [c]
    # d lse / d logits = softmax; zero-padded rows have grad 0 and add nothing.
    probs = jnp.exp(_catalogue_logits(h, table) - chunk_lse[:, None]) * chunk_grad[:, None]
    return table_grad + probs.T @ h, probs @ table

  xs = (_row_chunks(hidden, chunk), _row_chunks(lse, chunk), _row_chunks(grad, chunk))
  table_grad, hidden_grad = jax.lax.scan(step, jnp.zeros_like(table), xs)
  return _unchunk(hidden_grad, rows), table_grad


catalogue_logsumexp.defvjp(_catalogue_logsumexp_fwd, _catalogue_logsumexp_bwd)


def softmax_ce(hidden: Array, item_table: Array, targets: Array, negatives: Array | None = None,
               *, return_count: bool = False,
               row_chunk: int = CATALOGUE_ROW_CHUNK) -> Array | tuple[Array, Array]:
  """Full softmax cross-entropy over items ``1..N``.

  ``loss_t = logsumexp_{j=1..N}(s_j) - s_target``, averaged over real targets.
  The normaliser is ``catalogue_logsumexp`` of ``hidden`` against the table
  (padding column excluded), streamed over ``row_chunk`` rows of logits at a
  time; the target logit is a gathered dot product. Window models compute one
  normaliser per row, shared by its ``T`` targets.

  Args:
    hidden: ``float[B, L, D]`` or ``float[B, D]`` (window models).
    item_table: ``float[N + 1, D]``, row 0 = padding.
    targets: ``int[B, L]`` or ``int[B, T]``; 0 = no target.
    negatives: ignored; accepted so that every loss has the same signature.
    return_count: also return the number of real targets.
    row_chunk: rows of logits per streamed step (memory ``[row_chunk, N + 1]``).

  Returns:
    Scalar float32 loss, or ``(loss, count)``.
  """
  del negatives  # The full softmax needs no samples.
  h = _align(hidden, targets)  # [B, L or 1, D]
  table = item_table.astype(jnp.float32)
  log_normaliser = catalogue_logsumexp(h.reshape(-1, h.shape[-1]), table, row_chunk)
  log_normaliser = log_normaliser.reshape(h.shape[:-1])  # [B, L or 1]
  pos = _item_logits(h, table, targets[..., None])[..., 0]  # [B, L or T]
  return _masked_mean(log_normaliser - pos, targets, return_count)


LOSSES: dict[str, LossFn] = {
    "bce": bce_sampled,
    "sampled_softmax": sampled_softmax,
    "softmax": softmax_ce,
}


def loss_fn(name: str) -> LossFn:
  """Returns the loss named by ``config.train.loss``.

  Args:
    name: one of ``'bce'``, ``'sampled_softmax'``, ``'softmax'``.

  Returns:
    ``fn(hidden, item_table, targets, negatives, *, return_count=False)``.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in LOSSES:
    raise ValueError(f"config key train.loss: unknown loss {name!r}; expected one of "
                     f"{', '.join(LOSSES)}.")
  return LOSSES[name]


def compute(name: str, hidden: Array, item_table: Array, targets: Array,
            negatives: Array | None = None, **kwargs: Any) -> Array | tuple[Array, Array]:
  """``loss_fn(name)(hidden, item_table, targets, negatives, **kwargs)``."""
  return loss_fn(name)(hidden, item_table, targets, negatives, **kwargs)
