"""Grain pipeline: batch layouts, leave-one-out hygiene, determinism, sharding."""

import hypothesis
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deeprec_jax.data import builders, packing, pipeline, preprocess
from experiments.configs import default

NUM_ITEMS = 40
TASKS = pipeline.TASKS


def _dataset(sequences, num_items=NUM_ITEMS):
  sequences = [np.asarray(s, np.int64) for s in sequences]
  seq_data = preprocess.SequenceData(
      sequences=sequences,
      user_ids=np.arange(100, 100 + len(sequences), dtype=np.int64),
      item_ids=np.concatenate([[-1], np.arange(1, num_items + 1)]).astype(np.int64),
      num_items=num_items)
  return builders.from_sequences(seq_data)


def _random_dataset(num_users=24, num_items=NUM_ITEMS, seed=0, max_length=30):
  """Users with distinct items each (as in MovieLens), 3..max_length of them."""
  rng = np.random.default_rng(seed)
  sequences = [rng.permutation(np.arange(1, num_items + 1))[:rng.integers(3, max_length + 1)]
               for _ in range(num_users)]
  return _dataset(sequences, num_items)


def _train(dataset, task, epoch=0, **kwargs):
  args = dict(task=task, max_len=6, global_batch_size=4, num_negatives=3, seed=0, epoch=epoch,
              num_targets=2)
  args.update(kwargs)
  return pipeline.train_batches(dataset, **args)


def _eval(dataset, **kwargs):
  args = dict(split="valid", task="autoregressive", max_len=6, batch_size=5,
              num_sampled_negatives=7)
  args.update(kwargs)
  return list(pipeline.eval_batches(dataset, **args))


def _train_part(seq):
  """Leave-one-out written out here, not read from ``preprocess``: all but the last two."""
  seq = np.asarray(seq)
  return seq[:len(seq) - 2]


def _eval_part(seq, split):
  """``(history, target)``: valid = (all but 2, 2nd to last), test = (all but 1, last)."""
  seq = np.asarray(seq)
  cut = len(seq) - (2 if split == "valid" else 1)
  return seq[:cut], int(seq[cut])


def _nonzero(row):
  return row[row != 0]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("task", TASKS)
def test_train_layout(task):
  dataset = _random_dataset()
  ds = _train(dataset, task)
  assert len(ds) == pipeline.steps_per_epoch(dataset, task=task, global_batch_size=4,
                                             max_len=6, num_targets=2)
  batch = ds[0]
  width = 2 if task == "window" else 6
  assert batch["item_seq"].shape == (4, 6)
  assert batch["targets"].shape == (4, width)
  assert batch["negatives"].shape == (4, width, 3)
  assert batch["user"].shape == (4,)
  for value in batch.values():
    assert value.dtype == np.int32
  # Left padding: once an input starts, it never goes back to 0.
  for row in batch["item_seq"]:
    first = np.argmax(row != 0)
    assert np.all(row[first:] != 0)


def test_autoregressive_targets_are_next_items():
  dataset = _random_dataset(max_length=12)
  ds = _train(dataset, "autoregressive")
  for step in range(len(ds)):
    batch = ds[step]
    for item_seq, targets, user in zip(batch["item_seq"], batch["targets"], batch["user"],
                                       strict=True):
      train = _train_part(dataset.source[user]["item_seq"])
      inputs = _nonzero(item_seq)
      assert np.array_equal(item_seq != 0, targets != 0)
      # inputs followed by the last target is the tail of the training part.
      np.testing.assert_array_equal(np.append(inputs, _nonzero(targets)[-1]),
                                    train[-(len(inputs) + 1):])
      assert len(inputs) == min(len(train) - 1, 6)


