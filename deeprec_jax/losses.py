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
    broadcasts to ``targets.shape + (k,)``). ``int[B, 1, k]`` is one set per
    sequence shared by its positions (``train.shared_negatives``): its ``k``
    rows are gathered once and scored by one matmul. A negative equal to 0 (padding) or
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
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deeprec_jax import catalogue_scores

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

  Gathers the ``m`` rows, or, when ``m`` is a sizable fraction of the
  catalogue (gSASRec's 256 negatives), scores the whole catalogue block by
  block and picks the ``m`` columns (``catalogue_scores``): same values.
  """
  if (hidden.shape[:-1] == items.shape[:-1]
      and catalogue_scores.prefers_catalogue(items.shape[-1], item_table.shape[0])):
    return catalogue_scores.gathered_logits(hidden, item_table.astype(jnp.float32), items)
  embeddings = jnp.take(item_table, items, axis=0).astype(jnp.float32)  # [..., m, D]
  return jnp.sum(hidden[..., None, :] * embeddings, axis=-1)


def _valid_negatives(targets: Array, negatives: Array) -> Array:
  """``bool[*targets.shape, k]``: which negatives count (not padding, not the target)."""
  if negatives is None:
    raise ValueError("this loss needs sampled negatives (batch['negatives']); only "
                     "train.loss='softmax' works without them.")
  return (negatives > 0) & (negatives != targets[..., None])


def _negative_logits(hidden: Array, item_table: Array, targets: Array,
                     negatives: Array) -> Array:
  """``[*targets.shape, k]`` logits of the negatives; ``hidden`` as ``_align`` returns it.

  Negatives shared along the position axis (``[B, 1, k]`` against ``[B, L]``
  targets) are gathered once per sequence, ``[B, k, D]``, and scored with one
  matmul; any other shape is broadcast and gathered per position.
  """
  shared = (negatives.ndim == targets.ndim + 1 and negatives.ndim >= 3
            and negatives.shape[-2] == 1 and targets.shape[-1] > 1
            and hidden.shape[-2] == targets.shape[-1])
  if shared:
    embeddings = jnp.take(item_table, negatives[..., 0, :], axis=0).astype(jnp.float32)
    return jnp.einsum("...ld,...kd->...lk", hidden, embeddings)
  negatives = jnp.broadcast_to(negatives, targets.shape + negatives.shape[-1:])
  return _item_logits(hidden, item_table, negatives)


def _masked_mean(per_target: Array, targets: Array,
                 return_count: bool) -> Array | tuple[Array, Array]:
  """Mean of ``per_target`` over ``targets > 0``; 0 when there is none."""
  mask = targets > 0
  count = jnp.sum(mask, dtype=jnp.float32)
  # `where`, not a multiply: a padded position may hold inf/nan (e.g. -inf
  # logits of the padding row), and 0 * inf would leak nan into the sum.
  loss = jnp.sum(jnp.where(mask, per_target, 0.0)) / jnp.maximum(count, 1.0)
  return (loss, count) if return_count else loss


def _binary_logits(h: Array, item_table: Array, targets: Array, negatives: Array,
                   log_k_offset: bool) -> tuple[Array, Array]:
  """The BCE losses' positive ``[...]`` and negative ``[..., k]`` logits, less ``log k``
  with ``log_k_offset``."""
  pos = _item_logits(h, item_table, targets[..., None])[..., 0]
  neg = _negative_logits(h, item_table, targets, negatives)
  if not log_k_offset:
    return pos, neg
  shift = math.log(negatives.shape[-1])
  return pos - shift, neg - shift


def bce_sampled(hidden: Array, item_table: Array, targets: Array, negatives: Array, *,
                log_k_offset: bool = False,
                return_count: bool = False) -> Array | tuple[Array, Array]:
  """SASRec's binary cross-entropy with sampled negatives.

  Per real target ``t`` with positive logit ``s_pos`` and negative logits
  ``s_neg_1..s_neg_k``::

    loss_t = -log sigmoid(s_pos) - sum_k log sigmoid(-s_neg_k)

  i.e. the negative terms are *summed* per target (not averaged over ``k``),
  and the result is averaged over real targets. With ``k = 1`` this is exactly
  SASRec's ``sum(-log σ(pos) - log σ(-neg)) / sum(is_target)``. Ignored
  negatives (0 or equal to the target) contribute 0.

  With ``log_k_offset`` every logit (positive and negatives) is ``s - log k``
  (a no-op at ``k = 1``). Against ``k`` negatives the best BCE logits sit
  near ``log(p_item / (k q_item))``, about ``log k`` below zero; a bias-free
  dot-product scorer starts at zero and must first build that shift out of a
  component shared by every item vector, and until it has, it ranks by
  popularity (docs/results.md, "Many-negative BCE"). The offset starts it
  there; rankings and the set of reachable scores do not change.

  Args:
    hidden: ``float[B, L, D]`` or ``float[B, D]`` (window models).
    item_table: ``float[N + 1, D]``, row 0 = padding.
    targets: ``int[B, L]`` or ``int[B, T]``; 0 = no target.
    negatives: ``int[..., k]`` broadcastable to ``targets.shape + (k,)``.
    log_k_offset: subtract ``log k`` from every logit
      (``config.train.bce_log_k_offset``).
    return_count: also return the number of real targets.

  Returns:
    Scalar float32 loss, or ``(loss, count)``.
  """
  h = _align(hidden, targets)
  valid = _valid_negatives(targets, negatives)
  pos, neg = _binary_logits(h, item_table, targets, negatives, log_k_offset)
  # -log σ(x) = softplus(-x) and -log σ(-x) = softplus(x), both stable.
  per_target = jax.nn.softplus(-pos) + jnp.sum(jnp.where(valid, jax.nn.softplus(neg), 0.0), -1)
  return _masked_mean(per_target, targets, return_count)


def sampled_softmax(hidden: Array, item_table: Array, targets: Array, negatives: Array, *,
                    log_q: Array | None = None, label_smoothing: float = 0.0,
                    return_count: bool = False) -> Array | tuple[Array, Array]:
  """Cross-entropy over the ``1 + k`` logits ``[s_pos, s_neg_1..s_neg_k]``.

  ``loss_t = logsumexp([s_pos, s_neg_valid...]) - s_pos``, averaged over real
  targets; ignored negatives (0 or equal to the target) get a ``-inf`` logit.
  With ``label_smoothing`` e the target distribution is ``1 - e`` on the
  positive plus ``e`` spread evenly over the valid candidates (positive
  included): ``loss_t = lse - (1 - e) s_pos - e * mean_valid(s)``.

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
  valid = _valid_negatives(targets, negatives)
  pos = _item_logits(h, item_table, targets[..., None])  # [..., 1]
  neg = _negative_logits(h, item_table, targets, negatives)  # [..., k]
  if log_q is not None:
    pos = pos - jnp.take(log_q, targets[..., None], axis=0).astype(jnp.float32)
    neg = neg - jnp.take(log_q, negatives, axis=0).astype(jnp.float32)
  logits = jnp.concatenate([pos, neg], axis=-1)  # [..., 1 + k]
  valid = jnp.concatenate([jnp.ones_like(valid[..., :1]), valid], axis=-1)
  logits = jnp.where(valid, logits, -jnp.inf)
  per_target = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
  if label_smoothing:
    mean = (jnp.sum(jnp.where(valid, logits, 0.0), -1)
            / jnp.sum(valid, -1, dtype=jnp.float32))
    per_target = per_target + label_smoothing * (logits[..., 0] - mean)
  return _masked_mean(per_target, targets, return_count)


def gbce(hidden: Array, item_table: Array, targets: Array, negatives: Array, *,
         t: float = 0.75, num_items: int | None = None, log_k_offset: bool = False,
         return_count: bool = False) -> Array | tuple[Array, Array]:
  """gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023).

  With ``k`` negatives sampled from ``N`` items, ``alpha = k / (N - 1)`` and
  ``beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)``::

    loss_t = -beta * log sigmoid(s_pos) - sum_k log sigmoid(-s_neg_k)

  i.e. BCE with the positive's probability raised to ``beta``, which undoes
  the overconfidence that training against few negatives causes (``t = 0``
  gives ``beta = 1``, plain ``bce_sampled``; ``t = 1`` gives ``beta =
  alpha``, fully calibrated). Negatives are summed per target as in ``bce_sampled``; the
  gSASRec code averages all ``1 + k`` terms instead, a constant factor.
  ``log_k_offset`` shifts every logit by ``-log k`` first, as in ``bce_sampled``.

  Args:
    hidden: ``float[B, L, D]`` or ``float[B, D]`` (window models).
    item_table: ``float[N + 1, D]``, row 0 = padding.
    targets: ``int[B, L]`` or ``int[B, T]``; 0 = no target.
    negatives: ``int[..., k]`` broadcastable to ``targets.shape + (k,)``.
    t: the calibration parameter in ``[0, 1]`` (``config.train.gbce_t``;
      gSASRec uses 0.75).
    num_items: N, the catalogue negatives are drawn from; None =
      ``item_table.shape[0] - 1`` (a row-sparse step passes only the rows it
      touches, so it passes N).
    log_k_offset: subtract ``log k`` from every logit (``bce_sampled``).
    return_count: also return the number of real targets.

  Returns:
    Scalar float32 loss, or ``(loss, count)``.
  """
  if not 0.0 <= t <= 1.0:
    raise ValueError(f"config key train.gbce_t={t}: expected a float in [0, 1].")
  h = _align(hidden, targets)
  valid = _valid_negatives(targets, negatives)
  if num_items is None:
    num_items = item_table.shape[0] - 1
  alpha = negatives.shape[-1] / max(num_items - 1, 1)  # k / (N - 1)
  beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
  pos, neg = _binary_logits(h, item_table, targets, negatives, log_k_offset)
  per_target = beta * jax.nn.softplus(-pos) + jnp.sum(
      jnp.where(valid, jax.nn.softplus(neg), 0.0), -1)
  return _masked_mean(per_target, targets, return_count)


# Rows of logits per step of the streamed log-sum-exp: [512, N + 1] float32 is
# ~7 MB for ML-1M's catalogue, small enough to stay in cache between the
# matmul, the exp and the reductions that read it.
CATALOGUE_ROW_CHUNK = 512


def _column_blocks(x: Array, width: int) -> Array:
  """``[B, L, ...]`` -> ``[ceil(L / width), B, width, ...]``, zero-padded on the right."""
  pad = -x.shape[1] % width
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, width, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _uncolumn(x: Array, length: int) -> Array:
  """Inverse of ``_column_blocks``: ``[n, B, width, ...]`` -> ``[B, length, ...]``."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _catalogue_logits(hidden: Array, table: Array) -> Array:
  """``hidden [..., D] @ table[N + 1, D].T`` with the padding column at ``-inf``."""
  logits = hidden @ table.T
  return jnp.where(jnp.arange(table.shape[0]) == 0, -jnp.inf, logits)


def _rows_logsumexp(hidden: Array, table: Array) -> Array:
  """``[B, w, D]`` -> ``[B, w]`` log-sum-exp over items ``1..N``, as one 2-D matmul."""
  rows = hidden.reshape(-1, hidden.shape[-1])
  return jax.nn.logsumexp(_catalogue_logits(rows, table), -1).reshape(hidden.shape[:-1])


def _block_width(batch: int, row_chunk: int) -> int:
  return max(1, row_chunk // max(batch, 1))


def _sorted(x: Array, order: Array) -> Array:
  """``x [B, L, ...]`` with each row's positions in ``order [B, L]``: a gather."""
  return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _streamed_logsumexp(hidden: Array, table: Array, active: Array, row_chunk: int) -> Array:
  return _streamed_logsumexp_fwd(hidden, table, active, row_chunk)[0]


def _streamed_logsumexp_fwd(hidden, table, active, row_chunk):
  # Active positions first in each row (a stable sort, local to the row's
  # device); both directions of the permutation are gathers, never scatters.
  order = jnp.argsort(~active, axis=1, stable=True)
  inverse = jnp.argsort(order, axis=1)
  hidden, active = _sorted(hidden, order), _sorted(active, order)
  width = _block_width(hidden.shape[0], row_chunk)

  def block(xs):
    h, block_active = xs  # [B, w, D], [B, w]
    return jax.lax.cond(
        jnp.any(block_active),
        lambda: jnp.where(block_active, _rows_logsumexp(h, table), 0.0),
        lambda: jnp.zeros(block_active.shape, jnp.float32))

  lse = jax.lax.map(block, (_column_blocks(hidden, width), _column_blocks(active, width)))
  lse = _uncolumn(lse, hidden.shape[1])  # [B, L], sorted
  return _sorted(lse, inverse), (hidden, table, active, lse, order, inverse)


def _streamed_logsumexp_bwd(row_chunk, residuals, grad):
  hidden, table, active, lse, order, inverse = residuals  # All but table sorted.
  grad = _sorted(grad, order)
  width = _block_width(hidden.shape[0], row_chunk)

  def block(table_grad, xs):
    h, block_active, block_lse, block_grad = xs  # [B, w, D], [B, w], [B, w], [B, w]

    def backprop():
      # d lse / d logits = softmax; inactive positions output 0: no gradient.
      rows = h.reshape(-1, h.shape[-1])  # [B * w, D]: plain 2-D matmuls below
      weight = jnp.where(block_active, block_grad, 0.0).reshape(-1, 1)
      probs = jnp.exp(_catalogue_logits(rows, table) - block_lse.reshape(-1, 1)) * weight
      return table_grad + probs.T @ rows, (probs @ table).reshape(h.shape)

    return jax.lax.cond(jnp.any(block_active), backprop,
                        lambda: (table_grad, jnp.zeros_like(h)))

  xs = tuple(_column_blocks(x, width) for x in (hidden, active, lse, grad))
  table_grad, hidden_grad = jax.lax.scan(block, jnp.zeros_like(table), xs)
  hidden_grad = _sorted(_uncolumn(hidden_grad, hidden.shape[1]), inverse)
  return hidden_grad, table_grad, None


_streamed_logsumexp.defvjp(_streamed_logsumexp_fwd, _streamed_logsumexp_bwd)


def catalogue_logsumexp(hidden: Array, table: Array, active: Array | None = None,
                        row_chunk: int = CATALOGUE_ROW_CHUNK) -> Array:
  """``logsumexp_{j=1..N}(hidden @ table[j])`` at every active position.

  Equal to ``where(active, logsumexp(hidden @ table[1:].T, axis=-1), 0)``, but
  the ``[B, L, N + 1]`` logits never exist at once. Each sequence's active
  positions are moved to its front (a stable sort per row, local to the
  row's device), and the positions go through in blocks of ``w`` columns
  (``w * B ~ row_chunk`` rows): a block with no active position is skipped,
  which is where BERT4Rec's ~80% of unmasked positions go. The backward pass
  recomputes each block's logits from ``hidden``, ``table`` and the saved
  ``[B, L]`` log-normalisers instead of keeping them: plain autodiff of the
  same expression writes and reads ``[B, L, N + 1]`` several times over
  (benchmarks/README.md compares the two).

  Args:
    hidden: ``float32[B, L, D]``.
    table: ``float32[N + 1, D]``; row 0 is padding and never scored.
    active: ``bool[B, L]``, the positions to score (None: all).
    row_chunk: rows of logits per block (static).

  Returns:
    ``float32[B, L]``, 0 at inactive positions (with zero gradient).
  """
  if active is None:
    active = jnp.ones(hidden.shape[:2], bool)
  return _streamed_logsumexp(hidden, table, active, row_chunk)


def softmax_ce(hidden: Array, item_table: Array, targets: Array, negatives: Array | None = None,
               *, label_smoothing: float = 0.0, return_count: bool = False,
               row_chunk: int = CATALOGUE_ROW_CHUNK) -> Array | tuple[Array, Array]:
  """Full softmax cross-entropy over items ``1..N``.

  ``loss_t = logsumexp_{j=1..N}(s_j) - s_target``, averaged over real targets.
  With ``label_smoothing`` e the target distribution is ``1 - e`` on the
  target plus ``e / N`` on every item: ``loss_t = lse - (1 - e) s_target - e
  mean_j(s_j)``, where ``mean_j(s_j) = h . mean_j(E_j)`` costs one dot product.
  The normaliser is ``catalogue_logsumexp`` of ``hidden`` against the table
  (padding column excluded), streamed over ``row_chunk`` rows of logits at a
  time and only at positions with a target; the target logit is a gathered
  dot product. Window models compute one normaliser per row, shared by its
  ``T`` targets.

  Args:
    hidden: ``float[B, L, D]`` or ``float[B, D]`` (window models).
    item_table: ``float[N + 1, D]``, row 0 = padding.
    targets: ``int[B, L]`` or ``int[B, T]``; 0 = no target.
    negatives: ignored; accepted so that every loss has the same signature.
    label_smoothing: e in [0, 1).
    return_count: also return the number of real targets.
    row_chunk: rows of logits per streamed step (memory ``[row_chunk, N + 1]``).

  Returns:
    Scalar float32 loss, or ``(loss, count)``.
  """
  del negatives  # The full softmax needs no samples.
  h = _align(hidden, targets)  # [B, L or 1, D]
  table = item_table.astype(jnp.float32)
  # A window row is scored if any of its T targets is real.
  active = jnp.any(targets > 0, axis=-1, keepdims=True) if h.shape[-2] == 1 else targets > 0
  log_normaliser = catalogue_logsumexp(h, table, active, row_chunk)  # [B, L or 1]
  pos = _item_logits(h, table, targets[..., None])[..., 0]  # [B, L or T]
  per_target = log_normaliser - pos
  if label_smoothing:
    mean_logit = jnp.sum(h * jnp.mean(table[1:], axis=0), axis=-1)  # [B, L or 1]
    per_target = per_target + label_smoothing * (pos - mean_logit)
  return _masked_mean(per_target, targets, return_count)


LOSSES: dict[str, LossFn] = {
    "bce": bce_sampled,
    "gbce": gbce,
    "sampled_softmax": sampled_softmax,
    "softmax": softmax_ce,
}


def loss_fn(name: str, *, temperature: float = 1.0, gbce_t: float = 0.75,
            num_items: int | None = None, label_smoothing: float = 0.0,
            log_k_offset: bool = False) -> LossFn:
  """Returns the loss named by ``config.train.loss``.

  Args:
    name: one of ``LOSSES``.
    temperature: every logit is divided by it (``config.train.temperature``;
      1 = none). Rankings do not change, only the loss's sharpness.
    gbce_t: gBCE's calibration parameter (``config.train.gbce_t``).
    num_items: N, for gBCE's calibration (None: from the table's rows).
    label_smoothing: the softmax losses' smoothing e in [0, 1)
      (``config.train.label_smoothing``; 0 = none).
    log_k_offset: bce and gbce score ``s - log k`` (``bce_sampled``;
      ``config.train.bce_log_k_offset``); the other losses ignore it.

  Returns:
    ``fn(hidden, item_table, targets, negatives, *, return_count=False)``.

  Raises:
    ValueError: for an unknown name or a non-positive temperature.
  """
  if name not in LOSSES:
    raise ValueError(f"config key train.loss: unknown loss {name!r}; expected one of "
                     f"{', '.join(LOSSES)}.")
  if not temperature > 0:
    raise ValueError(f"config key train.temperature={temperature}: expected a float > 0.")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"config key train.label_smoothing={label_smoothing}: expected a float in "
                     "[0, 1).")
  if label_smoothing and name not in ("softmax", "sampled_softmax"):
    raise ValueError(f"config key train.label_smoothing={label_smoothing}: smoothing needs a "
                     f"softmax loss (train.loss softmax or sampled_softmax), not {name!r}.")
  fn = (functools.partial(gbce, t=gbce_t, num_items=num_items, log_k_offset=log_k_offset)
        if name == "gbce"
        else functools.partial(bce_sampled, log_k_offset=True) if name == "bce" and log_k_offset
        else functools.partial(LOSSES[name], label_smoothing=label_smoothing) if label_smoothing
        else LOSSES[name])
  if temperature == 1.0:
    return fn

  def scaled(hidden: Array, item_table: Array, targets: Array, negatives: Array | None = None,
             **kwargs: Any) -> Array | tuple[Array, Array]:
    # hidden / tau scores every item at s / tau, whatever the loss does with them.
    return fn(hidden / temperature, item_table, targets, negatives, **kwargs)

  return scaled


def compute(name: str, hidden: Array, item_table: Array, targets: Array,
            negatives: Array | None = None, **kwargs: Any) -> Array | tuple[Array, Array]:
  """``loss_fn(name)(hidden, item_table, targets, negatives, **kwargs)``."""
  return loss_fn(name)(hidden, item_table, targets, negatives, **kwargs)
