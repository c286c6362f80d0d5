"""Raw interaction readers: MovieLens 100K/1M, SASRec-style text, CSV/TSV logs.

Every reader returns an `Interactions`: numpy columns in the source's own
(original) ids, one row per interaction, in file order. Turning them into
per-user sequences is `preprocess.py`'s job; picking the reader that
`config.data` names is `builders.load_interactions`'.

Bad input raises `DataFormatError`, whose message names the file, the 1-based
line and what was expected there, e.g.::

  ratings.dat, line 7: expected 4 '::'-separated fields
  'user::item::rating::timestamp', found 3: '1::2::5'

Parsing is vectorised (`bytes.split` plus numpy casts: ML-1M's million lines
take about a second). Only when that fast path fails do we scan the file line
by line, to find the first offending line for the message.
"""

import csv
import dataclasses
import io
import os
import zipfile
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

# Where GroupLens publishes the zips that `read_movielens` understands.
MOVIELENS_URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
# The interactions file of each variant; its presence identifies the variant.
RATINGS_FILE = {"ml-100k": "u.data", "ml-1m": "ratings.dat"}
# Optional side files, read when present.
_SIDE_FILES = {"ml-100k": ("u.item", "u.genre"), "ml-1m": ("movies.dat",)}
# The 19 genre flags of ML-100K's u.item, in flag order; used when u.genre is
# absent (u.genre holds the same list).
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_INT64_MIN, _INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max


class DataFormatError(ValueError):
  """Input data that cannot be read: names the file, the line and what was expected."""


class DownloadError(RuntimeError):
  """MovieLens could not be downloaded; the message says where to put the files by hand."""