def test_window_examples_cover_every_window_once():
  dataset = _random_dataset(num_users=6, max_length=12)
  max_len, num_targets = 3, 2
  ds = _train(dataset, "window", global_batch_size=1, max_len=max_len, num_targets=num_targets)
  expected = []
  for user in range(dataset.num_users):
    train = _train_part(dataset.source[user]["item_seq"])
    for start in range(1, len(train) - num_targets + 1):
      window = train[max(start - max_len, 0):start]
      expected.append((user, tuple(window), tuple(train[start:start + num_targets])))
  seen = []
  for step in range(len(ds)):
    batch = ds[step]
    seen.append((int(batch["user"][0]), tuple(_nonzero(batch["item_seq"][0])),
                 tuple(batch["targets"][0])))
  assert len(ds) == len(expected)
  assert sorted(seen) == sorted(expected)


def test_masked_examples():
  """Cloze rows; the masked count is what ``mask_prob`` predicts, within 4.5 sigma.

  Each of a row's n items is masked with probability p, and a row with none
  drawn gets its last item masked: per row the count is ``X + [X = 0]`` with
  ``X ~ Binomial(n, p)``, of mean ``n p + q^n`` and variance
  ``n p q + q^n - q^(2n) - 2 n p q^n`` (q = 1 - p). Over ~6,000 items the
  bound is about +-0.025 around the expected fraction (p = 0.3 plus the
  few forced masks): a wrong rate such as the default 0.2 is far outside it.
  """
  mask_prob, max_len = 0.3, 20
  dataset = _random_dataset(num_users=500, max_length=30)
  mask_token = NUM_ITEMS + 1
  ds = _train(dataset, "masked", mask_prob=mask_prob, max_len=max_len)
  num_masked, mean, variance, num_items = 0, 0.0, 0.0, 0
  p, q = mask_prob, 1.0 - mask_prob
  for step in range(len(ds)):
    batch = ds[step]
    for item_seq, targets, user in zip(batch["item_seq"], batch["targets"], batch["user"],
                                       strict=True):
      tail = _train_part(dataset.source[user]["item_seq"])[-max_len:]
      real = item_seq != 0
      masked = item_seq == mask_token
      assert masked.any()
      np.testing.assert_array_equal(targets != 0, masked)
      np.testing.assert_array_equal(np.where(masked, targets, item_seq)[real], tail)
      n = int(real.sum())
      num_masked += int(masked.sum())
      num_items += n
      mean += n * p + q**n
      variance += n * p * q + q**n - q**(2 * n) - 2 * n * p * q**n
  assert num_items > 5000
  assert abs(num_masked - mean) <= 4.5 * np.sqrt(variance), (num_masked, mean, variance)
  assert 4.5 * np.sqrt(variance) / num_items < 0.03  # The bound is tight.


@pytest.mark.parametrize("task", TASKS)
def test_negatives_outside_the_users_sequence(task):
  dataset = _random_dataset(num_items=25, max_length=20)
  ds = _train(dataset, task)
  for step in range(len(ds)):
    batch = ds[step]
    for targets, negatives, user in zip(batch["targets"], batch["negatives"], batch["user"],
                                        strict=True):
      train_part = preprocess.split_train(dataset.source[user]["item_seq"])
      assert np.all((negatives == 0) == (targets == 0)[:, None])
      assert not np.isin(negatives[negatives != 0], train_part).any()
      assert np.all(negatives <= dataset.num_items)


@pytest.mark.parametrize("task", TASKS)
def test_training_negatives_may_be_the_held_out_items(task):
  """Only the training part is excluded: the validation and test items are unknown then."""
  dataset = _dataset([np.arange(1, 9)], num_items=8)  # trains on 1..6; 7, 8 held out
  drawn = np.concatenate([_train(dataset, task, epoch=epoch, global_batch_size=1, max_len=3,
                                 num_targets=1)[step]["negatives"].ravel()
                          for epoch in range(3) for step in range(2)])
  drawn = drawn[drawn > 0]
  assert drawn.size and set(drawn) == {7, 8}, np.unique(drawn)


