"""TFDS builders of per-user item sequences, and the `Dataset` the pipeline reads.

Raw files are parsed (``load_interactions`` picks the ``sources`` reader or the
``synthetic`` generator that ``config.data`` names) and preprocessed
(``preprocess``) once, then written as an array_record TFDS dataset: one record
per user with the full chronological sequence in remapped ids
``1..num_items``. Later runs open it as a random-access ``data_source`` without
touching the raw files, and without TensorFlow (TFDS needs TensorFlow only for
``as_dataset``/``tfds.load``).

Versioning: the builder config name is a readable prefix plus a hash of every
setting that changes the prepared sequences (source, absolute raw path, the raw
files' size and mtime, rating threshold, k-core minima, history cap, generator
or CSV options). Changing any of them selects a different directory, so a stale
dataset is never read; settings that only shape batches (``max_len``,
``data_dir``) are left out, so changing them reuses the cache.

Atomicity: TFDS writes into ``<config>/incomplete.<random>_<version>/`` and
renames it to ``<config>/<version>/`` only after every record and the metadata
are written; a failure removes the temporary folder. Readers only ever open
``<config>/<version>/``, so an interrupted or failed build is never picked up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from deeprec_jax.data import preprocess, sources, synthetic

DEFAULT_DATA_DIR = "~/.cache/deeprec_jax/tfds"
DATA_DIR_ENV = "DEEPREC_DATA_DIR"
# config.data keys that never change the prepared sequences: batch shapes, the
# cache root, item pictures (cached on their own, data/images.py) and the
# cold-start split (made when a run opens the dataset).
NOT_PREPROCESSING = ("max_len", "data_dir", "images", "cold_start_fraction")
# Option blocks of config.data that only one source reads.
SOURCE_OPTIONS = {"synthetic": "synthetic", "csv": "csv"}
# The values of config.data.name that `load_interactions` reads.
_DATASET_NAMES = ("synthetic", "ml-100k", "ml-1m", "sasrec_text", "csv")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Per-user sequences with random access, as the pipeline consumes them.

  Attributes:
    source: ``source[i] = {'user': i, 'item_seq': int64[n], 'time_seq':
      int64[n], ...}``, the full chronological sequence of user ``i`` in ids
      ``1..num_items`` and its timestamps (``preprocess.SequenceData``). A TFDS
      ``ArrayRecordDataSource`` after ``load``, a list after
      ``from_sequences``.
    num_users: number of users (``len(source)``).
    num_items: number of items; ids run ``1..num_items`` and 0 is padding.
    user_ids: int64 ``[num_users]``, the original id of each user.
    item_ids: int64 ``[num_items + 1]``, the original id of each item;
      ``item_ids[0] = -1`` stands for padding.
    name: where the data comes from (the TFDS ``name/config/version``).
    item_genres: bool ``[num_items + 1, len(genre_names)]`` multi-hot genres
      of each item (row 0 and items without side information all False), or
      None when the source has no genres (as in ``preprocess.SequenceData``).
    genre_names: the genre of each column of ``item_genres``; () if none.
    lengths: int64 ``[num_users]``, ``len(source[i]['item_seq'])``, so that
      the pipeline can index examples without reading every record; None
      means "read them from ``source``".
    stats: summary counts (users, items, interactions, lengths).
    withheld_items: int64 item ids kept out of training and of its negatives
      (``cold_start.split``), or None.
  """

  source: Sequence[Mapping[str, Any]]
  num_users: int
  num_items: int
  user_ids: np.ndarray
  item_ids: np.ndarray
  name: str
  item_genres: np.ndarray | None = None
  genre_names: tuple[str, ...] = ()
  lengths: np.ndarray | None = None
  stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  withheld_items: np.ndarray | None = None


def from_sequences(seq_data: preprocess.SequenceData, name: str = "in_memory") -> Dataset:
  """An in-memory `Dataset` over ``seq_data`` (for tests and tools).

  Args:
    seq_data: the output of ``preprocess.preprocess``.
    name: a label for logs.

  Returns:
    A `Dataset` whose ``source`` is a list of the same records ``load`` gives.
  """
  source = list(_records(seq_data))
  return Dataset(
      source=source,
      num_users=len(source),
      num_items=int(seq_data.num_items),
      user_ids=np.asarray(seq_data.user_ids, np.int64),
      item_ids=np.asarray(seq_data.item_ids, np.int64),
      name=name,
      item_genres=seq_data.item_genres,
      genre_names=tuple(seq_data.genre_names),
      lengths=np.array([len(s) for s in seq_data.sequences], np.int64),
      stats=_json_safe(seq_data.stats()),
  )