@dataclasses.dataclass(frozen=True, eq=False)
class Interactions:
  """One row per interaction, in file order, in the source's original ids.

  Attributes:
    user: int64 [n], original user ids.
    item: int64 [n], original item ids.
    timestamp: int64 [n]; where the source has no time, the row index (file
      order), so that sorting by time keeps the file's order.
    rating: float32 [n] explicit ratings, or None for implicit sources.
    item_genres: original item id -> genre names (MovieLens side information),
      or None when the source has none.
  """

  user: np.ndarray
  item: np.ndarray
  timestamp: np.ndarray
  rating: np.ndarray | None = None
  item_genres: dict[int, tuple[str, ...]] | None = None

  def __post_init__(self):
    columns = {"user": self.user, "item": self.item, "timestamp": self.timestamp}
    if self.rating is not None:
      columns["rating"] = self.rating
    lengths = {name: np.shape(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1 or len(lengths["user"]) != 1:
      raise ValueError(f"Interactions columns must be 1-D and of one length, got shapes {lengths}")

  def __len__(self) -> int:
    return len(self.user)


# ----------------------------------------------------------------------------
# Parsing helpers.


def _show(line: bytes | str) -> str:
  """A line as it should appear in an error message: decoded, short."""
  if isinstance(line, bytes):
    line = line.decode("latin-1")
  line = line.rstrip("\r\n")
  return repr(line if len(line) <= 80 else line[:77] + "...")


def _read_bytes(path: str, expected: str) -> bytes:
  """Reads a whole file, turning a missing file or a folder into DataFormatError."""
  if not os.path.exists(path):
    raise DataFormatError(f"{path}: no such file; expected {expected}.")
  if os.path.isdir(path):
    raise DataFormatError(f"{path}: is a folder; expected {expected}.")
  with open(path, "rb") as f:
    return f.read()


def _describe(fields: Sequence[str], sep: bytes | None) -> str:
  if sep is None:
    return f"{len(fields)} whitespace-separated fields '{' '.join(fields)}'"
  sep_text = sep.decode()
  return f"{len(fields)} '{sep_text}'-separated fields '{sep_text.join(fields)}'"


def _cast(values: np.ndarray, kind: str) -> np.ndarray:
  return values.astype(np.int64 if kind == "i" else np.float32)


def _parse_table_fast(data: bytes, kinds: str, sep: bytes | None) -> list[np.ndarray] | None:
  """Vectorised parse; None (or ValueError) when some line is not well formed."""
  if sep is not None:
    # Fields are numbers, so they never hold whitespace; with none in the file,
    # replacing the separator by a space is exact.
    if b" " in data or b"\t" in data:
      return None
    data = data.replace(sep, b" ")
  lines = data.split(b"\n")
  counts = np.fromiter(map(len, map(bytes.split, lines)), np.int64, len(lines))
  if not np.all((counts == 0) | (counts == len(kinds))):  # blank lines are allowed
    return None
  table = np.array(data.split(), dtype=bytes).reshape(-1, len(kinds))
  return [_cast(table[:, j], kind) for j, kind in enumerate(kinds)]


def _parse_table_slow(
    data: bytes, name: str, fields: Sequence[str], kinds: str, sep: bytes | None
) -> list[np.ndarray]:
  """Line-by-line parse that raises DataFormatError at the first bad line."""
  rows = []
  for number, line in enumerate(data.split(b"\n"), start=1):
    if not line.strip():
      continue
    values = [v.strip() for v in line.split(sep)] if sep else line.split()
    if len(values) != len(fields):
      raise DataFormatError(
          f"{name}, line {number}: expected {_describe(fields, sep)}, "
          f"found {len(values)}: {_show(line)}")
    row = []
    for field, kind, value in zip(fields, kinds, values, strict=True):
      try:
        number_value = int(value) if kind == "i" else float(value)
        if kind == "i" and not _INT64_MIN <= number_value <= _INT64_MAX:
          raise ValueError("out of the int64 range")
      except ValueError:
        what = "an int64 integer" if kind == "i" else "a number"
        raise DataFormatError(
            f"{name}, line {number}: expected {what} as {field}, found "
            f"{_show(value)} in {_show(line)}") from None
      row.append(number_value)
    rows.append(row)
  return [
      _cast(np.array([row[j] for row in rows]).reshape(-1), kind) for j, kind in enumerate(kinds)
  ]


def _parse_table(
    data: bytes, name: str, fields: Sequence[str], kinds: str, sep: bytes | None = None
) -> list[np.ndarray]:
  """Parses a delimited numeric file into one numpy column per field.

  Args:
    data: the file's bytes.
    name: the file's name, for error messages.
    fields: the field names, for error messages.
    kinds: one letter per field, 'i' (int64) or 'f' (float32).
    sep: the field separator; None for any run of whitespace.

  Returns:
    One array [n] per field. Blank lines are skipped.

  Raises:
    DataFormatError: a line has the wrong number of fields or a non-numeric
      field, or the file holds no rows.
  """
  try:
    columns = _parse_table_fast(data, kinds, sep)
  except (ValueError, OverflowError):
    columns = None
  if columns is None:
    columns = _parse_table_slow(data, name, fields, kinds, sep)
  if len(columns[0]) == 0:
    raise DataFormatError(
        f"{name}, line 1: expected {_describe(fields, sep)} per line, found no "
        "interactions (the file is empty).")
  return columns


def _column_to_numbers(
    values: list[str], kind: str, field: str, name: str, line_numbers: list[int]
) -> np.ndarray:
  """Casts one CSV column; on failure names the line of the first bad value."""
  try:
    return _cast(np.array(values), kind)
  except (ValueError, OverflowError):
    pass
  convert = int if kind == "i" else float
  for value, number in zip(values, line_numbers, strict=True):
    try:
      if kind == "i" and not _INT64_MIN <= int(value) <= _INT64_MAX:
        raise ValueError("out of the int64 range")
      convert(value)
    except ValueError:
      what = "an int64 integer" if kind == "i" else "a number"
      raise DataFormatError(
          f"{name}, line {number}: expected {what} in column {field!r}, found "
          f"{_show(value)}") from None
  # Every value converts on its own: numpy's cast is stricter somewhere.
  return _cast(np.array([convert(v) for v in values]), kind)


# ----------------------------------------------------------------------------
# MovieLens.


def _read_movielens_files(
    path: str, variant: str | None
) -> tuple[str, dict[str, tuple[str, bytes]]]:
  """Finds one MovieLens variant's files in a folder, a zip or beside u.data/ratings.dat.

  Returns:
    (variant, {file name: (name for messages, contents)}) for the ratings file
    and whichever side files exist.
  """
  variants = [variant] if variant else list(RATINGS_FILE)
  wanted = " or ".join(RATINGS_FILE[v] for v in variants)
  if not os.path.exists(path):
    raise DataFormatError(
        f"{path}: no such file or folder; expected an extracted MovieLens folder "
        f"(with {wanted}) or the GroupLens zip. Get it with "
        f"sources.download_movielens or from {', '.join(MOVIELENS_URLS[v] for v in variants)}.")

  if os.path.isdir(path):
    for v in variants:
      # download_and_extract returns the folder that holds ml-100k/ or ml-1m/.
      for folder in (path, os.path.join(path, v)):
        if os.path.isfile(os.path.join(folder, RATINGS_FILE[v])):
          files = {}
          for file_name in (RATINGS_FILE[v], *_SIDE_FILES[v]):
            file_path = os.path.join(folder, file_name)
            if os.path.isfile(file_path):
              files[file_name] = (file_path, _read_bytes(file_path, file_name))
          return v, files
    raise DataFormatError(
        f"{path}: unknown format: a folder without {wanted} (looked in it and in "
        f"{' and '.join(v + '/' for v in variants)} below it).")

  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      members = [m for m in archive.namelist() if not m.endswith("/")]
      for v in variants:
        found = sorted((m for m in members if os.path.basename(m) == RATINGS_FILE[v]), key=len)
        if found:
          prefix = found[0][: -len(RATINGS_FILE[v])]
          files = {}
          for file_name in (RATINGS_FILE[v], *_SIDE_FILES[v]):
            if prefix + file_name in members:
              files[file_name] = (f"{path}/{prefix}{file_name}", archive.read(prefix + file_name))
          return v, files
    raise DataFormatError(f"{path}: unknown format: a zip without {wanted} in it.")

  # A ratings file given directly: its variant comes from its name (or the
  # caller), its side files from the same folder.
  base_name = os.path.basename(path)
  named = [v for v in variants if RATINGS_FILE[v] == base_name]
  if named or variant:
    v = named[0] if named else variant
    files = {RATINGS_FILE[v]: (path, _read_bytes(path, RATINGS_FILE[v]))}
    for file_name in _SIDE_FILES[v]:
      file_path = os.path.join(os.path.dirname(path), file_name)
      if os.path.isfile(file_path):
        files[file_name] = (file_path, _read_bytes(file_path, file_name))
    return v, files
  raise DataFormatError(
      f"{path}, line 1: unknown format: expected a MovieLens folder, the GroupLens "
      f"zip or a file named {wanted}.")


def _ml100k_genre_names(name: str, data: bytes) -> tuple[str, ...]:
  """u.genre: 'name|index' per line."""
  by_index = {}
  for number, line in enumerate(data.decode("latin-1").split("\n"), start=1):
    if not line.strip():
      continue
    fields = line.strip().split("|")
    if len(fields) != 2 or not fields[1].isdigit():
      raise DataFormatError(
          f"{name}, line {number}: expected 'genre name|flag index', found {_show(line)}")
    by_index[int(fields[1])] = fields[0]
  if sorted(by_index) != list(range(len(by_index))) or not by_index:
    raise DataFormatError(f"{name}, line 1: expected flag indices 0..n-1, found {sorted(by_index)}")
  return tuple(by_index[i] for i in range(len(by_index)))


def _ml100k_item_genres(
    name: str, data: bytes, genre_names: Sequence[str]
) -> dict[int, tuple[str, ...]]:
  """u.item: 'id|title|release|video release|url|<one 0/1 flag per genre>'."""
  genres = {}
  for number, line in enumerate(data.decode("latin-1").split("\n"), start=1):
    if not line.strip():
      continue
    fields = line.rstrip("\r").split("|")
    flags = fields[-len(genre_names) :]
    if (
        len(fields) < 5 + len(genre_names)
        or not fields[0].strip().isdigit()
        or any(flag not in ("0", "1") for flag in flags)
    ):
      raise DataFormatError(
          f"{name}, line {number}: expected 'id|title|release date|video release date|url' "
          f"and {len(genre_names)} 0/1 genre flags, all '|'-separated, found {_show(line)}")
    flagged = zip(genre_names, flags, strict=True)
    genres[int(fields[0])] = tuple(genre for genre, flag in flagged if flag == "1")
  return genres


def _ml1m_item_genres(name: str, data: bytes) -> dict[int, tuple[str, ...]]:
  """movies.dat: 'id::title::Genre1|Genre2'."""
  genres = {}
  for number, line in enumerate(data.decode("latin-1").split("\n"), start=1):
    if not line.strip():
      continue
    fields = line.rstrip("\r").split("::")
    if len(fields) < 3 or not fields[0].strip().isdigit():
      raise DataFormatError(
          f"{name}, line {number}: expected 'id::title::genre|genre', found {_show(line)}")
    genres[int(fields[0])] = tuple(g for g in fields[-1].split("|") if g)
  return genres


def read_movielens(path: str, variant: str | None = None) -> Interactions:
  """Reads MovieLens 100K or 1M from the extracted folder or the GroupLens zip.

  ML-100K: `u.data` ('user<TAB>item<TAB>rating<TAB>timestamp'); genres from
  `u.item` (19 0/1 flags, latin-1) named by `u.genre`. ML-1M: `ratings.dat`
  ('user::item::rating::timestamp'); genres from `movies.dat`
  ('id::title::A|B', latin-1). Side files are optional.

  Args:
    path: the extracted folder (or its parent), the zip (ml-100k.zip holds
      ml-100k/u.data, ml-1m.zip ml-1m/ratings.dat), or the ratings file itself.
    variant: 'ml-100k' or 'ml-1m'; None infers it from the files found.

  Returns:
    Interactions with ratings, timestamps and (when the side files exist)
    item genres.

  Raises:
    ValueError: an unknown variant.
    DataFormatError: missing or unrecognised files, or a malformed line.
  """
  if variant is not None and variant not in RATINGS_FILE:
    raise ValueError(f"variant must be None or one of {', '.join(RATINGS_FILE)}; got {variant!r}")
  variant, files = _read_movielens_files(path, variant)
  name, data = files[RATINGS_FILE[variant]]
  fields = ("user", "item", "rating", "timestamp")
  if variant == "ml-100k":
    user, item, rating, timestamp = _parse_table(data, name, fields, "iifi")
    genres = None
    if "u.item" in files:
      names = _ml100k_genre_names(*files["u.genre"]) if "u.genre" in files else _ML100K_GENRES
      genres = _ml100k_item_genres(*files["u.item"], names)
  else:
    user, item, rating, timestamp = _parse_table(data, name, fields, "iifi", sep=b"::")
    genres = _ml1m_item_genres(*files["movies.dat"]) if "movies.dat" in files else None
  return Interactions(user=user, item=item, timestamp=timestamp, rating=rating, item_genres=genres)


def download_movielens(variant: str, download_dir: str) -> str:
  """Downloads and extracts MovieLens from GroupLens (once; TFDS caches it).

  Files already put by hand at `<download_dir>/<variant>/` (extracted) or
  `<download_dir>/<variant>.zip` are used as they are.

  Args:
    variant: 'ml-100k' or 'ml-1m'.
    download_dir: where to download to (and where hand-placed files are looked for).

  Returns:
    A path for `read_movielens`: the extracted folder (or the hand-placed zip).

  Raises:
    ValueError: an unknown variant.
    DownloadError: the download failed; the message says where to put the
      files by hand.
  """
  if variant not in MOVIELENS_URLS:
    raise ValueError(f"variant must be one of {', '.join(MOVIELENS_URLS)}; got {variant!r}")
  url = MOVIELENS_URLS[variant]
  folder = os.path.join(download_dir, variant)
  zip_path = os.path.join(download_dir, f"{variant}.zip")
  if os.path.isfile(os.path.join(folder, RATINGS_FILE[variant])):
    return folder
  if os.path.isfile(zip_path):
    return zip_path
  try:
    extracted = os.fspath(
        tfds.download.DownloadManager(download_dir=download_dir).download_and_extract(url))
  except Exception as e:  # Network failures come as many types (TFDS, requests, OSError).
    raise DownloadError(
        f"Could not download MovieLens {variant} from {url}: {e!r}. Download it by hand and "
        f"either put the zip at {zip_path} or unzip it so that "
        f"{os.path.join(folder, RATINGS_FILE[variant])} exists, then set data.path to that "
        "folder or zip.") from e
  # The zips hold one folder named after the variant.
  inner = os.path.join(extracted, variant)
  return inner if os.path.isdir(inner) else extracted


# ----------------------------------------------------------------------------
# SASRec-style text and CSV/TSV logs.


def read_sasrec_text(path: str) -> Interactions:
  """Reads 'user item' lines (whitespace separated), already in chronological order.

  This is the layout of the SASRec paper's data files (e.g. ml-1m.txt).

  Args:
    path: the text file.

  Returns:
    Interactions whose timestamp is the row index (file order), no ratings.

  Raises:
    DataFormatError: a missing file, a line without exactly two integers, or
      no lines at all.
  """
  data = _read_bytes(path, "a text file of 'user item' lines")
  user, item = _parse_table(data, path, ("user", "item"), "ii")
  return Interactions(user=user, item=item, timestamp=np.arange(len(user), dtype=np.int64))


def read_csv(
    path: str,
    *,
    delimiter: str = ",",
    user_column: str = "user_id",
    item_column: str = "item_id",
    time_column: str = "timestamp",
    rating_column: str = "",
) -> Interactions:
  """Reads a CSV/TSV interaction log with a header row naming the columns.

  Ids and timestamps must be integers (convert dates to Unix time first);
  other columns are ignored. Quoted fields follow Python's `csv` rules.

  Args:
    path: the file (UTF-8).
    delimiter: the one-character field separator, e.g. ',' or '\\t'.
    user_column: header name of the user id column.
    item_column: header name of the item id column.
    time_column: header name of the timestamp column; '' = file order.
    rating_column: header name of the rating column; '' = no ratings.

  Returns:
    Interactions in file order.

  Raises:
    ValueError: a delimiter that is not one character, or an empty
      user_column/item_column.
    DataFormatError: a missing file, a named column missing from the header,
      a row with a different number of fields than the header, a non-numeric
      value, or no rows.
  """
  if len(delimiter) != 1:
    raise ValueError(f"delimiter must be one character, got {delimiter!r}")
  for argument, column in (("user_column", user_column), ("item_column", item_column)):
    if not column:
      raise ValueError(f"{argument} must name a column, got {column!r}")
  data = _read_bytes(path, f"a {delimiter!r}-separated file with a header row")
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise DataFormatError(
        f"{path}, line {line}: expected UTF-8 text, found {data[e.start:e.end]!r}") from None
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  header = [name.strip() for name in next(reader, [])]
  if not header:
    raise DataFormatError(
        f"{path}, line 1: expected a header row naming the columns, found an empty line.")

  # Interactions field -> (read_csv argument, header name); '' = not read.
  wanted = {
      "user": ("user_column", user_column),
      "item": ("item_column", item_column),
      "timestamp": ("time_column", time_column),
      "rating": ("rating_column", rating_column),
  }
  wanted = {key: (argument, column) for key, (argument, column) in wanted.items() if column}
  for argument, column in wanted.values():
    if column not in header:
      raise DataFormatError(
          f"{path}, line 1: no column {column!r} ({argument}) in the header; found "
          f"{header} with delimiter {delimiter!r}.")

  rows, line_numbers = [], []
  for row in reader:
    if not any(field.strip() for field in row):  # blank line
      continue
    if len(row) != len(header):
      raise DataFormatError(
          f"{path}, line {reader.line_num}: expected {len(header)} {delimiter!r}-separated "
          f"fields like the header, found {len(row)}: {_show(delimiter.join(row))}")
    rows.append(row)
    line_numbers.append(reader.line_num)
  if not rows:
    raise DataFormatError(f"{path}, line 2: expected rows after the header, found no interactions.")

  columns = {}
  for key, (_, column) in wanted.items():
    index = header.index(column)
    kind = "f" if key == "rating" else "i"
    values = [row[index] for row in rows]
    columns[key] = _column_to_numbers(values, kind, column, path, line_numbers)
  timestamp = columns.get("timestamp", np.arange(len(rows), dtype=np.int64))
  return Interactions(
      user=columns["user"], item=columns["item"], timestamp=timestamp, rating=columns.get("rating"))
