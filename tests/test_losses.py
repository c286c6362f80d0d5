"""Tests for deeprec_jax.losses against float64 NumPy references."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax import losses

B, L, T, D, N, K = 3, 6, 4, 8, 12, 3
NAMES = ("bce", "gbce", "sampled_softmax", "softmax")

# One compiled program per case is much faster than op-by-op dispatch here.
_compute = jax.jit(losses.compute, static_argnums=0, static_argnames="return_count")


def _inputs(seed: int, window: bool = False):
  """Random inputs with padded targets and colliding / padding negatives."""
  rng = np.random.default_rng(seed)
  positions = T if window else L
  hidden = rng.normal(size=(B, D) if window else (B, L, D)).astype(np.float32)
  table = rng.normal(size=(N + 1, D)).astype(np.float32)
  targets = rng.integers(1, N + 1, size=(B, positions)).astype(np.int32)
  targets[rng.random(targets.shape) < 0.3] = 0
  targets[0, 0], targets[0, -1] = 0, 5  # At least one of each.
  negatives = rng.integers(0, N + 1, size=(B, positions, K)).astype(np.int32)
  collide = rng.random((B, positions)) < 0.3
  negatives[..., 0] = np.where(collide, targets, negatives[..., 0])
  return hidden, table, targets, negatives


def _np_lse(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return m + np.log(np.sum(np.exp(x - m)))


def _np_softplus(x):
  return np.logaddexp(0.0, x)


def _np_loss(name, hidden, table, targets, negatives, log_q=None, gbce_t=0.75, smoothing=0.0,
             log_k_offset=False):
  """Loops over targets in float64, the definitions written out."""
  shift = np.log(negatives.shape[-1]) if log_k_offset else 0.0  # bce, gbce: s - log k
  hidden, table = np.float64(hidden), np.float64(table)
  if hidden.ndim == 2:  # Window models: the same state for every target.
    hidden = np.repeat(hidden[:, None], targets.shape[1], axis=1)
  total, count = 0.0, 0
  for b, i in np.ndindex(targets.shape):
    t = targets[b, i]
    if t == 0:
      continue
    count += 1
    h = hidden[b, i]
    pos = h @ table[t] - shift
    negs = [n for n in negatives[b, i] if n != 0 and n != t]
    if name == "bce":
      total += _np_softplus(-pos) + sum(_np_softplus(h @ table[n] - shift) for n in negs)
    elif name == "gbce":
      # gSASRec: sigmoid(s_pos) ** beta, alpha = k / (N - 1) sampled of N - 1 candidates.
      alpha = negatives.shape[-1] / (table.shape[0] - 2)
      beta = alpha * (gbce_t * (1 - 1 / alpha) + 1 / alpha)
      # -log(sigmoid(x) ** beta) and -log(1 - sigmoid(x)), in their overflow-free forms.
      total += beta * _np_softplus(-pos) + sum(_np_softplus(h @ table[n] - shift) for n in negs)
    elif name == "sampled_softmax":
      items = [t] + negs
      logits = np.array([h @ table[i] for i in items])
      if log_q is not None:
        logits = logits - np.float64(log_q)[items]
      # Cross-entropy against (1 - e) on the positive + e / (1 + k') on every candidate.
      target = np.full(len(items), smoothing / len(items))
      target[0] += 1 - smoothing
      total += -np.sum(target * (logits - _np_lse(logits)))
    else:
      logits = table[1:] @ h
      target = np.full(len(logits), smoothing / len(logits))
      target[t - 1] += 1 - smoothing
      total += -np.sum(target * (logits - _np_lse(logits)))
  return total / max(count, 1)


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_reference(name, window):
  for seed in range(3):
    hidden, table, targets, negatives = _inputs(seed, window)
    got = _compute(name, hidden, table, targets, negatives)
    want = _np_loss(name, hidden, table, targets, negatives)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", ("bce", "gbce"))
def test_log_k_offset_shifts_every_logit_by_log_k(name):
  """train.bce_log_k_offset: the reference with s - log k; a no-op at k = 1; others ignore it."""
  hidden, table, targets, negatives = _inputs(41)
  fn = losses.loss_fn(name, log_k_offset=True)
  want = _np_loss(name, hidden, table, targets, negatives, log_k_offset=True)
  np.testing.assert_allclose(fn(hidden, table, targets, negatives), want, rtol=1e-5)
  assert abs(want - _np_loss(name, hidden, table, targets, negatives)) > 1e-2
  one = negatives[..., :1]
  np.testing.assert_allclose(fn(hidden, table, targets, one),
                             losses.loss_fn(name)(hidden, table, targets, one), rtol=1e-6)
  for other in ("sampled_softmax", "softmax"):
    np.testing.assert_array_equal(
        losses.loss_fn(other, log_k_offset=True)(hidden, table, targets, negatives),
        losses.loss_fn(other)(hidden, table, targets, negatives))


@pytest.mark.parametrize("name", ("bce", "gbce", "sampled_softmax"))
def test_shared_negatives_match_numpy_and_per_position_gradients(name):
  """``[B, 1, k]`` negatives (one set per sequence) = the set repeated at every position."""
  hidden, table, targets, _ = _inputs(21)
  rng = np.random.default_rng(21)
  shared = rng.integers(0, N + 1, size=(B, 1, 2 * K)).astype(np.int32)
  shared[0, 0, 0] = targets[0, -1]  # collides with a target: ignored there only
  repeated = np.repeat(shared, L, axis=1)
  log_q = (np.log(rng.dirichlet(np.ones(N + 1))).astype(np.float32)
           if name == "sampled_softmax" else None)
  extra = {} if log_q is None else {"log_q": log_q}
  fn = losses.loss_fn(name)
  got = fn(hidden, table, targets, shared, **extra)
  np.testing.assert_allclose(got, _np_loss(name, hidden, table, targets, repeated, log_q=log_q),
                             rtol=1e-5)
  grad = jax.grad(lambda h, t, n: fn(h, t, targets, n, **extra), argnums=(0, 1))
  for shared_grad, repeated_grad in zip(grad(hidden, table, shared),
                                        grad(hidden, table, repeated), strict=True):
    np.testing.assert_allclose(shared_grad, repeated_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("name", ["softmax", "sampled_softmax"])
def test_label_smoothing_matches_the_smoothed_cross_entropy(name, window):
  hidden, table, targets, negatives = _inputs(31, window)
  fn = losses.loss_fn(name, label_smoothing=0.1)
  np.testing.assert_allclose(fn(hidden, table, targets, negatives),
                             _np_loss(name, hidden, table, targets, negatives, smoothing=0.1),
                             rtol=1e-5)
  grad = jax.grad(lambda h: fn(h, table, targets, negatives))(hidden)
  assert np.isfinite(grad).all()
  with pytest.raises(ValueError, match="train.label_smoothing=1.0"):
    losses.loss_fn(name, label_smoothing=1.0)
  with pytest.raises(ValueError, match="needs a softmax loss"):
    losses.loss_fn("bce", label_smoothing=0.1)


@pytest.mark.parametrize("gbce_t", [0.0, 0.3, 1.0])
def test_gbce_calibration_and_its_ends(gbce_t):
  hidden, table, targets, negatives = _inputs(11)
  got = losses.loss_fn("gbce", gbce_t=gbce_t)(hidden, table, targets, negatives)
  want = _np_loss("gbce", hidden, table, targets, negatives, gbce_t=gbce_t)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if gbce_t == 0.0:  # beta = 1: plain BCE.
    np.testing.assert_allclose(got, losses.bce_sampled(hidden, table, targets, negatives),
                               rtol=1e-6)
  with pytest.raises(ValueError, match="train.gbce_t"):
    losses.loss_fn("gbce", gbce_t=1.5)(hidden, table, targets, negatives)


def test_gbce_default_t_and_the_smallest_catalogue():
  """gbce's own default t is gSASRec's 0.75; with N = 2 items and k = 1, alpha = 1 exactly."""
  hidden, table, targets, negatives = _inputs(13)
  np.testing.assert_allclose(losses.gbce(hidden, table, targets, negatives),
                             _np_loss("gbce", hidden, table, targets, negatives, gbce_t=0.75),
                             rtol=1e-5)
  # Items 1 and 2 only: alpha = k / (N - 1) = 1, so beta = 1 and gbce is plain BCE.
  small, small_targets = table[:3], np.minimum(targets, 2)
  small_negatives = np.where(small_targets == 1, 2, 1)[..., None]
  np.testing.assert_allclose(losses.gbce(hidden, small, small_targets, small_negatives),
                             losses.bce_sampled(hidden, small, small_targets, small_negatives),
                             rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_every_logit(name):
  hidden, table, targets, negatives = _inputs(12)
  got = losses.loss_fn(name, temperature=0.05)(hidden, table, targets, negatives)
  want = _np_loss(name, hidden / 0.05, table, targets, negatives)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="train.temperature"):
    losses.loss_fn(name, temperature=0.0)


def test_sampled_softmax_log_q():
  hidden, table, targets, negatives = _inputs(7)
  log_q = np.log(np.random.default_rng(7).dirichlet(np.ones(N + 1))).astype(np.float32)
  got = losses.sampled_softmax(hidden, table, targets, negatives, log_q=log_q)
  want = _np_loss("sampled_softmax", hidden, table, targets, negatives, log_q=log_q)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A constant log_q (uniform sampler) changes nothing.
  uniform = np.full(N + 1, -math.log(N), np.float32)
  np.testing.assert_allclose(
      losses.sampled_softmax(hidden, table, targets, negatives, log_q=uniform),
      losses.sampled_softmax(hidden, table, targets, negatives), rtol=1e-6)


def test_hand_checked_zero_hidden():
  # All logits 0: BCE = (1 + k) log 2, sampled softmax = log(1 + k), softmax = log N.
  table = np.random.default_rng(0).normal(size=(N + 1, D)).astype(np.float32)
  hidden = np.zeros((1, 2, D), np.float32)
  targets = np.array([[3, 0]], np.int32)
  negatives = np.array([[[1, 2, 4], [1, 2, 4]]], np.int32)
  np.testing.assert_allclose(losses.bce_sampled(hidden, table, targets, negatives),
                             4 * math.log(2), rtol=1e-6)
  np.testing.assert_allclose(losses.sampled_softmax(hidden, table, targets, negatives),
                             math.log(4), rtol=1e-6)
  np.testing.assert_allclose(losses.softmax_ce(hidden, table, targets), math.log(N), rtol=1e-6)
  # A negative equal to the target or to padding is dropped: k = 1 remains.
  negatives = np.array([[[3, 0, 4], [1, 2, 4]]], np.int32)
  np.testing.assert_allclose(losses.bce_sampled(hidden, table, targets, negatives),
                             2 * math.log(2), rtol=1e-6)
  np.testing.assert_allclose(losses.sampled_softmax(hidden, table, targets, negatives),
                             math.log(2), rtol=1e-6)


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_and_padding_inert(name, window):
  hidden, table, targets, negatives = _inputs(1, window)
  fn = jax.jit(lambda h, e, t: losses.compute(name, h, e, t, negatives))
  grads = jax.grad(fn, argnums=(0, 1))(hidden, table, targets)
  for g in grads:
    assert np.all(np.isfinite(g))
  # The padding row of the table is never scored (only as a masked target).
  np.testing.assert_array_equal(grads[1][0], 0.0)
  if not window:
    # Nothing flows to, or depends on, hidden states at padded targets.
    pad = targets == 0
    np.testing.assert_array_equal(grads[0][pad], 0.0)
    changed = np.where(pad[..., None], 1e3, hidden).astype(np.float32)
    np.testing.assert_array_equal(fn(changed, table, targets), fn(hidden, table, targets))


@pytest.mark.parametrize("name", NAMES)
def test_all_padding_gives_zero_loss_and_grad(name):
  hidden, table, targets, negatives = _inputs(2)
  targets = np.zeros_like(targets)
  loss, count = _compute(name, hidden, table, targets, negatives, return_count=True)
  assert float(loss) == 0.0 and float(count) == 0.0
  grads = jax.jit(jax.grad(lambda h: losses.compute(name, h, table, targets, negatives)))(hidden)
  np.testing.assert_array_equal(grads, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_window_broadcast_equals_tiled_hidden(name):
  hidden, table, targets, negatives = _inputs(3, window=True)
  tiled = np.repeat(hidden[:, None], T, axis=1)
  np.testing.assert_allclose(_compute(name, hidden, table, targets, negatives),
                             _compute(name, tiled, table, targets, negatives), rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_hidden_gives_float32_loss(name):
  hidden, table, targets, negatives = _inputs(4)
  low = jnp.asarray(hidden, jnp.bfloat16)
  got = _compute(name, low, table, targets, negatives)
  assert got.dtype == jnp.float32
  want = _compute(name, low.astype(jnp.float32), table, targets, negatives)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_return_count():
  hidden, table, targets, negatives = _inputs(5)
  _, count = losses.bce_sampled(hidden, table, targets, negatives, return_count=True)
  assert float(count) == np.sum(targets > 0)
  assert count.dtype == jnp.float32  # As documented: callers re-weight across shards with it.
  # Keyword arguments pass through the temperature wrapper.
  loss, count = losses.loss_fn("sampled_softmax", temperature=0.5)(
      hidden, table, targets, negatives, return_count=True)
  np.testing.assert_allclose(loss, _np_loss("sampled_softmax", hidden / 0.5, table, targets,
                                            negatives), rtol=1e-5)
  assert float(count) == np.sum(targets > 0)


def test_error_messages_name_the_expected_inputs():
  hidden, table, targets, negatives = _inputs(14)
  expected = ("expected hidden [*targets.shape, D] or, for window models, [B, D] with targets "
              "[B, T].")
  with pytest.raises(ValueError, match=re.escape(expected) + "$"):
    losses.bce_sampled(hidden[..., None], table, targets, negatives)
  with pytest.raises(ValueError, match="^" + re.escape(
      "this loss needs sampled negatives (batch['negatives']); only train.loss='softmax' "
      "works without them.") + "$"):
    losses.bce_sampled(hidden, table, targets, None)


def test_window_softmax_rows_whose_only_target_is_item_1():
  """A window row is scored when any target is real, item 1 included (ids start at 1)."""
  hidden, table, targets, negatives = _inputs(15, window=True)
  targets[0], targets[1] = [1, 0, 0, 0], [1, 1, 0, 1]
  np.testing.assert_allclose(_compute("softmax", hidden, table, targets, negatives),
                             _np_loss("softmax", hidden, table, targets, negatives), rtol=1e-5)


def test_loss_fn_dispatch_and_errors():
  assert losses.loss_fn("bce") is losses.bce_sampled
  assert losses.loss_fn("sampled_softmax") is losses.sampled_softmax
  assert losses.loss_fn("softmax") is losses.softmax_ce
  with pytest.raises(ValueError, match=r"train\.loss.*bce, sampled_softmax, softmax"):
    losses.loss_fn("hinge")
  hidden, table, targets, _ = _inputs(6)
  with pytest.raises(ValueError, match="negatives"):
    losses.compute("bce", hidden, table, targets, None)
  with pytest.raises(ValueError, match="does not match"):
    losses.softmax_ce(hidden[..., None], table, targets)


def _np_softmax_ce_grads(hidden, table, targets):
  """d loss / d (hidden, table) of the full softmax, written out in float64."""
  hidden, table = np.float64(hidden), np.float64(table)
  window = hidden.ndim == 2
  grad_hidden, grad_table = np.zeros_like(hidden), np.zeros_like(table)
  count = max(int(np.sum(targets > 0)), 1)
  for b, i in np.ndindex(targets.shape):
    t = targets[b, i]
    if t == 0:
      continue
    h = hidden[b] if window else hidden[b, i]
    logits = table[1:] @ h
    probs = np.exp(logits - _np_lse(logits))  # Over items 1..N.
    d_hidden = (probs @ table[1:] - table[t]) / count
    if window:
      grad_hidden[b] += d_hidden
    else:
      grad_hidden[b, i] += d_hidden
    grad_table[1:] += np.outer(probs, h) / count
    grad_table[t] -= h / count
  return grad_hidden, grad_table


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("row_chunk", [1, 5, 512])  # One row, a ragged last chunk, one chunk.
def test_softmax_ce_streamed_gradients_match_numpy(window, row_chunk):
  hidden, table, targets, negatives = _inputs(8, window)
  fn = jax.jit(jax.value_and_grad(
      lambda h, e: losses.softmax_ce(h, e, targets, row_chunk=row_chunk), argnums=(0, 1)))
  value, (grad_hidden, grad_table) = fn(hidden, table)
  want_hidden, want_table = _np_softmax_ce_grads(hidden, table, targets)
  want_value = _np_loss("softmax", hidden, table, targets, negatives)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad_hidden, want_hidden, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_table, want_table, rtol=1e-4, atol=1e-6)


def test_catalogue_logsumexp_equals_plain_logsumexp():
  """Active positions get the log-sum-exp over items 1..N; the others 0 and no gradient."""
  rng = np.random.default_rng(9)
  hidden = rng.normal(size=(4, 9, D)).astype(np.float32)
  table = rng.normal(size=(N + 1, D)).astype(np.float32)
  active = rng.random((4, 9)) < 0.3
  active[1] = False  # A sequence without any: its blocks are skipped.
  want = [[_np_lse(table[1:] @ h) if a else 0.0 for h, a in zip(hs, acts, strict=True)]
          for hs, acts in zip(np.float64(hidden), active, strict=True)]
  for row_chunk in (1, 8, 512):
    fn = jax.jit(lambda h, c=row_chunk: losses.catalogue_logsumexp(h, table, active, c))
    np.testing.assert_allclose(fn(hidden), want, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda h, fn=fn: jnp.sum(fn(h))))(hidden)
    np.testing.assert_array_equal(grad[~active], 0.0)
  everything = jax.jit(losses.catalogue_logsumexp)(hidden, table)
  np.testing.assert_allclose(everything[1, 0], _np_lse(table[1:] @ np.float64(hidden[1, 0])),
                             rtol=1e-6)
