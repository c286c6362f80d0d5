"""preprocess: k-core, id remap, chronological order, truncation, leave-one-out."""

import collections
import itertools
import os
import pathlib
import re

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from deeprec_jax.data import preprocess, sources

SHARED_DATA = pathlib.Path(
    os.environ.get("DEEPREC_SHARED_DATA")
    or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")

# Small random logs: few users/items and few distinct timestamps, so that
# k-core rounds cascade and time ties are common.
SETTINGS = hypothesis.settings(max_examples=100, deadline=None)


@st.composite
def interaction_logs(draw, max_rows=60, distinct_pairs=False):
  rows = draw(st.lists(
      st.tuples(st.sampled_from([3, 7, 11, 12, 40, 1000]),  # user ids, not contiguous
                st.integers(1, 9),  # item ids
                st.integers(0, 4),  # timestamps: many ties
                st.integers(1, 5)),  # ratings
      min_size=1, max_size=max_rows))
  if distinct_pairs:
    rows = list({(u, i): (u, i, t, r) for u, i, t, r in rows}.values())
  user, item, timestamp, rating = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
  return sources.Interactions(user=user, item=item, timestamp=timestamp,
                              rating=rating.astype(np.float32))


def naive_k_core(rows: list[tuple], min_user: int, min_item: int) -> list[tuple]:
  """Reference k-core: drop one violating row at a time until none is left."""
  rows = list(rows)
  while True:
    users = collections.Counter(r[1] for r in rows)
    items = collections.Counter(r[2] for r in rows)
    bad = [r for r in rows if users[r[1]] < min_user or items[r[2]] < min_item]
    if not bad:
      return rows
    rows.remove(bad[0])


def _rows(x: sources.Interactions) -> list[tuple]:
  """(file index, user, item, timestamp) per interaction."""
  return list(zip(range(len(x)), x.user.tolist(), x.item.tolist(), x.timestamp.tolist(),
                  strict=True))


def _expected_sequences(rows: list[tuple], max_history: int = 0) -> dict[int, list[int]]:
  """Original item ids per user, by (timestamp, file order), most recent kept."""
  by_user = collections.defaultdict(list)
  for r in sorted(rows, key=lambda r: (r[3], r[0])):
    by_user[r[1]].append(r[2])
  if max_history:
    by_user = {u: s[-max_history:] for u, s in by_user.items()}
  return dict(by_user)


def _original_sequences(data: preprocess.SequenceData) -> dict[int, list[int]]:
  return {int(u): data.item_ids[s].tolist() for u, s in zip(data.user_ids, data.sequences,
                                                           strict=True)}


def _check_ids(data: preprocess.SequenceData):
  assert data.item_ids[0] == -1
  assert np.all(np.diff(data.item_ids[1:]) > 0)  # ascending original ids
  assert np.all(np.diff(data.user_ids) > 0)
  used = np.concatenate(data.sequences)
  assert set(used.tolist()) == set(range(1, data.num_items + 1))  # contiguous, all used
  assert len(data.item_ids) == data.num_items + 1 and len(data.user_ids) == data.num_users
  assert all(s.dtype == np.int64 for s in data.sequences)


@SETTINGS
@hypothesis.given(interaction_logs(), st.integers(0, 5), st.integers(0, 4))
def test_k_core_is_the_maximal_core(x, min_user, min_item):
  try:
    data = preprocess.preprocess(x, min_user_interactions=min_user,
                                 min_item_interactions=min_item, log=None)
  except ValueError as e:
    assert "no interactions left" in str(e)
    assert not naive_k_core(_rows(x), max(min_user, 3), min_item)
    return
  _check_ids(data)
  # It is a core: every user and every item meets its minimum ...
  assert min(len(s) for s in data.sequences) >= max(min_user, 3)
  assert np.bincount(np.concatenate(data.sequences))[1:].min() >= min_item
  # ... and the largest one, in chronological order with file-order ties.
  reference = naive_k_core(_rows(x), max(min_user, 3), min_item)
  assert _original_sequences(data) == _expected_sequences(reference)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(interaction_logs(max_rows=14), st.integers(1, 4), st.integers(1, 3))
def test_k_core_is_maximal_by_brute_force(x, min_user, min_item):
  """No subset of users and items forms a larger core than k_core finds."""
  users, items = np.unique(x.user).tolist(), np.unique(x.item).tolist()
  hypothesis.assume(len(users) * len(items) <= 24 and len(users) + len(items) <= 10)
  best = 0
  for user_mask in itertools.product([False, True], repeat=len(users)):
    kept_users = {u for u, m in zip(users, user_mask, strict=True) if m}
    for item_mask in itertools.product([False, True], repeat=len(items)):
      kept_items = {i for i, m in zip(items, item_mask, strict=True) if m}
      keep = np.isin(x.user, list(kept_users)) & np.isin(x.item, list(kept_items))
      user_counts = collections.Counter(x.user[keep].tolist())
      item_counts = collections.Counter(x.item[keep].tolist())
      if all(c >= min_user for c in user_counts.values()) and all(
          c >= min_item for c in item_counts.values()):
        best = max(best, int(keep.sum()))
  kept = preprocess.k_core(x.user, x.item, min_user, min_item)
  assert kept.sum() == best


@SETTINGS
@hypothesis.given(interaction_logs(), st.integers(3, 6))
def test_truncation_keeps_the_most_recent(x, max_history):
  expected = {u: s for u, s in _expected_sequences(_rows(x), max_history).items() if len(s) >= 3}
  if not expected:
    with pytest.raises(ValueError, match="no interactions left"):
      preprocess.preprocess(x, max_history=max_history, log=None)
    return
  data = preprocess.preprocess(x, max_history=max_history, log=None)
  assert _original_sequences(data) == expected
  assert max(len(s) for s in data.sequences) <= max_history


@SETTINGS
@hypothesis.given(interaction_logs(), st.sampled_from([1.0, 2.5, 4.0]), st.integers(0, 2))
def test_rating_threshold(x, threshold, min_item):
  keep = x.rating >= threshold
  rows = [r for r, k in zip(_rows(x), keep, strict=True) if k]
  reference = naive_k_core(rows, 3, min_item)
  if not reference:
    with pytest.raises(ValueError, match="no interactions left"):
      preprocess.preprocess(x, rating_threshold=threshold, min_item_interactions=min_item,
                            log=None)
    return
  data = preprocess.preprocess(x, rating_threshold=threshold, min_item_interactions=min_item,
                               log=None)
  assert _original_sequences(data) == _expected_sequences(reference)


@SETTINGS
@hypothesis.given(interaction_logs(distinct_pairs=True), st.sampled_from([0, 3, 4]))
def test_leave_one_out_never_leaks(x, max_history):
  try:
    data = preprocess.preprocess(x, max_history=max_history, log=None)
  except ValueError as e:  # Every user has fewer than 3 items.
    assert "no interactions left" in str(e)
    return
  for seq in data.sequences:
    train = preprocess.split_train(seq)
    valid_history, valid_item = preprocess.split_eval(seq, "valid")
    test_history, test_item = preprocess.split_eval(seq, "test")
    n = len(seq)
    np.testing.assert_array_equal(train, seq[:n - 2])
    np.testing.assert_array_equal(valid_history, seq[:n - 2])
    np.testing.assert_array_equal(test_history, seq[:n - 1])
    assert (valid_item, test_item) == (seq[n - 2], seq[n - 1])
    assert test_item not in train and test_item not in valid_history
    assert valid_item not in train
    assert valid_item in test_history


def test_tie_break_is_file_order_and_users_ascend():
  x = sources.Interactions(
      user=np.array([9, 2, 9, 9, 2, 2, 9], np.int64),
      item=np.array([30, 10, 20, 40, 50, 10, 30], np.int64),
      timestamp=np.array([5, 1, 5, 2, 1, 0, 5], np.int64))
  messages = []
  data = preprocess.preprocess(x, log=messages.append)
  np.testing.assert_array_equal(data.user_ids, [2, 9])
  np.testing.assert_array_equal(data.item_ids, [-1, 10, 20, 30, 40, 50])
  # User 2: 10 (t=0), then 10 and 50 tie at t=1 -> file order.
  assert data.item_ids[data.sequences[0]].tolist() == [10, 10, 50]
  assert data.item_ids[data.sequences[1]].tolist() == [40, 30, 20, 30]
  assert data.stats() == dict(users=2, items=5, interactions=7, avg_length=3.5)
  assert messages[0].startswith("raw: 2 users, 5 items, 7 interactions")
  assert any("raised from 0 for leave-one-out" in m for m in messages)


def test_short_users_are_dropped_for_leave_one_out():
  x = sources.Interactions(user=np.array([1, 1, 2, 2, 2], np.int64),
                           item=np.array([1, 2, 1, 2, 3], np.int64),
                           timestamp=np.zeros(5, np.int64))
  messages = []
  data = preprocess.preprocess(x, log=messages.append)
  np.testing.assert_array_equal(data.user_ids, [2])
  assert any("2 users" in m and "-> 1 users" in m for m in messages), messages


def test_genres_follow_the_remap():
  x = sources.Interactions(
      user=np.array([1, 1, 1], np.int64), item=np.array([50, 7, 9], np.int64),
      timestamp=np.arange(3, dtype=np.int64),
      item_genres={7: ("Drama",), 50: ("Comedy", "Drama"), 99: ("Horror",)})
  data = preprocess.preprocess(x, log=None)
  assert data.genre_names == ("Comedy", "Drama", "Horror")
  np.testing.assert_array_equal(data.item_ids, [-1, 7, 9, 50])
  np.testing.assert_array_equal(data.item_genres, [
      [False, False, False],  # padding
      [False, True, False],  # 7
      [False, False, False],  # 9: no side information
      [True, True, False],  # 50
  ])
  without_genres = sources.Interactions(user=x.user, item=x.item, timestamp=x.timestamp)
  assert preprocess.preprocess(without_genres, log=None).item_genres is None


def test_threshold_without_ratings_is_ignored():
  x = sources.Interactions(user=np.ones(3, np.int64), item=np.arange(3, dtype=np.int64),
                           timestamp=np.arange(3, dtype=np.int64))
  messages = []
  data = preprocess.preprocess(x, rating_threshold=4.0, log=messages.append)
  assert data.num_interactions == 3
  assert any("no ratings" in m for m in messages)


@pytest.mark.parametrize("argument,value", [
    ("rating_threshold", -1.0), ("rating_threshold", float("nan")),
    ("min_user_interactions", -1), ("min_item_interactions", 1.5),
    ("min_user_interactions", float("nan")),
    ("max_history", 2), ("max_history", -3),
])
def test_invalid_arguments_are_named(argument, value):
  x = sources.Interactions(user=np.ones(3, np.int64), item=np.arange(3, dtype=np.int64),
                           timestamp=np.arange(3, dtype=np.int64))
  with pytest.raises(ValueError, match=argument):
    preprocess.preprocess(x, **{argument: value})


def test_nothing_left_is_an_error():
  x = sources.Interactions(user=np.ones(3, np.int64), item=np.arange(3, dtype=np.int64),
                           timestamp=np.arange(3, dtype=np.int64))
  with pytest.raises(ValueError, match="no interactions left.*min_user_interactions=4"):
    preprocess.preprocess(x, min_user_interactions=4, log=None)


def test_leave_one_out_by_example():
  seq = np.array([7, 3, 9, 4, 1], np.int64)
  assert preprocess.split_train(seq).tolist() == [7, 3, 9]
  history, target = preprocess.split_eval(seq, "valid")
  assert history.tolist() == [7, 3, 9] and target == 4
  history, target = preprocess.split_eval(seq, "test")
  assert history.tolist() == [7, 3, 9, 4] and target == 1
  shortest = np.array([5, 6, 8], np.int64)  # MIN_SEQUENCE_LENGTH items
  assert preprocess.split_train(shortest).tolist() == [5]
  assert [x.tolist() if hasattr(x, "tolist") else x
          for x in preprocess.split_eval(shortest, "valid")] == [[5], 6]
  assert [x.tolist() if hasattr(x, "tolist") else x
          for x in preprocess.split_eval(shortest, "test")] == [[5, 6], 8]


def test_split_eval_errors():
  with pytest.raises(ValueError, match="split"):
    preprocess.split_eval(np.arange(1, 5), "train")
  with pytest.raises(ValueError, match="sequence"):
    preprocess.split_eval(np.arange(1, 3), "test")


def test_real_sasrec_file_ids_map_to_themselves():
  path = SHARED_DATA / "ml-1m" / "ml-1m_sasrec_order.txt"
  if not path.exists():
    pytest.skip(f"real data not found at {path} (set DEEPREC_SHARED_DATA)")
  data = preprocess.preprocess(sources.read_sasrec_text(str(path)), min_user_interactions=5,
                               log=None)
  assert data.stats()["interactions"] == 999_611
  np.testing.assert_array_equal(data.item_ids[1:], np.arange(1, 3_417))
  np.testing.assert_array_equal(data.user_ids, np.arange(1, 6_041))


def _exactly(message: str) -> str:
  return rf"\A{re.escape(message)}\Z"


def _example(with_ratings: bool = True) -> sources.Interactions:
  """Users 5, 8, 3; items 10..50; two low ratings (rows 2 and 8)."""
  return sources.Interactions(
      user=np.array([5, 5, 5, 5, 5, 8, 8, 8, 3, 3], np.int64),
      item=np.array([10, 20, 30, 40, 10, 20, 30, 40, 10, 50], np.int64),
      timestamp=np.array([1, 2, 3, 4, 5, 1, 2, 3, 1, 2], np.int64),
      rating=(np.array([5, 4, 1, 5, 5, 5, 5, 5, 2, 5], np.float32) if with_ratings else None))


def test_log_lines_by_example():
  """Every step's line, worked out by hand (users, items, interactions, avg length)."""
  messages = []
  data = preprocess.preprocess(_example(), rating_threshold=3.0, max_history=3,
                               log=messages.append)
  # Ratings >= 3 drop rows 2 and 8; user 5 keeps its last 3 of 4; user 3 (1 item) is dropped.
  assert messages == [
      "raw: 3 users, 5 items, 10 interactions, avg length 3.3",
      "implicit feedback (rating >= 3.0): 3 users, 5 items, 10 interactions, avg length 3.3 "
      "-> 3 users, 5 items, 8 interactions, avg length 2.7",
      "max_history=3 (most recent kept): 3 users, 5 items, 8 interactions, avg length 2.7 "
      "-> 3 users, 5 items, 7 interactions, avg length 2.3",
      "k-core (users >= 3, raised from 0 for leave-one-out; items >= 0): 3 users, 5 items, "
      "7 interactions, avg length 2.3 -> 2 users, 4 items, 6 interactions, avg length 3.0",
      "remapped ids: 2 users, items 1..4, 6 interactions, avg length 3.0",
  ]
  assert [s.tolist() for s in data.sequences] == [[2, 4, 1], [2, 3, 4]]  # 10 20 30 40 -> 1..4
  np.testing.assert_array_equal(data.user_ids, [5, 8])

  messages = []
  data = preprocess.preprocess(_example(with_ratings=False), rating_threshold=3.0,
                               min_user_interactions=2, keep_short_users=True,
                               log=messages.append)
  assert messages == [
      "raw: 3 users, 5 items, 10 interactions, avg length 3.3",
      "implicit feedback: the source has no ratings; rating_threshold=3.0 ignored",
      "keep_short_users: 1 users with < 3 interactions kept as training-only users",
      "k-core (users >= 2; items >= 0): 3 users, 5 items, 10 interactions, avg length 3.3 "
      "-> 3 users, 5 items, 10 interactions, avg length 3.3",
      "remapped ids: 3 users, items 1..5, 10 interactions, avg length 3.3",
  ]
  assert [s.tolist() for s in data.sequences] == [[1, 5], [1, 2, 3, 4, 1], [2, 3, 4]]
  # One user: the average is its length.
  x = _example()
  first = x.user == 5
  one = preprocess.preprocess(sources.Interactions(user=x.user[first], item=x.item[first],
                                                   timestamp=x.timestamp[first]),
                              log=messages.append)
  assert one.stats() == dict(users=1, items=4, interactions=5, avg_length=5.0)
  assert messages[-1] == "remapped ids: 1 users, items 1..4, 5 interactions, avg length 5.0"
  assert messages[-2].endswith("-> 1 users, 4 items, 5 interactions, avg length 5.0")


def test_default_and_small_rating_thresholds():
  x = _example()
  x = sources.Interactions(user=x.user, item=x.item, timestamp=x.timestamp,
                           rating=np.where(np.arange(10) % 3 == 0, 0.0, 0.5).astype(np.float32))
  messages = []
  # By default every rating is kept, even 0, and no implicit-feedback step runs.
  assert preprocess.preprocess(x, keep_short_users=True,
                               log=messages.append).num_interactions == 10
  assert not any("implicit" in m for m in messages)
  assert preprocess.preprocess(x, rating_threshold=0.5, keep_short_users=True,
                               log=None).num_interactions == 6


def test_error_messages_in_full():
  x = _example()
  cases = [
      (dict(rating_threshold=-1.0), "rating_threshold must be a finite number >= 0, got -1.0"),
      (dict(min_user_interactions=-1),
       "min_user_interactions must be an integer >= 0 (0 = off), got -1"),
      (dict(min_item_interactions=True),
       "min_item_interactions must be an integer >= 0 (0 = off), got True"),
      (dict(max_history=2.0), "max_history must be an integer >= 0 (0 = off), got 2.0"),
      (dict(max_history=1), "max_history must be 0 (keep all) or >= 3 (leave-one-out needs 3 "
       "items), got 1"),
      # Nothing left after the ratings, then after the k-core.
      (dict(rating_threshold=6.0, min_user_interactions=2, min_item_interactions=1),
       "no interactions left after preprocessing; loosen rating_threshold=6.0, "
       "min_user_interactions=2 or min_item_interactions=1"),
      (dict(rating_threshold=2.0, min_user_interactions=3, min_item_interactions=4),
       "no interactions left after preprocessing; loosen rating_threshold=2.0, "
       "min_user_interactions=3 or min_item_interactions=4"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=_exactly(message)):
      preprocess.preprocess(x, log=None, **kwargs)
  with pytest.raises(ValueError, match=_exactly(
      "sequence must hold >= 3 items for leave-one-out, got 2")):
    preprocess.split_eval(np.arange(1, 3), "valid")
  with pytest.raises(ValueError, match=_exactly("split must be 'valid' or 'test', got 'train'")):
    preprocess.split_eval(np.arange(1, 5), "train")


def test_split_train_keeps_short_sequences_whole():
  for n in (1, 2):
    assert preprocess.split_train(np.arange(1, n + 1)).tolist() == list(range(1, n + 1))


def test_output_dtypes():
  x = _example()
  x = sources.Interactions(user=x.user.astype(np.int32), item=x.item.astype(np.int32),
                           timestamp=x.timestamp, item_genres={10: ("Drama",), 40: ("Comedy",)})
  data = preprocess.preprocess(x, log=None)
  assert data.user_ids.dtype == np.int64 and data.item_ids.dtype == np.int64
  assert all(s.dtype == np.int64 for s in data.sequences)
  assert data.item_genres.dtype == np.bool_
  np.testing.assert_array_equal(data.item_genres, [[0, 0], [0, 1], [0, 0], [0, 0], [1, 0]])


def test_k_core_of_nothing():
  empty = np.zeros(0, np.int64)
  keep = preprocess.k_core(empty, empty, 3, 2)
  assert keep.dtype == np.bool_ and keep.shape == (0,)
