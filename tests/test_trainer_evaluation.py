"""``Trainer.evaluate`` and the evaluation binary's path against a NumPy full ranking.

``tests/test_evaluate.py`` checks ``evaluate.make_eval_step`` with the
arguments it is given; these tests check what a run actually evaluates:
``train.Trainer.evaluate``, and ``train.load_trained`` followed by
``trainer.evaluate`` (what ``experiments.evaluate`` does), on a hand-built
dataset read from a CSV file through ``builders.load``. The reference ranks
every item in float64 NumPy, leaves out the user's history (never the target)
and padding, and counts ties against the target (pessimistic ranks).

The data are built so that history exclusion changes the answer: the three
most popular items are in every user's history, and the targets are not.
"""

import dataclasses
import math

import ml_collections
import numpy as np
import pytest
from test_model_references import np_sasrec, random_params  # float64 SASRec reference

from deeprec_jax import sharding, train
from experiments.configs import tiny

NUM_ITEMS, NUM_USERS = 12, 10
POPULAR = (1, 2, 3)
FULL_METRICS = ("hr", "ndcg", "mrr")


def hand_built_sequences(seed: int = 0) -> list[np.ndarray]:
  """Users with 6-9 distinct items: POPULAR first, then others; last two are valid, test."""
  rng = np.random.default_rng(seed)
  sequences = []
  for _ in range(NUM_USERS):
    others = rng.permutation(np.arange(len(POPULAR) + 1, NUM_ITEMS + 1))
    middle = others[:rng.integers(1, 5)]
    valid, test = others[-2:]
    sequences.append(np.concatenate([rng.permutation(POPULAR), middle, [valid, test]]))
  return [s.astype(np.int64) for s in sequences]


def write_csv(path, sequences) -> None:
  lines = ["user_id,item_id,timestamp"]
  for user, seq in enumerate(sequences):
    lines += [f"{user},{item},{t}" for t, item in enumerate(seq)]
  path.write_text("\n".join(lines) + "\n")


def csv_config(model: str, path) -> ml_collections.ConfigDict:
  config = tiny.get_config(model)
  config.data.name, config.data.path = "csv", str(path)
  config.data.min_user_interactions = 5
  config.train.batch_size = 8  # 10 users: one batch of 8 per epoch.
  config.eval.batch_size = 8  # Two batches, the second half padding rows.
  return config


def split(seq: np.ndarray, name: str) -> tuple[np.ndarray, int]:
  """Leave-one-out by hand: valid = (seq[:-2], seq[-2]), test = (seq[:-1], seq[-1])."""
  return (seq[:-2], int(seq[-2])) if name == "valid" else (seq[:-1], int(seq[-1]))


def numpy_metrics(sequences, scores_of_history, split_name: str, ks, exclude_history=True):
  """Mean full-ranking HR/NDCG/MRR@K over users, from float64 scores of every item."""
  totals = {f"{m}@{k}": 0.0 for m in FULL_METRICS for k in ks}
  for seq in sequences:
    history, target = split(seq, split_name)
    scores = np.asarray(scores_of_history(history), np.float64)  # [N + 1]
    left_out = {0, *history.tolist()} if exclude_history else {0}
    left_out.discard(target)
    rank = sum(scores[j] >= scores[target] for j in range(NUM_ITEMS + 1)
               if j != target and j not in left_out)
    for k in ks:
      totals[f"hr@{k}"] += rank < k
      totals[f"ndcg@{k}"] += 1.0 / math.log2(rank + 2) if rank < k else 0.0
      totals[f"mrr@{k}"] += 1.0 / (rank + 1) if rank < k else 0.0
  return {name: value / len(sequences) for name, value in totals.items()}


def popularity_scores(sequences):
  """Training-part counts, ties by ascending id, as float64 scores (an exact order)."""
  counts = np.zeros(NUM_ITEMS + 1, np.int64)
  for seq in sequences:
    np.add.at(counts, seq[:-2], 1)
  ids = np.arange(NUM_ITEMS + 1)
  scores = counts * (NUM_ITEMS + 2.0) - ids
  scores[0] = -np.inf  # Padding: never ranked anyway.
  return lambda history: scores


def assert_metrics(got, want, what):
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=f"{what} {name}")
  assert got["count"] == NUM_USERS, what


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  sequences = hand_built_sequences()
  path = tmp_path_factory.mktemp("csv") / "interactions.csv"
  write_csv(path, sequences)
  return sequences, path


def _check_ids(dataset, sequences) -> None:
  """The loaded dataset is the hand-built one, with identity id maps."""
  np.testing.assert_array_equal(dataset.item_ids[1:], np.arange(1, NUM_ITEMS + 1))
  np.testing.assert_array_equal(dataset.user_ids, np.arange(NUM_USERS))
  for user, seq in enumerate(sequences):
    np.testing.assert_array_equal(dataset.source[user]["item_seq"], seq)