@pytest.mark.parametrize("task", ["autoregressive", "masked"])
def test_shared_negatives_one_set_per_sequence(task):
  """train.shared_negatives: negatives [B, 1, k], unseen items, deterministic; refused packed."""
  dataset = _random_dataset(num_items=25, max_length=20)
  ds = _train(dataset, task, shared_negatives=True, num_negatives=5)
  for step in range(len(ds)):
    batch = ds[step]
    assert batch["negatives"].shape == (4, 1, 5)
    for targets, negatives, user in zip(batch["targets"], batch["negatives"], batch["user"],
                                        strict=True):
      assert targets.any() and (negatives > 0).all()
      train_part = preprocess.split_train(dataset.source[user]["item_seq"])
      assert not np.isin(negatives, train_part).any()
  _assert_batches_equal(ds[1], _train(dataset, task, shared_negatives=True, num_negatives=5)[1])
  with pytest.raises(ValueError, match="train.shared_negatives"):
    _train(dataset, task, shared_negatives=True, pack_row_multiple=8)
  with pytest.raises(ValueError, match="train.shared_negatives"):
    _train(dataset, "window", shared_negatives=True)


def test_negatives_when_the_user_has_every_item():
  # Both users train on every item (their held-out items repeat training ones).
  dataset = _dataset([[1, 2, 3, 4, 5, 1, 2], [5, 4, 3, 2, 1, 5, 4]], num_items=5)
  batch = _train(dataset, "autoregressive", global_batch_size=2)[0]
  assert np.all(batch["negatives"] == 0)
  evaluation = _eval(dataset, batch_size=2)[0]
  assert np.all(evaluation["sampled_negatives"] == 0)


def test_window_negatives_uniform_outside_the_sequence():
  """Hashed window negatives: a chi-square test against uniform over unseen items."""
  seen = np.arange(1, 11)  # Every user trains on items 1..10 in some order.
  rng = np.random.default_rng(0)
  # Held out: 11 and 12, which stay among the 30 allowed negatives 11..40.
  dataset = _dataset([np.concatenate([rng.permutation(seen), [11, 12]]) for _ in range(50)],
                     num_items=NUM_ITEMS)
  ds = _train(dataset, "window", global_batch_size=50, num_negatives=20, num_targets=1,
              max_len=3)
  negatives = np.concatenate([ds[step]["negatives"].ravel() for step in range(len(ds))])
  assert not np.isin(negatives, seen).any() and negatives.max() <= NUM_ITEMS
  counts = np.bincount(negatives, minlength=NUM_ITEMS + 1)[11:]  # The 30 allowed items.
  expected = len(negatives) / 30
  chi2 = np.sum((counts - expected) ** 2 / expected)
  # 29 degrees of freedom: P(chi2 > 70) < 1e-4 for a uniform sampler.
  assert chi2 < 70, (chi2, counts)


