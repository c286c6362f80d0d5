"""Tests for deeprec_jax.metrics against a plain NumPy implementation."""

import math

import jax
import numpy as np
import pytest

from deeprec_jax import metrics

KS = (1, 5, 10, 20)


def _np_rank(scores, target, exclude, ties="pessimistic"):
  """Counts, item by item, the candidates that beat the target."""
  t = scores[target]
  if np.isnan(t):
    return sum(1 for j in range(1, len(scores)) if j != target and j not in set(exclude))
  rank = 0
  for j in range(1, len(scores)):
    if j == target or j in set(exclude):
      continue
    if scores[j] > t or (ties == "pessimistic" and scores[j] == t):
      rank += 1
  return rank


def _np_metrics(rank, ks, prefix=""):
  out = {}
  for k in ks:
    hit = rank < k
    out[f"{prefix}hr@{k}"] = float(hit)
    out[f"{prefix}ndcg@{k}"] = 1.0 / math.log2(rank + 2) if hit else 0.0
    out[f"{prefix}mrr@{k}"] = 1.0 / (rank + 1) if hit else 0.0
  return out


def _random_case(seed, batch=16, num_items=30, history=8):
  """Integer-valued scores (many ties), exclusions that may hold the target."""
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 6, size=(batch, num_items + 1)).astype(np.float32)
  target = rng.integers(1, num_items + 1, size=batch).astype(np.int32)
  exclude = rng.integers(0, num_items + 1, size=(batch, history)).astype(np.int32)
  exclude[rng.random(exclude.shape) < 0.3] = 0  # 0-padding.
  exclude[::4, 0] = target[::4]  # The target listed in its own history.
  scores[1, target[1]] = 100.0  # Target has the max score ...
  scores[2, target[2]] = -100.0  # ... or the min ...
  scores[3, 0] = 1e9  # ... and padding would beat everything if it were ranked.
  scores[5, exclude[5]] = 1e9  # Excluded items would, too.
  return scores, target, exclude


@pytest.mark.parametrize("ties", metrics.TIES)
def test_full_ranks_match_numpy(ties):
  rank_fn = jax.jit(lambda s, t, e: metrics.full_ranks(s, t, e, ties=ties))
  for seed in range(4):
    scores, target, exclude = _random_case(seed)
    got = np.asarray(rank_fn(scores, target, exclude))
    want = [_np_rank(scores[b], target[b], exclude[b], ties) for b in range(len(target))]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32


def test_rank_metrics_match_numpy():
  scores, target, exclude = _random_case(10, batch=64, num_items=60)
  ranks = metrics.full_ranks(scores, target, exclude)
  got = metrics.rank_metrics(ranks, KS)
  want = [_np_metrics(int(r), KS) for r in np.asarray(ranks)]
  assert set(got) == {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in KS}
  for name, values in got.items():
    assert values.shape == (64,) and values.dtype == np.float32
    np.testing.assert_allclose(values, [w[name] for w in want], rtol=1e-6)


def test_hand_checked():
  scores = np.array([[9.0, 1.0, 5.0, 3.0, 3.0]], np.float32)
  rank = lambda t, e=None: int(metrics.full_ranks(scores, np.array([t], np.int32), e)[0])
  assert rank(2) == 0  # Padding column 0 (score 9) is never ranked.
  assert rank(1) == 3
  assert rank(3) == 2  # Pessimistic: the tied item 4 counts against 3.
  assert int(metrics.full_ranks(scores, np.array([3]), None, ties="optimistic")[0]) == 1
  assert rank(3, np.array([[2, 0]])) == 1  # Excluding 2 lifts item 3.
  assert rank(2, np.array([[2, 3]])) == 0  # The target is never excluded.

  first = metrics.rank_metrics(np.array([0]), (1, 5))
  assert [float(first[n][0]) for n in ("hr@1", "ndcg@1", "mrr@1", "ndcg@5")] == [1, 1, 1, 1]
  second = metrics.rank_metrics(np.array([1]), (1, 5))
  assert float(second["hr@1"][0]) == 0 and float(second["ndcg@1"][0]) == 0
  assert float(second["hr@5"][0]) == 1 and float(second["mrr@5"][0]) == 0.5
  np.testing.assert_allclose(second["ndcg@5"][0], 1 / math.log2(3), rtol=1e-6)


