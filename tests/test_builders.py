"""TFDS builders: round trip, cache reuse, versioning, atomic builds, no TensorFlow."""

import glob
import os
import sys

import numpy as np
import pytest

from deeprec_jax.data import builders, preprocess, sources
from experiments.configs import default

# SASRec-style 'user item' lines: 5 users with 3..6 items each, 20 lines.
SASREC_TEXT = """\
1 10
1 11
1 12
1 13
2 11
2 14
2 10
3 12
3 13
3 14
3 15
3 10
3 11
4 15
4 10
4 12
5 10
5 11
5 12
5 13
"""


def _synthetic_config(data_dir):
  config = default.data_config("synthetic")
  config.data_dir = str(data_dir)
  config.min_user_interactions = 0
  config.synthetic.num_users = 40
  config.synthetic.num_items = 30
  config.synthetic.num_clusters = 3
  config.synthetic.mean_length = 8
  return config


def _text_config(data_dir, path):
  config = default.data_config("sasrec_text")
  config.data_dir = str(data_dir)
  config.path = str(path)
  config.min_user_interactions = 0
  return config


def _write(path, text):
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def _expected(config):
  return preprocess.preprocess(
      builders.load_interactions(config), rating_threshold=config.rating_threshold,
      min_user_interactions=config.min_user_interactions,
      min_item_interactions=config.min_item_interactions, max_history=config.max_history,
      keep_short_users=config.keep_short_users, log=None)


def _assert_matches(dataset, seq_data):
  assert dataset.num_users == seq_data.num_users == len(dataset.source)
  assert dataset.num_items == seq_data.num_items
  np.testing.assert_array_equal(dataset.user_ids, seq_data.user_ids)
  np.testing.assert_array_equal(dataset.item_ids, seq_data.item_ids)
  np.testing.assert_array_equal(dataset.lengths, [len(s) for s in seq_data.sequences])
  for i, seq in enumerate(seq_data.sequences):
    record = dataset.source[i]
    assert int(record["user"]) == i
    assert int(record["user_id"]) == seq_data.user_ids[i]
    assert record["item_seq"].dtype == np.int64
    np.testing.assert_array_equal(record["item_seq"], seq)
    np.testing.assert_array_equal(record["time_seq"], seq_data.time_seqs[i])


def _versions(data_dir):
  """The prepared version folders under a TFDS data_dir."""
  return sorted(glob.glob(os.path.join(str(data_dir), "*", "*", "1.1.0")))


