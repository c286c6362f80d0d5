"""Raw readers: generated MovieLens/SASRec/CSV fixtures, bad input, real data."""

import os
import pathlib
import zipfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from deeprec_jax.data import builders, sources
from experiments.configs import default

# Real data lives outside the repository (license: no redistribution).
SHARED_DATA = pathlib.Path(
    os.environ.get("DEEPREC_SHARED_DATA")
    or pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")

# ML-100K-like fixture: (user, item, rating, timestamp) rows in file order.
ROWS_100K = [(196, 242, 3, 881250949), (186, 302, 3, 891717742), (22, 377, 1, 878887116),
             (196, 302, 5, 881250950), (22, 242, 4, 878887117)]
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western")


def _flags(*genres: str) -> str:
  return "|".join("1" if g in genres else "0" for g in GENRES_100K)


def _u_item() -> bytes:
  lines = [
      f"242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya|{_flags('Comedy')}",
      # Latin-1 title, as in the real u.item.
      f"302|L.A. Confidential (1997)|01-Jan-1997||url|{_flags('Crime', 'Film-Noir')}",
      "377|Heavyweights (1994)|01-Jan-1994||url|" + _flags("Children's", "Comedy"),
      f"1|Caf\xe9 Society (1995)|01-Jan-1995||url|{_flags('Animation', 'Comedy')}",
  ]
  return ("\n".join(lines) + "\n").encode("latin-1")


def _u_genre() -> bytes:
  return ("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES_100K)) + "\n").encode()


def _u_data(rows=ROWS_100K) -> bytes:
  return "".join("\t".join(map(str, r)) + "\n" for r in rows).encode()


def _ratings_dat(rows=ROWS_100K) -> bytes:
  return "".join("::".join(map(str, r)) + "\n" for r in rows).encode()


def _movies_dat() -> bytes:
  return ("242::Kolya (1996)::Comedy\n302::L.A. Confidential (1997)::Crime|Film-Noir|Mystery\n"
          "377::Caf\xe9: Heavyweights (1994)::Children's|Comedy\n").encode("latin-1")


ML100K_FILES = {"u.data": _u_data(), "u.item": _u_item(), "u.genre": _u_genre()}
ML1M_FILES = {"ratings.dat": _ratings_dat(), "movies.dat": _movies_dat()}


def _write_folder(root: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
  root.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    (root / name).write_bytes(data)
  return root


def _write_zip(path: pathlib.Path, folder: str, files: dict[str, bytes]) -> pathlib.Path:
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in files.items():
      archive.writestr(f"{folder}/{name}", data)
  return path


def _check_fixture(x: sources.Interactions):
  rows = np.array(ROWS_100K)
  np.testing.assert_array_equal(x.user, rows[:, 0])
  np.testing.assert_array_equal(x.item, rows[:, 1])
  np.testing.assert_array_equal(x.rating, rows[:, 2].astype(np.float32))
  np.testing.assert_array_equal(x.timestamp, rows[:, 3])
  assert x.user.dtype == x.item.dtype == x.timestamp.dtype == np.int64
  assert x.rating.dtype == np.float32
  assert len(x) == len(ROWS_100K)


# ----------------------------------------------------------------------------
# MovieLens.


@pytest.mark.parametrize("layout", ["folder", "parent_folder", "zip", "ratings_file"])
def test_read_movielens_100k(tmp_path, layout):
  folder = _write_folder(tmp_path / "data" / "ml-100k", ML100K_FILES)
  path = {
      "folder": folder,
      "parent_folder": folder.parent,
      "zip": _write_zip(tmp_path / "ml-100k.zip", "ml-100k", ML100K_FILES),
      "ratings_file": folder / "u.data",
  }[layout]
  for variant in (None, "ml-100k"):
    x = sources.read_movielens(str(path), variant)
    _check_fixture(x)
    assert x.item_genres[242] == ("Comedy",)
    assert x.item_genres[302] == ("Crime", "Film-Noir")
    assert x.item_genres[1] == ("Animation", "Comedy")


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_read_movielens_1m(tmp_path, layout):
  if layout == "folder":
    path = _write_folder(tmp_path / "ml-1m", ML1M_FILES)
  else:
    path = _write_zip(tmp_path / "ml-1m.zip", "ml-1m", ML1M_FILES)
  x = sources.read_movielens(str(path))
  _check_fixture(x)
  assert x.item_genres[302] == ("Crime", "Film-Noir", "Mystery")
  assert x.item_genres[377] == ("Children's", "Comedy")  # ':' inside a title


def test_read_movielens_side_files_are_optional(tmp_path):
  x = sources.read_movielens(str(_write_folder(tmp_path / "a", {"u.data": _u_data()})))
  _check_fixture(x)
  assert x.item_genres is None
  # Without u.genre the 19 standard genre names are used.
  x = sources.read_movielens(
      str(_write_folder(tmp_path / "b", {"u.data": _u_data(), "u.item": _u_item()})))
  assert x.item_genres[302] == ("Crime", "Film-Noir")
  x = sources.read_movielens(str(_write_zip(tmp_path / "c.zip", "ml-1m", {
      "ratings.dat": _ratings_dat()})))
  assert x.item_genres is None


def test_read_movielens_rejects_unknown_variant(tmp_path):
  with pytest.raises(ValueError, match="variant"):
    sources.read_movielens(str(tmp_path), "ml-20m")


# Bad MovieLens input: (file name, contents, line of the error).
BAD_MOVIELENS = {
    "100k_column_count": ("u.data", b"1\t2\t3\t4\n1\t2\t3\n", 2),
    "100k_non_numeric_user": ("u.data", b"1\t2\t3\t4\n\nx\t2\t3\t4\n", 3),
    "100k_non_numeric_item": ("u.data", b"1\t2\t3\t4\n1\tabc\t3\t4\n", 2),
    "100k_non_numeric_rating": ("u.data", b"1\t2\tgood\t4\n", 1),
    "100k_non_numeric_timestamp": ("u.data", b"1\t2\t3\t4\n1\t2\t3\t4\n1\t2\t3\t4.5\n", 3),
    "100k_empty": ("u.data", b"", 1),
    "100k_blank_lines_only": ("u.data", b"\n\n", 1),
    "1m_column_count": ("ratings.dat", b"1::2::3::4\n1::2::3::4::5\n", 2),
    "1m_tab_separated": ("ratings.dat", b"1::2::3::4\n1\t2\t3\t4\n", 2),
    "1m_non_numeric": ("ratings.dat", b"1::2::3::4\n1::2::3::4\n1::two::3::4\n", 3),
    "1m_empty": ("ratings.dat", b"", 1),
}


@pytest.mark.parametrize("case", list(BAD_MOVIELENS))
@pytest.mark.parametrize("as_zip", [False, True])
def test_read_movielens_bad_lines(tmp_path, case, as_zip):
  file_name, data, line = BAD_MOVIELENS[case]
  variant = "ml-100k" if file_name == "u.data" else "ml-1m"
  if as_zip:
    path = _write_zip(tmp_path / f"{variant}.zip", variant, {file_name: data})
  else:
    path = _write_folder(tmp_path / variant, {file_name: data})
  with pytest.raises(sources.DataFormatError) as error:
    sources.read_movielens(str(path))
  message = str(error.value)
  assert file_name in message and f"line {line}:" in message, message
  if as_zip:
    assert f"{variant}.zip" in message


BAD_SIDE_FILES = {
    "u_item_flags": ("ml-100k", "u.item", b"1|Toy Story|x||url|" + _flags().encode() + b"\n"
                     b"2|GoldenEye|x||url|0|1\n", 2),
    "u_item_id": ("ml-100k", "u.item", b"one|Toy Story|x||url|" + _flags().encode() + b"\n", 1),
    "u_genre": ("ml-100k", "u.genre", b"unknown|0\nAction\n", 2),
    "movies_dat": ("ml-1m", "movies.dat", b"1::Toy Story::Comedy\n2 Jumanji\n", 2),
}


@pytest.mark.parametrize("case", list(BAD_SIDE_FILES))
def test_read_movielens_bad_side_files(tmp_path, case):
  variant, file_name, data, line = BAD_SIDE_FILES[case]
  files = dict(ML100K_FILES if variant == "ml-100k" else ML1M_FILES)
  files[file_name] = data
  with pytest.raises(sources.DataFormatError) as error:
    sources.read_movielens(str(_write_folder(tmp_path / variant, files)))
  assert file_name in str(error.value) and f"line {line}:" in str(error.value)


def test_read_movielens_unknown_formats(tmp_path):
  empty_folder = tmp_path / "empty"
  empty_folder.mkdir()
  other_zip = _write_zip(tmp_path / "other.zip", "x", {"notes.txt": b"hello"})
  other_file = tmp_path / "ratings.csv"
  other_file.write_bytes(b"1,2,3\n")
  ml100k_folder = _write_folder(tmp_path / "ml-100k", {"u.data": _u_data()})
  cases = [
      (empty_folder, None, "u.data or ratings.dat"),
      (other_zip, None, "zip without"),
      (other_file, None, "line 1: unknown format"),
      (ml100k_folder, "ml-1m", "without ratings.dat"),  # the variant does not match the files
      (tmp_path / "missing", None, "no such file"),
  ]
  for path, variant, expected in cases:
    with pytest.raises(sources.DataFormatError) as error:
      sources.read_movielens(str(path), variant)
    assert str(path) in str(error.value) and expected in str(error.value), str(error.value)
  # A missing path also says where to get the data.
  with pytest.raises(sources.DataFormatError, match="download_movielens"):
    sources.read_movielens(str(tmp_path / "missing"), "ml-1m")


def test_download_movielens_failure_says_where_to_put_files(tmp_path, monkeypatch):
  class OfflineDownloadManager:

    def __init__(self, *, download_dir):
      del download_dir

    def download_and_extract(self, url):
      raise ConnectionError(f"cannot reach {url}")

  monkeypatch.setattr(tfds.download, "DownloadManager", OfflineDownloadManager)
  with pytest.raises(sources.DownloadError) as error:
    sources.download_movielens("ml-1m", str(tmp_path))
  message = str(error.value)
  assert sources.MOVIELENS_URLS["ml-1m"] in message
  assert str(tmp_path / "ml-1m.zip") in message
  assert str(tmp_path / "ml-1m" / "ratings.dat") in message
  assert isinstance(error.value.__cause__, ConnectionError)

  # Files put there by hand are used without downloading.
  folder = _write_folder(tmp_path / "ml-1m", ML1M_FILES)
  assert sources.download_movielens("ml-1m", str(tmp_path)) == str(folder)
  zip_path = _write_zip(tmp_path / "ml-100k.zip", "ml-100k", ML100K_FILES)
  assert sources.download_movielens("ml-100k", str(tmp_path)) == str(zip_path)
  with pytest.raises(ValueError, match="variant"):
    sources.download_movielens("ml-20m", str(tmp_path))


# ----------------------------------------------------------------------------
# SASRec text and CSV/TSV.


def test_read_sasrec_text(tmp_path):
  path = tmp_path / "ml-1m.txt"
  path.write_bytes(b"1 10\n1 11\r\n\n2  10\n2\t12\n")  # CRLF, blank line, mixed whitespace
  x = sources.read_sasrec_text(str(path))
  np.testing.assert_array_equal(x.user, [1, 1, 2, 2])
  np.testing.assert_array_equal(x.item, [10, 11, 10, 12])
  np.testing.assert_array_equal(x.timestamp, [0, 1, 2, 3])
  assert x.rating is None and x.item_genres is None


@pytest.mark.parametrize("data,line", [
    (b"1 2\n1 2 3\n", 2),
    (b"1 2\n1\n", 2),
    (b"1 2\n\n1 b\n", 3),
    (b"1 2.0\n", 1),
    (b"1 2\n1 99999999999999999999\n", 2),  # beyond int64
    (b"", 1),
    (b"PK\x03\x04\x00\x00binary", 1),
])
def test_read_sasrec_text_bad_lines(tmp_path, data, line):
  path = tmp_path / "seqs.txt"
  path.write_bytes(data)
  with pytest.raises(sources.DataFormatError) as error:
    sources.read_sasrec_text(str(path))
  assert "seqs.txt" in str(error.value) and f"line {line}:" in str(error.value), str(error.value)


def test_read_sasrec_text_missing_or_folder(tmp_path):
  for path in (tmp_path / "missing.txt", tmp_path):
    with pytest.raises(sources.DataFormatError, match=str(path)):
      sources.read_sasrec_text(str(path))


def test_read_csv_custom_columns(tmp_path):
  path = tmp_path / "log.csv"
  path.write_text('\ufeffts,title,uid,iid,stars\n5,"Heat, 1995",7,100,4.5\n3,x,8,101,2\n'
                  '\n5,y,7,102,3\n', encoding="utf-8")
  x = sources.read_csv(str(path), user_column="uid", item_column="iid", time_column="ts",
                       rating_column="stars")
  np.testing.assert_array_equal(x.user, [7, 8, 7])
  np.testing.assert_array_equal(x.item, [100, 101, 102])
  np.testing.assert_array_equal(x.timestamp, [5, 3, 5])
  np.testing.assert_array_equal(x.rating, np.array([4.5, 2, 3], np.float32))


def test_read_tsv_without_time_column(tmp_path):
  path = tmp_path / "log.tsv"
  path.write_text("user\titem\n1\t2\n1\t3\n2\t2\n")
  x = sources.read_csv(str(path), delimiter="\t", user_column="user", item_column="item",
                       time_column="")
  np.testing.assert_array_equal(x.user, [1, 1, 2])
  np.testing.assert_array_equal(x.item, [2, 3, 2])
  np.testing.assert_array_equal(x.timestamp, [0, 1, 2])
  assert x.rating is None


@pytest.mark.parametrize("data,line,expected", [
    ("user_id,item_id\n1,2\n", 1, "no column 'timestamp' (time_column)"),
    ("user_id,item_id,timestamp\n1,2,3\n1,2\n", 3, "expected 3"),
    ("user_id,item_id,timestamp\n1,2,3\n1,2,3,4\n", 3, "expected 3"),
    ("user_id,item_id,timestamp\n1,2,3\n\n1,2,2020-01-01\n", 4, "'timestamp'"),
    ("user_id,item_id,timestamp\nu1,2,3\n", 2, "'user_id'"),
    ("user_id,item_id,timestamp\n1,2,3\n1,2,99999999999999999999\n", 3, "int64"),
    ("user_id,item_id,timestamp\n", 2, "no interactions"),
    ("", 1, "header"),
])
def test_read_csv_bad_input(tmp_path, data, line, expected):
  path = tmp_path / "log.csv"
  path.write_text(data)
  with pytest.raises(sources.DataFormatError) as error:
    sources.read_csv(str(path))
  message = str(error.value)
  assert "log.csv" in message and f"line {line}:" in message and expected in message, message


def test_read_csv_bad_rating_and_header_listing(tmp_path):
  path = tmp_path / "log.tsv"
  path.write_text("u\ti\tt\tr\n1\t2\t3\t4\n1\t2\t3\tfive\n")
  with pytest.raises(sources.DataFormatError, match="log.tsv, line 3: .*'r'"):
    sources.read_csv(str(path), delimiter="\t", user_column="u", item_column="i",
                     time_column="t", rating_column="r")
  # A wrong delimiter shows up as a missing column, with the header as read.
  with pytest.raises(sources.DataFormatError, match=r"line 1: .*\['u\\ti\\tt\\tr'\]"):
    sources.read_csv(str(path), user_column="u", item_column="i", time_column="t")
  with pytest.raises(ValueError, match="delimiter"):
    sources.read_csv(str(path), delimiter="::")


# ----------------------------------------------------------------------------
# Config dispatch.


def test_load_interactions_dispatch(tmp_path):
  data = default.get_config().data
  with data.unlocked():
    data.synthetic.num_users = 20
  synthetic = builders.load_interactions(data)
  assert len(np.unique(synthetic.user)) == 20

  text = tmp_path / "seqs.txt"
  text.write_text("1 1\n1 2\n")
  csv_path = tmp_path / "log.csv"
  csv_path.write_text("user_id,item_id,timestamp\n1,2,3\n")
  folder = _write_folder(tmp_path / "ml-100k", ML100K_FILES)
  zip_path = _write_zip(tmp_path / "ml-1m.zip", "ml-1m", ML1M_FILES)
  for name, path, length in (("sasrec_text", text, 2), ("csv", csv_path, 1),
                             ("ml-100k", folder, 5), ("ml-1m", zip_path, 5)):
    data = default.data_config(name if name != "ml-1m" else "ml-1m-raw")
    data.path = str(path)
    assert len(builders.load_interactions(data)) == length


def test_load_interactions_errors(tmp_path):
  data = default.data_config("ml-100k")
  data.path = str(tmp_path / "nowhere")
  with pytest.raises(sources.DataFormatError) as error:
    builders.load_interactions(data)
  message = str(error.value)
  assert "data.path" in message and "download_movielens" in message
  assert sources.MOVIELENS_URLS["ml-100k"] in message

  with pytest.raises(ValueError, match="data.name='movielens'.*ml-100k"):
    builders.load_interactions(ml_collections.ConfigDict({"name": "movielens", "path": ""}))
  with pytest.raises(ValueError, match="data.path"):
    builders.load_interactions(default.data_config("sasrec_text"))


def test_interactions_checks_column_lengths():
  with pytest.raises(ValueError, match="one length"):
    sources.Interactions(user=np.zeros(2, np.int64), item=np.zeros(3, np.int64),
                         timestamp=np.zeros(2, np.int64))


# ----------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent).


def _real(relative: str) -> str:
  path = SHARED_DATA / relative
  if not path.exists():
    pytest.skip(f"real data not found at {path} (set DEEPREC_SHARED_DATA)")
  return str(path)


def _counts(x: sources.Interactions) -> tuple[int, int, int]:
  return len(x), len(np.unique(x.user)), len(np.unique(x.item))


def test_real_movielens_100k():
  x = sources.read_movielens(_real("ml-100k"))
  assert _counts(x) == (100_000, 943, 1_682)
  assert x.item_genres[1] == ("Animation", "Children's", "Comedy")
  assert len(x.item_genres) == 1_682
  assert set(np.unique(x.rating)) == {1, 2, 3, 4, 5}


def test_real_movielens_1m_sasrec_order():
  x = sources.read_sasrec_text(_real("ml-1m/ml-1m_sasrec_order.txt"))
  assert _counts(x) == (999_611, 6_040, 3_416)
  # 1-based contiguous ids, as in the SASRec paper's file.
  assert x.user.min() == x.item.min() == 1 and x.item.max() == 3_416


def test_real_movielens_1m_chronological():
  x = sources.read_sasrec_text(_real("ml-1m/ml-1m_chrono_all.txt"))
  assert _counts(x) == (1_000_209, 6_040, 3_706)