def test_constant_scores_get_worst_rank_and_nan_target():
  scores = np.zeros((2, 11), np.float32)
  scores[1, 4] = np.nan
  ranks = metrics.full_ranks(scores, np.array([3, 4]), np.array([[5, 0], [0, 0]]))
  np.testing.assert_array_equal(ranks, [8, 9])  # 10 items, minus the target (and item 5).
  optimistic = metrics.full_ranks(scores, np.array([3, 4]), None, ties="optimistic")
  np.testing.assert_array_equal(optimistic, [0, 9])
  with pytest.raises(ValueError, match="tie rule"):
    metrics.full_ranks(scores, np.array([3, 4]), None, ties="random")


@pytest.mark.parametrize("ties", metrics.TIES)
def test_sampled_ranks_match_numpy(ties):
  for seed in range(3):
    scores, target, _ = _random_case(seed)
    rng = np.random.default_rng(seed + 100)
    negatives = rng.integers(0, scores.shape[1], size=(len(target), 10)).astype(np.int32)
    negatives[::3, 0] = target[::3]  # Collisions with the target are ignored.
    got = np.asarray(metrics.sampled_ranks(scores, target, negatives, ties=ties))
    want = []
    for b in range(len(target)):
      t = scores[b, target[b]]
      negs = [n for n in negatives[b] if n not in (0, target[b])]
      want.append(sum(scores[b, n] > t or (ties == "pessimistic" and scores[b, n] == t)
                      for n in negs))
    np.testing.assert_array_equal(got, want)
  named = metrics.rank_metrics(np.array([0, 3]), (1, 10), prefix="sampled_")
  assert set(named) == {f"sampled_{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (1, 10)}


def test_top_k_items_match_numpy():
  for seed in range(3):
    scores, _, exclude = _random_case(seed)
    items, top = map(np.asarray, jax.jit(metrics.top_k_items, static_argnums=2)(scores, exclude, 7))
    assert items.shape == (16, 7) and items.dtype == np.int32
    for b in range(scores.shape[0]):
      masked = scores[b].copy()
      masked[0] = -np.inf
      masked[exclude[b]] = -np.inf
      want = np.argsort(-masked, kind="stable")[:7]  # Ties: lower id first, as lax.top_k.
      np.testing.assert_array_equal(items[b], want)
      np.testing.assert_array_equal(top[b], masked[want])
      assert 0 not in items[b] and not set(items[b]) & set(exclude[b])
  items, _ = metrics.top_k_items(np.array([[5.0, 1.0, 2.0]], np.float32), None, 2)
  np.testing.assert_array_equal(items, [[2, 1]])


def test_bad_cutoff():
  with pytest.raises(ValueError, match="positive integers"):
    metrics.rank_metrics(np.array([0]), (0,))


def test_defaults_message_and_dtypes():
  """What the matching tests leave implicit (mutmut survivors, docs/testing.md)."""
  scores = np.array([[0.0, 1.0, 1.0, 2.0]], np.float32)  # Item 2 ties with target 1.
  target, negatives = np.array([1], np.int32), np.array([[2, 3]], np.int32)
  # The default tie rule is pessimistic for both rankings: the tied item beats the target.
  assert np.asarray(metrics.sampled_ranks(scores, target, negatives)).tolist() == [2]
  assert np.asarray(metrics.sampled_ranks(scores, target, negatives,
                                          ties="optimistic")).tolist() == [1]
  assert np.asarray(metrics.full_ranks(scores, target)).tolist() == [2]
  with pytest.raises(ValueError, match="expected one of pessimistic, optimistic"):
    metrics.check_ties("random")
  # Every metric is float32 (summed with weights on device), hr@K included.
  values = metrics.rank_metrics(np.array([0, 3], np.int32), (1, 5))
  assert {name: v.dtype for name, v in values.items()} == {name: np.float32 for name in values}