def _forbid_parsing(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("the raw data was parsed again")
  monkeypatch.setattr(builders, "load_interactions", fail)


def test_synthetic_round_trip(tmp_path):
  config = _synthetic_config(tmp_path)
  dataset = builders.load(config)
  _assert_matches(dataset, _expected(config))
  assert dataset.stats["users"] == dataset.num_users
  assert dataset.item_genres is None and dataset.genre_names == ()
  assert dataset.name.startswith("deeprec_synthetic/")


def test_sasrec_text_round_trip_and_reuse(tmp_path, monkeypatch):
  config = _text_config(tmp_path / "tfds", _write(tmp_path / "data.txt", SASREC_TEXT))
  first = builders.load(config)
  _assert_matches(first, _expected(config))
  assert first.num_users == 5 and first.num_items == 6
  np.testing.assert_array_equal(first.item_ids, [-1, 10, 11, 12, 13, 14, 15])

  _forbid_parsing(monkeypatch)
  second = builders.load(config)
  assert second.name == first.name
  np.testing.assert_array_equal(second.lengths, first.lengths)
  for i in range(first.num_users):
    np.testing.assert_array_equal(second.source[i]["item_seq"], first.source[i]["item_seq"])
  assert len(_versions(tmp_path / "tfds")) == 1


def test_batch_settings_reuse_the_cache(tmp_path, monkeypatch):
  config = _text_config(tmp_path / "tfds", _write(tmp_path / "data.txt", SASREC_TEXT))
  first = builders.load(config)
  _forbid_parsing(monkeypatch)
  config.max_len = 7
  config.synthetic.seed = 5  # Only the synthetic source reads this block.
  config.csv.delimiter = "\t"  # Only the csv source reads this block.
  assert builders.load(config).name == first.name
  assert len(_versions(tmp_path / "tfds")) == 1


@pytest.mark.parametrize("key, value", [
    ("min_user_interactions", 4),
    ("min_item_interactions", 3),
    ("max_history", 3),
    ("rating_threshold", 1.0),
])
def test_preprocessing_setting_gives_new_version(tmp_path, key, value):
  config = _text_config(tmp_path / "tfds", _write(tmp_path / "data.txt", SASREC_TEXT))
  first = builders.load(config)
  setattr(config, key, value)
  second = builders.load(config)
  assert second.name != first.name
  assert len(_versions(tmp_path / "tfds")) == 2
  _assert_matches(second, _expected(config))


def test_synthetic_settings_give_new_version(tmp_path):
  config = _synthetic_config(tmp_path)
  first = builders.load(config)
  config.synthetic.seed = 1
  second = builders.load(config)
  assert second.name != first.name
  _assert_matches(second, _expected(config))


def test_edited_raw_file_gives_new_version(tmp_path):
  path = _write(tmp_path / "data.txt", SASREC_TEXT)
  config = _text_config(tmp_path / "tfds", path)
  first = builders.load(config)
  _write(path, SASREC_TEXT + "6 10\n6 11\n6 12\n")
  second = builders.load(config)
  assert second.name != first.name
  assert second.num_users == first.num_users + 1
  _assert_matches(second, _expected(config))


def test_bad_file_leaves_no_cache_then_fixed_file_builds(tmp_path, monkeypatch):
  path = _write(tmp_path / "data.txt", SASREC_TEXT + "6 ten\n")
  config = _text_config(tmp_path / "tfds", path)
  with pytest.raises(sources.DataFormatError, match="line 21"):
    builders.load(config)
  assert _versions(tmp_path / "tfds") == []

  _write(path, SASREC_TEXT)
  dataset = builders.load(config)
  _assert_matches(dataset, _expected(config))
  _forbid_parsing(monkeypatch)
  assert builders.load(config).name == dataset.name
  assert len(_versions(tmp_path / "tfds")) == 1


def test_failure_while_writing_leaves_no_half_written_version(tmp_path, monkeypatch):
  config = _text_config(tmp_path / "tfds", _write(tmp_path / "data.txt", SASREC_TEXT))
  generate = builders.SequenceBuilder._generate_examples

  def two_then_crash(self, seq_data):
    examples = generate(self, seq_data)
    yield next(examples)
    yield next(examples)
    raise OSError("disk full")

  with monkeypatch.context() as patch:
    patch.setattr(builders.SequenceBuilder, "_generate_examples", two_then_crash)
    with pytest.raises(OSError, match="disk full"):
      builders.load(config)
  assert _versions(tmp_path / "tfds") == []
  assert not glob.glob(os.path.join(str(tmp_path / "tfds"), "*", "*", "incomplete*"))

  # Same settings, same config name: the retry builds everything.
  dataset = builders.load(config)
  _assert_matches(dataset, _expected(config))


def test_movielens_genres_round_trip(tmp_path):
  folder = tmp_path / "ml-100k"
  folder.mkdir()
  ratings = [(1, 1, 5, 10), (1, 2, 3, 11), (1, 3, 4, 12), (2, 2, 4, 10), (2, 3, 1, 11),
             (2, 1, 2, 12), (2, 4, 5, 13)]
  _write(folder / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
  _write(folder / "u.genre", "Action|0\nComedy|1\nDrama|2\n\n")
  _write(folder / "u.item", "1|A|01-Jan-1995||url|1|0|1\n2|B|01-Jan-1995||url|0|1|0\n"
                            "3|C|01-Jan-1995||url|0|0|0\n4|D|01-Jan-1995||url|1|1|1\n")
  config = default.data_config("ml-100k")
  config.path = str(folder)
  config.data_dir = str(tmp_path / "tfds")
  config.min_user_interactions = 0
  dataset = builders.load(config)
  expected = _expected(config)
  _assert_matches(dataset, expected)
  assert dataset.genre_names == expected.genre_names == ("Action", "Comedy", "Drama")
  np.testing.assert_array_equal(dataset.item_genres, expected.item_genres)
  assert dataset.name.startswith("deeprec_ml_100k/")


def test_csv_source_and_its_options(tmp_path):
  rows = "".join(f"{u},{i},{t}\n" for u, i, t in [(7, 1, 3), (7, 2, 1), (7, 3, 2), (8, 2, 5),
                                                  (8, 3, 6), (8, 1, 7)])
  path = _write(tmp_path / "log.csv", "uid,iid,ts\n" + rows)
  config = default.data_config("csv")
  config.path = path
  config.data_dir = str(tmp_path / "tfds")
  config.min_user_interactions = 0
  config.csv.user_column, config.csv.item_column, config.csv.time_column = "uid", "iid", "ts"
  by_time = builders.load(config)
  np.testing.assert_array_equal(by_time.source[0]["item_seq"], [2, 3, 1])  # sorted by ts
  np.testing.assert_array_equal(by_time.source[0]["time_seq"], [1, 2, 3])  # their times
  np.testing.assert_array_equal(by_time.source[1]["time_seq"], [5, 6, 7])
  config.csv.time_column = ""  # File order instead: a different dataset.
  by_file = builders.load(config)
  assert by_file.name != by_time.name
  np.testing.assert_array_equal(by_file.source[0]["item_seq"], [1, 2, 3])


def test_from_sequences_matches_load(tmp_path):
  config = _text_config(tmp_path / "tfds", _write(tmp_path / "data.txt", SASREC_TEXT))
  in_memory = builders.from_sequences(_expected(config))
  _assert_matches(in_memory, _expected(config))
  loaded = builders.load(config)
  assert in_memory.stats == loaded.stats


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv(builders.DATA_DIR_ENV, raising=False)
  assert builders.resolve_data_dir("") == os.path.expanduser("~/.cache/deeprec_jax/tfds")
  monkeypatch.setenv(builders.DATA_DIR_ENV, str(tmp_path / "env"))
  assert builders.resolve_data_dir("") == str(tmp_path / "env")
  assert builders.resolve_data_dir(str(tmp_path / "explicit")) == str(tmp_path / "explicit")


def test_unknown_name_and_missing_path(tmp_path):
  config = _text_config(tmp_path, tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="data.path"):
    builders.load(config)
  config.name = "nope"
  with pytest.raises(ValueError, match="data.name"):
    builders.load(config)


def test_no_tensorflow_imported(tmp_path):
  dataset = builders.load(_synthetic_config(tmp_path))
  assert dataset.source[0]["item_seq"].size
  # tensorflow_datasets and tensorflow_metadata are fine; TensorFlow itself is not.
  loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
  assert not loaded, loaded