def test_window_negatives_for_nearly_and_fully_covered_users():
  """Users with < 25% of the catalogue left draw from the complement; none left gives 0."""
  num_items = 12
  # Held-out items repeat training ones: only item 12 is outside the
  # first user's training part, none outside the second's.
  dense = np.concatenate([np.arange(1, 12), [1, 2]])
  full = np.concatenate([np.arange(num_items, 0, -1), [1, 2]])
  dataset = _dataset([dense, full], num_items=num_items)
  ds = _train(dataset, "window", global_batch_size=1, num_negatives=4, num_targets=1,
              max_len=3)
  for step in range(len(ds)):
    batch = ds[step]
    want = 12 if batch["user"][0] == 0 else 0
    np.testing.assert_array_equal(batch["negatives"], want)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_held_out_items_never_reach_training(data):
  num_items = data.draw(st.integers(5, 30))
  lengths = data.draw(st.lists(st.integers(3, num_items), min_size=4, max_size=10))
  sequences = [data.draw(st.permutations(range(1, num_items + 1)))[:n] for n in lengths]
  dataset = _dataset(sequences, num_items)
  task = data.draw(st.sampled_from(TASKS))
  max_len = data.draw(st.integers(1, 8))
  num_targets = data.draw(st.integers(1, 3))
  train_lengths = np.array(lengths) - 2
  num_examples = {"autoregressive": np.sum(train_lengths >= 2),
                  "masked": np.sum(train_lengths >= 1),
                  "window": np.maximum(train_lengths - num_targets, 0).sum()}[task]
  hypothesis.assume(num_examples >= 2)  # one batch of 2
  ds = _train(dataset, task, max_len=max_len, global_batch_size=2, num_targets=num_targets,
              num_negatives=1, seed=data.draw(st.integers(0, 5)))
  for step in range(len(ds)):
    batch = ds[step]
    for item_seq, targets, user in zip(batch["item_seq"], batch["targets"], batch["user"],
                                       strict=True):
      seq = dataset.source[user]["item_seq"]
      held_out = seq[-2:]  # validation and test items
      assert not np.isin(held_out, item_seq).any()
      assert not np.isin(held_out, targets).any()


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_resumable(task):
  dataset = _random_dataset()
  uninterrupted = []
  for epoch in range(2):
    ds = _train(dataset, task, epoch=epoch)
    uninterrupted.append([ds[step] for step in range(len(ds))])
  # A fresh pipeline for (epoch 1, step 2), as a resumed run builds it.
  _assert_batches_equal(_train(dataset, task, epoch=1)[2], uninterrupted[1][2])
  # Epochs differ in order (and draws).
  first = np.concatenate([b["user"] for b in uninterrupted[0]])
  second = np.concatenate([b["user"] for b in uninterrupted[1]])
  assert not np.array_equal(first, second)
  assert not np.array_equal(_train(dataset, task, seed=1)[0]["user"], uninterrupted[0][0]["user"])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(task, process_count):
  dataset = _random_dataset()
  single = _train(dataset, task, global_batch_size=8)
  shards = [_train(dataset, task, global_batch_size=8, process_index=p,
                   process_count=process_count) for p in range(process_count)]
  assert all(len(shard) == len(single) for shard in shards)
  for step in range(len(single)):
    parts = [shard[step] for shard in shards]
    assert parts[0]["item_seq"].shape[0] == 8 // process_count
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    _assert_batches_equal(joined, single[step])


def test_epoch_visits_each_user_once():
  dataset = _random_dataset(num_users=20)
  ds = _train(dataset, "autoregressive", global_batch_size=6)
  users = np.concatenate([ds[step]["user"] for step in range(len(ds))])
  assert len(ds) == 3 and len(np.unique(users)) == 18  # 20 // 6 batches, remainder dropped