def resolve_data_dir(data_dir: str = "") -> str:
  """The TFDS cache root: ``data_dir``, else ``$DEEPREC_DATA_DIR``, else the default."""
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV, "") or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(data_dir))


def preprocessing_settings(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every ``config.data`` setting that changes the prepared sequences.

  Everything in ``config.data`` counts except ``NOT_PREPROCESSING`` and the
  option blocks of other sources, so a key added later is part of a dataset's
  identity by default: an unnecessary rebuild is cheap, a stale cache is not.

  Args:
    data_config: ``config.data``.

  Returns:
    A JSON-serialisable dict; for file sources ``path`` is absolute and
    ``fingerprint`` identifies the raw files' current content.
  """
  settings = data_config.to_dict()
  name = settings.get("name", "")
  for key in NOT_PREPROCESSING:
    settings.pop(key, None)
  for source, block in SOURCE_OPTIONS.items():
    if name != source:
      settings.pop(block, None)
  if name == "synthetic":
    settings.pop("path", None)  # The generator reads no file.
  else:
    path = settings.get("path", "")
    if not path:
      raise ValueError(f"config key data.path is empty; data.name={name!r} needs a raw file "
                       "or folder.")
    settings["path"] = os.path.abspath(os.path.expanduser(path))
    settings["fingerprint"] = fingerprint(settings["path"])
  return json.loads(json.dumps(settings, sort_keys=True, default=str))


def fingerprint(path: str) -> str:
  """A short hash of the size and mtime of ``path``, or of every file under it.

  Size and mtime (ns) catch every edit and re-download without reading the
  data, which matters for the larger MovieLens files.

  Args:
    path: a raw file or folder.

  Returns:
    16 hex digits.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"config key data.path={path!r}: no such file or folder.")
  entries = []
  if os.path.isdir(path):
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for file in sorted(files):
        full = os.path.join(root, file)
        stat = os.stat(full)
        entries.append(f"{os.path.relpath(full, path)}:{stat.st_size}:{stat.st_mtime_ns}")
  else:
    stat = os.stat(path)
    entries.append(f":{stat.st_size}:{stat.st_mtime_ns}")
  return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def load_interactions(data_config: ml_collections.ConfigDict) -> sources.Interactions:
  """Reads the raw interactions that `config.data` names.

  Args:
    data_config: the `config.data` block (see experiments/configs/default.py):
      `name` picks the reader, `path` the file or folder; `synthetic.*` and
      `csv.*` hold the generator's and the CSV reader's settings.

  Returns:
    The dataset's Interactions.

  Raises:
    ValueError: an unknown data.name, or no data.path where one is needed.
    sources.DataFormatError: missing or malformed files (for MovieLens, the
      message says where to put them and how to download them).
  """
  name, path = data_config.name, data_config.path
  if name == "synthetic":
    s = data_config.synthetic
    return synthetic.generate(
        num_users=s.num_users, num_items=s.num_items, num_clusters=s.num_clusters,
        mean_length=s.mean_length, seed=s.seed)
  if name not in _DATASET_NAMES:
    raise ValueError(f"data.name={name!r} is unknown; expected one of {', '.join(_DATASET_NAMES)}.")
  if name in sources.MOVIELENS_URLS:
    if not path or not os.path.exists(path):
      raise sources.DataFormatError(
          f"data.path={path!r}: no such file or folder for {name}. Point data.path at the "
          f"extracted folder (with {sources.RATINGS_FILE[name]}) or at {name}.zip from "
          f"{sources.MOVIELENS_URLS[name]}; sources.download_movielens({name!r}, download_dir) "
          "downloads it and returns that path.")
    return sources.read_movielens(path, name)
  if not path:
    raise ValueError(f"data.path must name the input file for data.name={name!r}, got ''.")
  if name == "sasrec_text":
    return sources.read_sasrec_text(path)
  c = data_config.csv
  return sources.read_csv(
      path, delimiter=c.delimiter, user_column=c.user_column, item_column=c.item_column,
      time_column=c.time_column, rating_column=c.rating_column)


@dataclasses.dataclass(eq=False, repr=False)
class SequenceConfig(tfds.core.BuilderConfig):
  """A builder config carrying every preprocessing setting.

  Attributes:
    source: ``config.data.name``.
    path: absolute raw file or folder ('' for synthetic).
    fingerprint: ``fingerprint(path)`` when the config was made.
    rating_threshold: implicit feedback keeps ratings >= this.
    min_user_interactions: k-core minimum per user.
    min_item_interactions: k-core minimum per item.
    max_history: most recent items kept per user (0 = all).
    settings: JSON of all of ``preprocessing_settings``, including the
      generator or CSV options.
  """

  source: str = ""
  path: str = ""
  fingerprint: str = ""
  rating_threshold: float = 0.0
  min_user_interactions: int = 0
  min_item_interactions: int = 0
  max_history: int = 0
  settings: str = "{}"

  def __repr__(self) -> str:
    # TFDS logs the config it is given; the settings are in the name's hash.
    return f"SequenceConfig({self.name})"