def test_popularity_trainer_and_evaluation_binary_path_exclude_history(data, tmp_path):
  sequences, path = data
  config = csv_config("popularity", path)
  ks = tuple(config.eval.ks)
  scores = popularity_scores(sequences)
  # The test has power: without exclusion every metric at K <= 3 is 0 (the
  # three popular items always rank first), with it the targets move up.
  for split_name in ("valid", "test"):
    kept = numpy_metrics(sequences, scores, split_name, ks, exclude_history=False)
    assert kept["hr@1"] == 0.0 and kept["mrr@20"] < numpy_metrics(
        sequences, scores, split_name, ks)["mrr@20"]

  # Through train_and_evaluate (fit, save) and train.load_trained, as experiments.evaluate.
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  trainer, params, step = train.load_trained(workdir)
  assert step == 0
  _check_ids(trainer.dataset, sequences)
  for split_name in ("valid", "test"):
    want = numpy_metrics(sequences, scores, split_name, ks)
    assert_metrics(trainer.evaluate(params, split_name), want, f"load_trained {split_name}")
    assert_metrics({k[len(split_name) + 1:]: v for k, v in final.items()
                    if k.startswith(split_name + "/")}, want, f"final {split_name}")

  # A Trainer built directly, as the training loop evaluates.
  fresh = train.Trainer(config, train.builders.load(config.data))
  state = fresh.init_state()
  assert_metrics(fresh.evaluate(state["params"], "test"),
                 numpy_metrics(sequences, scores, "test", ks), "Trainer.evaluate")


def test_sasrec_trainer_evaluate_matches_numpy_full_ranking(data):
  """A trained-model path: random SASRec weights, scores from the float64 model reference."""
  sequences, path = data
  config = csv_config("sasrec", path)
  config.eval.length_buckets = 1  # One evaluation program to compile.
  trainer = train.Trainer(config, train.builders.load(config.data))
  _check_ids(trainer.dataset, sequences)
  max_len, model = config.data.max_len, trainer.model
  params = random_params(model, np.ones((1, max_len), np.int32), seed=11)
  table = np.asarray(params["item_embed"]["embedding"], np.float64)[: NUM_ITEMS + 1]

  def scores(history):
    item_seq = np.zeros((1, max_len), np.int32)
    recent = history[-max_len:]
    item_seq[0, max_len - len(recent):] = recent
    hidden = np_sasrec(params, item_seq, kind=model.attention, num_heads=model.num_heads,
                       num_blocks=model.num_blocks, max_len=max_len)[0, -1]
    return hidden @ table.T

  ks = tuple(config.eval.ks)
  for split_name in ("valid", "test"):
    # No near-ties between float32 and float64: each candidate is clear of the target.
    for seq in sequences:
      history, target = split(seq, split_name)
      s = scores(history)
      gaps = np.abs(np.delete(s, [0, target]) - s[target])
      assert gaps.min() > 1e-4 * np.abs(s).max()
    got = trainer.evaluate(sharding.shard(params, trainer.mesh), split_name)
    assert_metrics(got, numpy_metrics(sequences, scores, split_name, ks), f"sasrec {split_name}")
  assert numpy_metrics(sequences, scores, "test", ks) != numpy_metrics(
      sequences, scores, "test", ks, exclude_history=False)


def test_trainers_of_one_process_share_evaluation_batches(data, monkeypatch):
  """A second Trainer on the same TFDS data and settings reuses the first's batches.

  It builds none (pipeline.eval_batches is not called) and gets the same metrics;
  another seed (other sampled negatives) or an in-memory dataset builds its own.
  """
  _, path = data
  config = csv_config("popularity", path)
  calls = []
  build = train.pipeline.eval_batches
  monkeypatch.setattr(train.pipeline, "eval_batches",
                      lambda *args, **kwargs: calls.append(kwargs["split"]) or build(*args,
                                                                                   **kwargs))
  monkeypatch.setattr(train, "_SHARED_EVAL_BATCHES", train.collections.OrderedDict())

  def evaluate(config, dataset=None):
    trainer = train.Trainer(config, dataset or train.builders.load(config.data))
    return trainer.evaluate(trainer.init_state()["params"], "valid")

  first = evaluate(config)
  assert calls == ["valid"]
  assert evaluate(config) == first and calls == ["valid"]
  other_seed = config.copy_and_resolve_references()
  other_seed.seed = config.seed + 1
  evaluate(other_seed)
  assert calls == ["valid", "valid"]
  loaded = train.builders.load(config.data)
  in_memory = dataclasses.replace(loaded, source=[loaded.source[u]
                                                  for u in range(loaded.num_users)])
  evaluate(config, in_memory)
  evaluate(config, in_memory)
  assert calls == ["valid"] * 4


def test_prefetched_evaluation_batches_are_the_built_ones(data, monkeypatch):
  """``prefetch_eval`` builds in a thread what ``evaluate`` would: same batches, built once."""
  _, path = data
  config = csv_config("popularity", path)
  monkeypatch.setattr(train, "_SHARED_EVAL_BATCHES", train.collections.OrderedDict())
  loaded = train.builders.load(config.data)
  in_memory = dataclasses.replace(loaded, source=[loaded.source[u]
                                                  for u in range(loaded.num_users)])
  direct = train.Trainer(config, in_memory)
  want = direct._build_eval_batches("valid")
  calls = []
  build = train.pipeline.eval_batches
  monkeypatch.setattr(train.pipeline, "eval_batches",
                      lambda *args, **kwargs: calls.append(kwargs["split"]) or build(*args,
                                                                                   **kwargs))
  trainer = train.Trainer(config, in_memory)
  trainer.prefetch_eval("valid")
  trainer.prefetch_eval("valid")  # already pending: no second build
  params = trainer.init_state()["params"]
  first = trainer.evaluate(params, "valid")
  assert trainer.evaluate(params, "valid") == first
  assert calls == ["valid"]
  got = trainer._cached_eval_batches("valid")
  assert len(got) == len(want)
  for got_batch, want_batch in zip(got, want, strict=True):
    assert got_batch.keys() == want_batch.keys()
    for name in want_batch:
      np.testing.assert_array_equal(got_batch[name], want_batch[name])
