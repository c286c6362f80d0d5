"""Tests for deeprec_jax.evaluate with tiny fake models and random batches."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax import evaluate, models
from deeprec_jax.data import builders, pipeline, preprocess
from experiments.configs import tiny

N, B, L, H, S, DIM = 40, 8, 6, 10, 12, 8
KS = (1, 5, 10, 20)


class MeanPool(nn.Module):
  """Window-style model: the mean embedding of the history, ``[B, D]``."""

  num_items: int

  @nn.compact
  def __call__(self, item_seq, *, deterministic=True, user=None, last_only=False):
    del user, deterministic, last_only  # [B, D] already
    # One extra row, like BERT4Rec's mask token: item_table must drop it.
    x = nn.Embed(self.num_items + 2, DIM, name="item_embed")(item_seq)
    mask = (item_seq > 0)[..., None]
    return jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)


class LastItem(nn.Module):
  """Sequence model: each position's own embedding, ``[B, L, D]``.

  The last item scores itself highest, so history exclusion matters.
  """

  num_items: int

  @nn.compact
  def __call__(self, item_seq, *, deterministic=True, user=None, last_only=False):
    del user, deterministic
    hidden = nn.Embed(self.num_items + 1, DIM, name="item_embed")(item_seq)
    return hidden[:, -1:] if last_only else hidden


def _hidden_np(model_cls, table, item_seq):
  x = table[item_seq]
  if model_cls is LastItem:
    return x[-1]
  mask = item_seq > 0
  return x[mask].sum(0) / max(mask.sum(), 1)


def _params(model_cls, seed=0):
  model = model_cls(N)
  params = model.init(jax.random.key(seed), np.ones((1, L), np.int32))["params"]
  return model, params


def _batches(seed, num_batches=3, pad_rows=3, num_sampled=S):
  """Eval batches as the README describes; the last one ends in padding rows."""
  rng = np.random.default_rng(seed)
  batches = []
  for i in range(num_batches):
    lengths = rng.integers(1, L + 1, size=B)
    item_seq = rng.integers(1, N + 1, size=(B, L)).astype(np.int32)
    item_seq[np.arange(L)[None, :] < (L - lengths)[:, None]] = 0  # Left padding.
    exclude = np.zeros((B, H), np.int32)
    exclude[:, :L] = item_seq  # The history (0-padded).
    weight = np.ones(B, np.float32)
    target = rng.integers(1, N + 1, size=B).astype(np.int32)
    if i == num_batches - 1 and pad_rows:
      weight[-pad_rows:] = 0.0
      target[-1] = 0  # Padding rows may hold anything, including no target.
    batches.append(dict(
        item_seq=item_seq, target=target, exclude=exclude,
        sampled_negatives=rng.integers(1, N + 1, size=(B, num_sampled)).astype(np.int32),
        user=np.arange(i * B, (i + 1) * B, dtype=np.int32), weight=weight))
  return batches


def _np_metric_values(rank, ks, prefix=""):
  out = {}
  for k in ks:
    out[f"{prefix}hr@{k}"] = float(rank < k)
    out[f"{prefix}ndcg@{k}"] = 1 / math.log2(rank + 2) if rank < k else 0.0
    out[f"{prefix}mrr@{k}"] = 1 / (rank + 1) if rank < k else 0.0
  return out


def _np_evaluate(model_cls, params, batches, exclude_history=True):
  """User by user, in float64: score all items, rank pessimistically, average."""
  table = np.float64(params["item_embed"]["embedding"])[: N + 1]
  totals, count = {}, 0.0
  for batch in batches:
    for b in range(len(batch["target"])):
      if batch["weight"][b] == 0:
        continue
      scores = table @ _hidden_np(model_cls, table, batch["item_seq"][b])
      t = batch["target"][b]
      skip = {0, t} | (set(batch["exclude"][b]) if exclude_history else set())
      rank = sum(scores[j] >= scores[t] for j in range(N + 1) if j not in skip)
      values = _np_metric_values(rank, KS)
      negs = [n for n in batch["sampled_negatives"][b] if n not in (0, t)]
      sampled_rank = sum(scores[n] >= scores[t] for n in negs)
      values.update(_np_metric_values(sampled_rank, KS, prefix="sampled_"))
      for name, v in values.items():
        totals[name] = totals.get(name, 0.0) + v
      count += 1
  out = {name: v / count for name, v in totals.items()}
  out["count"] = count
  return out


def _assert_same(got, want):
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("model_cls", [MeanPool, LastItem])
def test_matches_numpy_loop(model_cls):
  model, params = _params(model_cls)
  step = jax.jit(evaluate.make_eval_step(model, N, KS))
  batches = _batches(0)
  got = evaluate.evaluate(step, params, batches)
  assert got["count"] == 3 * B - 3
  _assert_same(got, _np_evaluate(model_cls, params, batches))


def test_padding_rows_do_not_matter():
  model, params = _params(MeanPool)
  step = jax.jit(evaluate.make_eval_step(model, N, KS))
  batches = _batches(1)
  base = evaluate.evaluate(step, params, batches)
  # Different garbage in the padding rows ...
  rng = np.random.default_rng(9)
  garbage = [dict(b) for b in batches]
  last = {k: v.copy() for k, v in garbage[-1].items()}
  pad = last["weight"] == 0
  for key in ("item_seq", "exclude", "sampled_negatives"):
    last[key][pad] = rng.integers(0, N + 1, size=last[key][pad].shape)
  last["target"][pad] = rng.integers(0, N + 1, size=pad.sum())
  garbage[-1] = last
  _assert_same(evaluate.evaluate(step, params, garbage), base)
  # ... and the same real rows in one batch without padding.
  real = {k: np.concatenate([b[k][b["weight"] > 0] for b in batches]) for k in batches[0]}
  _assert_same(evaluate.evaluate(evaluate.make_eval_step(model, N, KS), params, [real]), base)


def test_exclude_history():
  model, params = _params(LastItem)
  batches = _batches(2)
  with_history = evaluate.evaluate(
      jax.jit(evaluate.make_eval_step(model, N, KS, exclude_history=True)), params, batches)
  without = evaluate.evaluate(
      jax.jit(evaluate.make_eval_step(model, N, KS, exclude_history=False)), params, batches)
  _assert_same(without, _np_evaluate(LastItem, params, batches, exclude_history=False))
  # The last history item scores itself highest: ranking it pushes targets down.
  assert without["mrr@20"] < with_history["mrr@20"]
  # Sampled metrics do not use the history.
  assert without["sampled_mrr@20"] == with_history["sampled_mrr@20"]


def test_excluded_items_never_counted():
  model, params = _params(LastItem)
  step = evaluate.make_eval_step(model, N, KS)
  batch = _batches(3, num_batches=1, pad_rows=0)[0]
  # Exclude every item but the target: the target is always ranked first.
  all_items = np.broadcast_to(np.arange(N + 1, dtype=np.int32), (B, N + 1))
  batch["exclude"] = all_items.copy()
  got = evaluate.evaluate(step, params, [batch])
  assert got["hr@1"] == 1.0 and got["ndcg@1"] == 1.0 and got["mrr@20"] == 1.0


def test_without_sampled_negatives():
  model, params = _params(MeanPool)
  step = jax.jit(evaluate.make_eval_step(model, N, (10,)))
  batches = _batches(4, num_sampled=0)
  assert set(evaluate.evaluate(step, params, batches)) == {"hr@10", "ndcg@10", "mrr@10", "count"}
  for b in batches:
    del b["sampled_negatives"]
  assert "sampled_hr@10" not in evaluate.evaluate(step, params, batches)


def test_data_parallel_jit_matches():
  model, params = _params(MeanPool)
  eval_step = evaluate.make_eval_step(model, N, KS)
  batches = _batches(5)
  mesh = jax.make_mesh((4,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded_step = jax.jit(eval_step, in_shardings=(replicated, split), out_shardings=replicated)
  _assert_same(evaluate.evaluate(sharded_step, params, batches),
               evaluate.evaluate(jax.jit(eval_step), params, batches))


@pytest.mark.parametrize("model_cls", [MeanPool, LastItem])
def test_score_items(model_cls):
  model, params = _params(model_cls)
  item_seq = _batches(7, num_batches=1)[0]["item_seq"]
  scores = jax.jit(evaluate.score_items, static_argnums=(0, 2))(model, params, N, item_seq)
  assert scores.shape == (B, N + 1) and scores.dtype == jnp.float32
  table = np.float64(params["item_embed"]["embedding"])[: N + 1]
  want = [table @ _hidden_np(model_cls, table, row) for row in item_seq]
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)


def test_errors():
  model, params = _params(MeanPool)
  step = evaluate.make_eval_step(model, N, KS)
  with pytest.raises(ValueError, match="no batches"):
    evaluate.evaluate(step, params, [])
  batch = _batches(6, num_batches=1, pad_rows=B)[0]
  with pytest.raises(ValueError, match="total weight 0"):
    evaluate.evaluate(step, params, [batch])
  with pytest.raises(ValueError, match="eval.ks"):
    evaluate.make_eval_step(model, N, (0, 10))


@pytest.mark.parametrize("name", ["sasrec", pytest.param("bert4rec", marks=pytest.mark.slow),
                                  pytest.param("rnn", marks=pytest.mark.slow), "caser"])
def test_length_buckets_give_the_same_metrics(name):
  """Users grouped by history length (shorter inputs) score exactly as at full length."""
  rng = np.random.default_rng(0)
  sequences = [rng.permutation(np.arange(1, N + 1))[:rng.integers(3, 35)] for _ in range(40)]
  dataset = builders.from_sequences(preprocess.SequenceData(
      sequences=sequences, user_ids=np.arange(40, dtype=np.int64),
      item_ids=np.arange(N + 1, dtype=np.int64), num_items=N))
  config = tiny.get_config(name)
  max_len = 5 if name == "caser" else 24
  model = models.create_model(config.model, num_items=N, num_users=40, max_len=max_len)
  params = model.init(jax.random.key(0), jnp.ones((1, max_len), jnp.int32),
                      user=jnp.zeros((1,), jnp.int32))["params"]
  step = jax.jit(evaluate.make_eval_step(model, N, KS))
  task = models.spec(name).task
  results = []
  for buckets in (1, 3):
    batches = list(pipeline.eval_batches(dataset, split="test", task=task, max_len=max_len,
                                         batch_size=8, length_buckets=buckets))
    results.append(evaluate.evaluate(step, params, batches))
    if buckets == 3 and task != "window":
      assert len({b["item_seq"].shape[1] for b in batches}) == 3
  assert results[0]["count"] == 40
  _assert_same(results[1], results[0])