def test_bad_arguments():
  dataset = _random_dataset(num_users=5)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.steps_per_epoch(dataset, task="autoregressive", global_batch_size=64, max_len=5)
  with pytest.raises(ValueError, match="task"):
    _train(dataset, "nope")
  with pytest.raises(ValueError, match="multiple"):
    _train(dataset, "autoregressive", global_batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="split"):
    _eval(dataset, split="train")


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("task", TASKS)
def test_eval_layout_and_targets(split, task):
  dataset = _random_dataset(num_users=13)
  batches = _eval(dataset, split=split, task=task, batch_size=5)
  assert len(batches) == 3
  users = np.concatenate([b["user"][b["weight"] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(users), np.arange(13))  # every user once
  history = np.array([len(dataset.source[u]["item_seq"]) for u in users])
  assert np.all(np.diff(history) >= 0)  # shortest histories first: narrow `exclude`
  assert batches[-1]["weight"].tolist() == [1, 1, 1, 0, 0]
  mask_token = NUM_ITEMS + 1
  for batch in batches:
    width = batch["exclude"].shape[1]
    assert width % 8 == 0
    assert batch["item_seq"].shape == (5, 6) and batch["sampled_negatives"].shape == (5, 7)
    assert batch["weight"].dtype == np.float32
    for key in ("item_seq", "target", "exclude", "sampled_negatives", "user"):
      assert batch[key].dtype == np.int32
    for row in np.flatnonzero(batch["weight"]):
      seq = dataset.source[batch["user"][row]]["item_seq"]
      history, target = _eval_part(seq, split)
      assert batch["target"][row] == target
      item_seq = batch["item_seq"][row]
      if task == "masked":
        assert item_seq[-1] == mask_token
        np.testing.assert_array_equal(_nonzero(item_seq[:-1]), history[-5:])
      else:
        np.testing.assert_array_equal(_nonzero(item_seq), history[-6:])
      exclude = _nonzero(batch["exclude"][row])
      assert target not in exclude
      assert set(exclude) == set(history) - {target}
      negatives = batch["sampled_negatives"][row]
      assert np.all(negatives > 0) and not np.isin(negatives, seq).any()
    for row in np.flatnonzero(batch["weight"] == 0):
      assert batch["target"][row] == 0 and np.all(batch["item_seq"][row] == 0)


@hypothesis.settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=30))
def test_pack_layout_places_every_sequence_once(lengths):
  lengths = np.asarray(lengths)
  row, end, num_rows = packing.pack_layout(lengths, 12)
  used = np.zeros((num_rows, 12), int)
  for r, e, n in zip(row, end, lengths, strict=True):
    used[r, e - n:e] += 1
  assert used.max() == 1 and used.sum() == lengths.sum()  # no overlap, nothing lost
  assert num_rows <= len(lengths) and num_rows >= -(-lengths.sum() // 12)
  for r in range(num_rows):  # rows fill from the right: padding stays on the left
    filled = np.flatnonzero(used[r])
    assert filled[-1] == 11 and np.all(np.diff(filled) == 1)


def _timed_dataset(num_users=9, seed=0):
  """Distinct items per user, each with its own increasing timestamp."""
  rng = np.random.default_rng(seed)
  sequences = [rng.permutation(np.arange(1, NUM_ITEMS + 1))[:rng.integers(4, 12)]
               for _ in range(num_users)]
  times = [1_000_000 * (u + 1) + np.cumsum(rng.integers(0, 500, len(s)))
           for u, s in enumerate(sequences)]
  seq_data = preprocess.SequenceData(
      sequences=sequences, user_ids=np.arange(num_users, dtype=np.int64),
      item_ids=np.arange(-1, NUM_ITEMS + 1).clip(-1).astype(np.int64), num_items=NUM_ITEMS,
      time_seqs=times)
  time_of = [dict(zip(s.tolist(), t.tolist(), strict=True)) for s, t in zip(sequences, times,
                                                                            strict=True)]
  return builders.from_sequences(seq_data), time_of


@pytest.mark.parametrize("task", ["autoregressive", "masked"])
def test_timed_train_batches_carry_each_input_and_query_time(task):
  """with_times: time_seq is each input's timestamp; query_time the predicted item's
  (autoregressive: the next item's; masked: the position's own); 0 at padding."""
  dataset, time_of = _timed_dataset()
  batch = _train(dataset, task, max_len=8, global_batch_size=8, with_times=True)[0]
  plain = _train(dataset, task, max_len=8, global_batch_size=8)[0]
  for key in plain:  # the same batch, plus the times
    np.testing.assert_array_equal(batch[key], plain[key])
  for row, user in enumerate(batch["user"]):
    for col in range(8):
      item, target = batch["item_seq"][row, col], batch["targets"][row, col]
      if item == 0:
        assert batch["time_seq"][row, col] == batch["query_time"][row, col] == 0
        continue
      own = time_of[user][int(target if item == NUM_ITEMS + 1 else item)]
      assert batch["time_seq"][row, col] == own
      expected_query = own if task == "masked" else time_of[user][int(target)]
      assert batch["query_time"][row, col] == expected_query
  packed = packing.pack_batch(batch, 8)
  assert {"time_seq", "query_time"} <= set(packed)
  tokens = lambda b: sorted(zip(*(b[k][b["item_seq"] != 0].tolist()
                                  for k in ("item_seq", "targets", "time_seq", "query_time")),
                                strict=True))
  assert tokens(packed) == tokens(batch)
  with pytest.raises(ValueError, match="window"):
    _train(dataset, "window", with_times=True)


@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("task", ["autoregressive", "masked"])
def test_timed_eval_batches_ask_at_the_target_time(split, task):
  dataset, time_of = _timed_dataset()
  for batch in _eval(dataset, split=split, task=task, max_len=6, with_times=True):
    for row in np.flatnonzero(batch["weight"]):
      user, items = batch["user"][row], batch["item_seq"][row]
      real = items != 0
      history, target = _eval_part(dataset.source[user]["item_seq"], split)
      known = [time_of[user][int(i)] for i in items[real] if i != NUM_ITEMS + 1]
      asked = known[1:] + [time_of[user][target]]  # each input's next item, then the target
      if task == "masked":  # the mask slot is the target's; every slot asks at its own time
        known = asked = known + [time_of[user][target]]
      np.testing.assert_array_equal(batch["time_seq"][row][real], known)
      np.testing.assert_array_equal(batch["query_time"][row][real], asked)
      assert not batch["time_seq"][row][~real].any()


def test_pack_batch_keeps_every_token():
  dataset = _random_dataset(num_users=20, max_length=12)
  plain = _train(dataset, "autoregressive", max_len=16, global_batch_size=10)[0]
  packed = packing.pack_batch(plain, 8)
  lengths = np.count_nonzero(plain["item_seq"], axis=1)
  row, end, _ = packing.pack_layout(lengths, 16)
  assert packed["item_seq"].shape == (8, 16) and packed["negatives"].shape == (8, 16, 3)
  for i, n in enumerate(lengths):
    cols = slice(end[i] - n, end[i])
    for key in ("item_seq", "targets", "negatives"):
      np.testing.assert_array_equal(packed[key][row[i], cols], plain[key][i, 16 - n:])
    np.testing.assert_array_equal(packed["positions"][row[i], cols], np.arange(16 - n, 16))
    segment = packed["segment_ids"][row[i], cols]
    assert segment.min() == segment.max() > 0
  assert np.count_nonzero(packed["item_seq"]) == lengths.sum()
  segments = set(zip(row.tolist(), packed["segment_ids"][row, end - 1].tolist(), strict=True))
  assert len(segments) == 10  # every sequence has its own (row, segment id)
  with pytest.raises(ValueError, match="needs"):
    packing.pack_batch(plain, 1)


@pytest.mark.parametrize("task", ["autoregressive", "masked"])
def test_packed_train_batches_do_not_depend_on_the_process_count(task):
  dataset = _random_dataset(num_users=40, max_length=12)
  args = dict(max_len=16, global_batch_size=16, pack_row_multiple=4)
  single = _train(dataset, task, **args)
  shards = [_train(dataset, task, process_index=p, process_count=2, **args)
            for p in range(2)]
  plain = _train(dataset, task, max_len=16, global_batch_size=16)
  for step in range(len(single)):
    rows = single[step]["item_seq"].shape[0]
    assert rows % 4 == 0 and rows < 16
    joined = {key: np.concatenate([s[step][key] for s in shards]) for key in single[step]}
    _assert_batches_equal(joined, single[step])  # the same rows, split between processes
    targets = single[step]["targets"]
    np.testing.assert_array_equal(np.sort(targets[targets > 0]),
                                  np.sort(plain[step]["targets"][plain[step]["targets"] > 0]))
  with pytest.raises(ValueError, match="train.pack"):
    _train(dataset, "window", max_len=16, pack_row_multiple=8)


def test_eval_lengths():
  assert pipeline.eval_lengths(200, 4) == (25, 50, 100, 200)
  assert pipeline.eval_lengths(200, 1) == (200,)
  assert pipeline.eval_lengths(5, 4) == (1, 2, 3, 5)
  with pytest.raises(ValueError, match="eval.length_buckets"):
    pipeline.eval_lengths(200, 0)


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("task", TASKS)
def test_eval_length_buckets_cut_only_padding(task, process_count):
  """Bucketed batches hold every user once, with the unbucketed row's right end."""
  dataset = _random_dataset(num_users=30, max_length=30)
  kwargs = dict(task=task, max_len=16, split="test")
  plain = _eval(dataset, batch_size=4, **kwargs)
  by_user = {int(u): (step, row) for step, b in enumerate(plain)
             for row, u in enumerate(b["user"]) if b["weight"][row] > 0}
  shards = [_eval(dataset, batch_size=4 // process_count, length_buckets=3,
                  process_index=p, process_count=process_count, **kwargs)
            for p in range(process_count)]
  assert len({len(s) for s in shards}) == 1
  bucketed = [{key: np.concatenate([s[step][key] for s in shards]) for key in shards[0][step]}
              for step in range(len(shards[0]))]
  lengths = {b["item_seq"].shape[1] for b in bucketed}
  if task == "window":  # Caser reads a fixed window: never cut
    assert lengths == {16}
  else:  # histories of 1..28 items: more than one bucket is used
    assert lengths <= {4, 8, 16} and len(lengths) >= 2
  # One `exclude` width per length: a pass compiles at most length_buckets shapes. It is
  # the group's longest history rounded up to a power of two.
  shapes = {(b["item_seq"].shape[1], b["exclude"].shape[1]) for b in bucketed}
  assert len(shapes) == len(lengths)
  for seq_len, width in shapes:
    group = [b for b in bucketed if b["item_seq"].shape[1] == seq_len]
    longest = max(int(np.count_nonzero(b["exclude"], axis=1).max()) for b in group)
    assert width & (width - 1) == 0 and width >= max(longest, 1)
  seen = []
  for batch in bucketed:
    seq_len = batch["item_seq"].shape[1]
    for row in np.flatnonzero(batch["weight"]):
      user = int(batch["user"][row])
      seen.append(user)
      step, plain_row = by_user[user]
      full = plain[step]["item_seq"][plain_row]
      np.testing.assert_array_equal(batch["item_seq"][row], full[16 - seq_len:])
      assert np.all(full[:16 - seq_len] == 0)  # only padding was cut
      if task != "window" and seq_len > 4:  # the next shorter length would not hold it
        assert np.count_nonzero(full) > seq_len // 2
      for key in ("target", "sampled_negatives"):
        np.testing.assert_array_equal(batch[key][row], plain[step][key][plain_row])
      np.testing.assert_array_equal(_nonzero(batch["exclude"][row]),
                                    _nonzero(plain[step]["exclude"][plain_row]))
  assert sorted(seen) == list(range(30))


def test_eval_exclude_keeps_a_repeated_target():
  # The validation item 3 also occurs in the history: it must stay rankable.
  dataset = _dataset([[1, 3, 2, 3, 4]], num_items=5)
  batch = _eval(dataset, batch_size=1)[0]
  assert batch["target"][0] == 3
  assert sorted(_nonzero(batch["exclude"][0])) == [1, 2]


@pytest.mark.parametrize("sampling", pipeline.SAMPLINGS)
def test_eval_negatives_deterministic_and_sharded(sampling):
  dataset = _random_dataset(num_users=13)
  single = _eval(dataset, batch_size=6, sampling=sampling, seed=3)
  again = _eval(dataset, batch_size=6, sampling=sampling, seed=3)
  shards = [_eval(dataset, batch_size=3, sampling=sampling, seed=3, process_index=p,
                  process_count=2) for p in range(2)]
  assert len(single) == len(shards[0]) == len(shards[1]) == 3
  for step, batch in enumerate(single):
    _assert_batches_equal(batch, again[step])
    joined = {key: np.concatenate([s[step][key] for s in shards]) for key in batch}
    # A process pads exclude to the global batch's width, so shapes agree too.
    _assert_batches_equal(joined, batch)
  other_seed = _eval(dataset, batch_size=6, sampling=sampling, seed=4)
  assert not np.array_equal(other_seed[0]["sampled_negatives"], single[0]["sampled_negatives"])


def test_popularity_negatives_follow_training_counts():
  # Items 1..3 are popular in training parts, 4..20 never trained on.
  sequences = [[1, 2, 3, 10 + u, 5 + u] for u in range(6)] + [[1, 2, 19, 20, 4]]
  dataset = _dataset(sequences, num_items=20)
  batches = _eval(dataset, batch_size=7, sampling="popularity", num_sampled_negatives=50)
  negatives = batches[0]["sampled_negatives"]
  counts = pipeline.train_item_counts(dataset)
  assert np.all(counts[negatives[:6]] > 0)  # users 0..5 can get only 19 or 20, never 4..18
  assert set(np.unique(negatives[:6])) <= {19, 20}
  # The last user has every trained item: it falls back to uniform sampling.
  assert np.all(negatives[6] > 0) and not np.isin(negatives[6], sequences[6]).any()


def test_train_item_counts():
  dataset = _random_dataset()
  expected = np.zeros(NUM_ITEMS + 1, np.int64)
  for user in range(dataset.num_users):
    for item in _train_part(dataset.source[user]["item_seq"]):
      expected[item] += 1
  counts = pipeline.train_item_counts(dataset)
  assert counts.dtype == np.int64 and counts[0] == 0
  np.testing.assert_array_equal(counts, expected)


def test_tfds_backed_dataset_matches_in_memory(tmp_path):
  config = default.data_config("synthetic")
  config.data_dir = str(tmp_path)
  config.synthetic.num_users, config.synthetic.num_items = 30, 25
  config.synthetic.num_clusters, config.synthetic.mean_length = 3, 8
  loaded = builders.load(config)
  sequences = [loaded.source[i]["item_seq"] for i in range(loaded.num_users)]
  in_memory = _dataset(sequences, loaded.num_items)
  for task in TASKS:
    _assert_batches_equal(_train(loaded, task)[1], _train(in_memory, task)[1])
  _assert_batches_equal(_eval(loaded, sampling="popularity")[0],
                        _eval(in_memory, sampling="popularity")[0])


def test_long_sequences_keep_the_most_recent_items():
  """ML-1M-like rows (200-item inputs from up to 400-item histories): the last 201 items.

  Formerly a wall-time check; what matters is that long histories are cut to
  their most recent items, with next-item targets and negatives outside the
  training part.
  """
  dataset = _random_dataset(num_users=300, num_items=3000, max_length=400)
  ds = _train(dataset, "autoregressive", max_len=200, global_batch_size=128, num_negatives=1)
  long_rows = 0
  for step in range(len(ds)):
    batch = ds[step]
    assert batch["item_seq"].shape == (128, 200) and batch["negatives"].shape == (128, 200, 1)
    for item_seq, targets, negatives, user in zip(batch["item_seq"], batch["targets"],
                                                  batch["negatives"], batch["user"], strict=True):
      seq = np.asarray(dataset.source[user]["item_seq"])
      train = _train_part(seq)
      n = min(len(train) - 1, 200)
      long_rows += len(train) - 1 > 200
      np.testing.assert_array_equal(item_seq[200 - n:], train[-n - 1:-1])
      np.testing.assert_array_equal(targets[200 - n:], train[-n:])
      assert not item_seq[:200 - n].any() and not targets[:200 - n].any()
      real = negatives[200 - n:, 0]
      assert np.all(real > 0) and not np.isin(real, train).any()
  assert long_rows > 50  # Many histories are longer than the input.