def builder_config(data_config: ml_collections.ConfigDict) -> SequenceConfig:
  """The `SequenceConfig` of ``config.data``; its name is a prefix + settings hash."""
  settings = preprocessing_settings(data_config)
  blob = json.dumps(settings, sort_keys=True)
  digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
  path = settings.get("path", "")
  stem = os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0] if path else "default"
  stem = re.sub(r"[^A-Za-z0-9_.]+", "_", stem).strip("_.")[:40] or "data"
  return SequenceConfig(
      name=f"{stem}-{digest}",
      description=blob,
      source=settings.get("name", ""),
      path=path,
      fingerprint=settings.get("fingerprint", ""),
      rating_threshold=float(settings.get("rating_threshold", 0.0)),
      min_user_interactions=int(settings.get("min_user_interactions", 0)),
      min_item_interactions=int(settings.get("min_item_interactions", 0)),
      max_history=int(settings.get("max_history", 0)),
      settings=blob,
  )


class SequenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes one record per user: ``user``, ``user_id``, ``item_seq``, ``time_seq``.

  One split, ``train``, holds every user: the leave-one-out split is the
  pipeline's job. Subclasses only name the source. Records keep user order
  (``disable_shuffling``) so that record ``i`` is user ``i``. Item ids, user
  ids, lengths, side information and stats go to ``metadata.json`` in the
  same folder, written and renamed together with the records.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Per-user chronological item sequences.",
                   "1.1.0": "Each record also holds its items' timestamps (time_seq)."}

  def __init__(self, *, data_config: ml_collections.ConfigDict, data_dir: str):
    self._data_config = data_config
    super().__init__(data_dir=data_dir, config=builder_config(data_config))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Per-user chronological item sequences ({self.name}).",
        features=tfds.features.FeaturesDict({
            "user": np.int64,
            "user_id": np.int64,
            "item_seq": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "time_seq": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Raw files are local; nothing is downloaded.
    config = self.builder_config
    interactions = load_interactions(self._data_config)
    seq_data = preprocess.preprocess(
        interactions,
        rating_threshold=config.rating_threshold,
        min_user_interactions=config.min_user_interactions,
        min_item_interactions=config.min_item_interactions,
        max_history=config.max_history,
        keep_short_users=bool(json.loads(config.settings).get("keep_short_users", False)),
        log=logging.info,
    )
    self.info.metadata.update(_metadata(seq_data, json.loads(config.settings)))
    return {"train": self._generate_examples(seq_data)}

  def _generate_examples(self, seq_data: preprocess.SequenceData):
    # Integer keys: with shuffling disabled TFDS writes in key order.
    yield from enumerate(_records(seq_data))


def _records(seq_data: preprocess.SequenceData) -> Iterator[dict[str, Any]]:
  """One record per user: ``user``, ``user_id``, ``item_seq`` and ``time_seq``."""
  times = seq_data.time_seqs
  if times is None:  # no timestamps kept: each sequence's own order
    times = [np.arange(len(seq), dtype=np.int64) for seq in seq_data.sequences]
  for i, (uid, seq, time_seq) in enumerate(zip(seq_data.user_ids, seq_data.sequences, times,
                                               strict=True)):
    yield {"user": i, "user_id": int(uid), "item_seq": np.asarray(seq, np.int64),
           "time_seq": np.asarray(time_seq, np.int64)}


class SyntheticSequences(SequenceBuilder, skip_registration=True):
  """Sequences from the embedded synthetic generator (``config.data.synthetic``)."""

  name = "deeprec_synthetic"


class Movielens100kSequences(SequenceBuilder, skip_registration=True):
  """Sequences from MovieLens 100K (folder or GroupLens zip)."""

  name = "deeprec_ml_100k"


class Movielens1mSequences(SequenceBuilder, skip_registration=True):
  """Sequences from MovieLens 1M (folder or GroupLens zip)."""

  name = "deeprec_ml_1m"


class SasrecTextSequences(SequenceBuilder, skip_registration=True):
  """Sequences from SASRec-style 'user item' text files."""

  name = "deeprec_sasrec_text"


class CsvSequences(SequenceBuilder, skip_registration=True):
  """Sequences from CSV/TSV interaction logs (``config.data.csv``)."""

  name = "deeprec_csv"


BUILDERS: dict[str, type[SequenceBuilder]] = {
    "synthetic": SyntheticSequences,
    "ml-100k": Movielens100kSequences,
    "ml-1m": Movielens1mSequences,
    "sasrec_text": SasrecTextSequences,
    "csv": CsvSequences,
}


def get_builder(data_config: ml_collections.ConfigDict) -> SequenceBuilder:
  """The builder of ``config.data`` over its cache directory (nothing is built)."""
  if data_config.name not in BUILDERS:
    raise ValueError(f"config key data.name={data_config.name!r}; expected one of "
                     f"{', '.join(BUILDERS)}.")
  return BUILDERS[data_config.name](data_config=data_config,
                                    data_dir=resolve_data_dir(data_config.get("data_dir", "")))


def load(data_config: ml_collections.ConfigDict) -> Dataset:
  """Builds ``config.data`` into the TFDS cache unless it is there, then opens it.

  Args:
    data_config: ``config.data`` (see experiments/configs/default.py).

  Returns:
    A `Dataset` backed by the array_record ``data_source``.

  Raises:
    sources.DataFormatError: the raw data cannot be parsed; nothing is cached.
  """
  builder = get_builder(data_config)
  if not _is_prepared(builder):
    logging.info("preparing %s in %s", builder.info.full_name, builder.data_dir)
    try:
      builder.download_and_prepare(file_format="array_record")
    except OSError:
      # Another process may have renamed the same dataset into place first.
      if not _is_prepared(get_builder(data_config)):
        raise
    # Re-open from disk so that a fresh build and a reuse read the same bytes.
    builder = get_builder(data_config)
  metadata = builder.info.metadata
  source = builder.as_data_source(split="train")
  dataset = Dataset(
      source=source,
      num_users=len(metadata["user_ids"]),
      num_items=int(metadata["num_items"]),
      user_ids=np.asarray(metadata["user_ids"], np.int64),
      item_ids=np.asarray(metadata["item_ids"], np.int64),
      name=builder.info.full_name,
      item_genres=_decode_genres(metadata["item_genres"], metadata["genre_names"]),
      genre_names=tuple(metadata["genre_names"]),
      lengths=np.asarray(metadata["lengths"], np.int64),
      stats=dict(metadata.get("stats", {})),
  )
  if len(source) != dataset.num_users:
    raise RuntimeError(f"{builder.data_dir} holds {len(source)} records but its metadata "
                       f"lists {dataset.num_users} users; delete the folder to rebuild it.")
  logging.info("dataset %s: %s", dataset.name, dataset.stats)
  return dataset


def _is_prepared(builder: SequenceBuilder) -> bool:
  """Whether the builder's version folder exists (it only appears complete)."""
  if not os.path.isdir(builder.data_dir):
    return False  # Checked first: TFDS warns about missing folders.
  if not builder.is_prepared():
    raise RuntimeError(f"{builder.data_dir} exists but is not a complete TFDS dataset (was it "
                       "edited by hand?); delete it to rebuild.")
  return True


def _metadata(seq_data: preprocess.SequenceData, settings: dict[str, Any]) -> dict[str, Any]:
  """What `load` needs besides the records, as JSON-serialisable values."""
  return {
      "num_items": int(seq_data.num_items),
      "user_ids": np.asarray(seq_data.user_ids, np.int64).tolist(),
      "item_ids": np.asarray(seq_data.item_ids, np.int64).tolist(),
      "lengths": [len(s) for s in seq_data.sequences],
      "item_genres": _encode_genres(seq_data.item_genres),
      "genre_names": list(seq_data.genre_names),
      "stats": _json_safe(seq_data.stats()),
      "settings": settings,
  }


def _encode_genres(item_genres: np.ndarray | None) -> list[list[int]] | None:
  """Multi-hot ``[num_items + 1, G]`` -> the genre columns of each item row."""
  if item_genres is None:
    return None
  return [np.flatnonzero(row).tolist() for row in np.asarray(item_genres)]


def _decode_genres(encoded: list[list[int]] | None,
                   genre_names: Sequence[str]) -> np.ndarray | None:
  if encoded is None:
    return None
  item_genres = np.zeros((len(encoded), len(genre_names)), bool)
  for row, columns in enumerate(encoded):
    item_genres[row, columns] = True
  return item_genres


def _json_safe(value: Any) -> Any:
  """numpy scalars and tuples -> plain JSON values."""
  return json.loads(json.dumps(value, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
