"""Item pictures: ``uint8[num_items + 1, S, S, 3]`` tables, row 0 = padding (zeros).

Three sources, picked by ``config.data.images.source``:

* ``'synthetic'``: a small procedural picture per item of the embedded
  dataset (``draw_synthetic``). The item's latent cluster (the one its
  sequences follow, ``synthetic.item_clusters``) fixes the shape and the
  colour; the item itself adds a position, size, colour and pixel jitter. All
  of it is a function of the generator's seed, so the pictures carry the
  signal the sequences follow, and only that.
* ``'files'``: ``config.data.images.path`` is a folder of image files named by
  the original item id (``42.png``, ``42.jpg``, ...) or a CSV manifest with
  the header ``item_id,path`` (relative paths start at the manifest's folder).
  Pictures are decoded with Pillow, converted to RGB and resized to S x S.
  Items without a picture get zeros and a ``missing`` flag; a file that
  cannot be decoded raises ``sources.DataFormatError`` naming it.
* ``'features'``: precomputed image features instead of pictures,
  ``float32[num_items + 1, F]`` (``read_features``), for features extracted
  elsewhere by a large pretrained network. ``config.data.images.path`` is an
  ``.npz`` with the arrays ``features [M, F]`` and ``item_ids [M]`` (original
  ids), or an ``.npy`` of ``features`` whose row order is the text file
  ``config.data.images.item_ids`` (one original id per line). The models
  project them to their width with a learned linear map (VBPR-style,
  ``image_cnn.ImageTower``). Items without features get zeros and the
  ``missing`` flag; ``data.images.size`` is not read.

``load(config.data, dataset)`` keeps the table beside the prepared dataset
(in its TFDS version folder) as ``item_images-<key>.npy``, the key hashing
every image setting (source, size, path and its fingerprint, the generator
settings), so a changed size or file set builds a new table.
"""

from __future__ import annotations

import colorsys
import csv
import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from deeprec_jax.data import builders, sources, synthetic

SOURCES = ("synthetic", "files", "features")
# File name extensions the folder source looks for, in this order.
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# Shapes of the synthetic pictures, one per cluster (cyclically).
SHAPES = ("disc", "square", "triangle", "ring", "cross")
_SALT = 0x1A6E  # keeps the picture draws apart from the sequence draws of the same seed
_PIXEL_NOISE = 12.0  # std of the per-pixel noise, in uint8 levels
_COLOUR_JITTER = 0.06  # per-item RGB jitter of the shape's colour, in [0, 1] units


@dataclasses.dataclass(frozen=True)
class ItemImages:
  """A picture table and which items had none.

  Attributes:
    images: ``uint8[num_items + 1, S, S, 3]`` (``float32[num_items + 1, F]``
      for the 'features' source); row 0 (padding) is zeros.
    missing: ``bool[num_items + 1]``, True for items without a picture (their
      row is zeros); row 0 is False.
  """

  images: np.ndarray
  missing: np.ndarray

  @property
  def num_missing(self) -> int:
    return int(self.missing.sum())


def draw_synthetic(clusters: np.ndarray, num_clusters: int, size: int, seed: int) -> np.ndarray:
  """Draws one ``size x size`` picture per item of the synthetic dataset.

  Args:
    clusters: ``int[n]``, the latent cluster of each item (``item_clusters``).
    num_clusters: how many clusters there are (fixes the colour palette).
    size: picture side S, >= 4.
    seed: the generator's seed.

  Returns:
    ``uint8[n, S, S, 3]``: cluster ``c`` draws shape ``SHAPES[c % 5]`` in hue
    ``c * 0.618 mod 1`` on a dark background; each item moves, scales and
    tints it a little, and adds pixel noise.
  """
  if size < 4:
    raise ValueError(f"config key data.images.size: expected an int >= 4, got {size}.")
  clusters = np.asarray(clusters, np.int64)
  n = len(clusters)
  rng = np.random.default_rng([int(seed) % 2**32, _SALT])
  centre = rng.uniform(-0.15, 0.15, size=(n, 2))
  radius = rng.uniform(0.45, 0.7, size=n)
  tint = rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=(n, 3))
  noise = rng.normal(0.0, _PIXEL_NOISE, size=(n, size, size, 3))

  palette = np.array([colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.85, 0.95)
                      for c in range(num_clusters)])
  grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
  dy = grid[None, :, None] - centre[:, 0, None, None]  # [n, S, 1]
  dx = grid[None, None, :] - centre[:, 1, None, None]  # [n, 1, S]
  r = radius[:, None, None]
  dist = np.sqrt(dx**2 + dy**2)
  masks = {
      "disc": dist < r,
      "square": np.maximum(np.abs(dx), np.abs(dy)) < 0.8 * r,
      "triangle": (dy < 0.7 * r) & (np.abs(dx) < 0.6 * (dy + 0.9 * r)),
      "ring": (dist < r) & (dist > 0.55 * r),
      "cross": ((np.abs(dx) < 0.3 * r) & (np.abs(dy) < r))
               | ((np.abs(dy) < 0.3 * r) & (np.abs(dx) < r)),
  }
  shape_of = clusters % len(SHAPES)
  mask = np.zeros((n, size, size), bool)
  for index, name in enumerate(SHAPES):
    rows = shape_of == index
    mask[rows] = np.broadcast_to(masks[name], (n, size, size))[rows]
  colour = np.clip(palette[clusters] + tint, 0.0, 1.0) * 255.0  # [n, 3]
  background = 30.0
  pictures = np.where(mask[..., None], colour[:, None, None, :], background) + noise
  return np.clip(np.rint(pictures), 0, 255).astype(np.uint8)


def synthetic_table(item_ids: np.ndarray, synthetic_config: ml_collections.ConfigDict,
                    size: int) -> ItemImages:
  """The synthetic pictures of a dataset's items (``item_ids``: original ids, [0] = -1)."""
  s = synthetic_config
  clusters = synthetic.item_clusters(s.num_items, s.num_clusters, s.seed)
  pictures = draw_synthetic(clusters, s.num_clusters, size, s.seed)
  item_ids = np.asarray(item_ids, np.int64)
  images = np.zeros((len(item_ids), size, size, 3), np.uint8)
  images[1:] = pictures[item_ids[1:] - 1]  # The generator's ids are 1..num_items.
  return ItemImages(images, np.zeros(len(item_ids), bool))


def read_files(item_ids: np.ndarray, path: str, size: int) -> ItemImages:
  """Pictures of ``item_ids`` (original ids, [0] = padding) from a folder or a manifest.

  Args:
    item_ids: ``int64[num_items + 1]``, ``Dataset.item_ids``.
    path: a folder of ``<item id><ext>`` files (``EXTENSIONS``), or a CSV
      file with the columns ``item_id`` and ``path``.
    size: side S the pictures are resized to.

  Returns:
    ``ItemImages``; items without a file are zeros and flagged ``missing``.

  Raises:
    sources.DataFormatError: no such folder or manifest, a malformed manifest,
      or a file that cannot be decoded (the message names it).
  """
  files = _manifest(path) if os.path.isfile(path) else _folder(path)
  item_ids = np.asarray(item_ids, np.int64)
  images = np.zeros((len(item_ids), size, size, 3), np.uint8)
  missing = np.zeros(len(item_ids), bool)
  for row in range(1, len(item_ids)):
    file = files.get(int(item_ids[row]))
    if file is None or not os.path.exists(file):
      missing[row] = True
      continue
    images[row] = decode(file, size)
  return ItemImages(images, missing)


def read_features(item_ids: np.ndarray, path: str, ids_path: str = "") -> ItemImages:
  """Precomputed features of ``item_ids`` (original ids, [0] = padding), one row each.

  Args:
    item_ids: ``int64[num_items + 1]``, ``Dataset.item_ids``.
    path: an ``.npz`` with ``features [M, F]`` and ``item_ids [M]``, or an
      ``.npy`` of ``features [M, F]``.
    ids_path: for an ``.npy``: a text file of the M original item ids, one
      per line, in the order of the rows.

  Returns:
    ``ItemImages`` whose ``images`` are ``float32[num_items + 1, F]``; items
    without a row (and row 0) are zeros, the items flagged ``missing``.

  Raises:
    sources.DataFormatError: a file that is absent or unreadable, features
      that are not a finite 2-D float array, ids that are not integers, a
      repeated id, or ids and rows of different counts (each names the file).
  """
  features, ids = _features_and_ids(path, ids_path)
  item_ids = np.asarray(item_ids, np.int64)
  row_of = {int(item): row for row, item in enumerate(ids)}
  table = np.zeros((len(item_ids), features.shape[1]), np.float32)
  missing = np.zeros(len(item_ids), bool)
  for row in range(1, len(item_ids)):
    source_row = row_of.get(int(item_ids[row]))
    if source_row is None:
      missing[row] = True
    else:
      table[row] = features[source_row]
  return ItemImages(table, missing)


def _features_and_ids(path: str, ids_path: str) -> tuple[np.ndarray, np.ndarray]:
  """``(features float32[M, F], ids int64[M])`` read and checked (``read_features``)."""
  arrays: dict[str, np.ndarray] = {}
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    else:
      arrays = {"features": np.load(path, allow_pickle=False)}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise sources.DataFormatError(f"{path}: cannot read the features ({error}).") from error
  if path.endswith(".npz"):
    absent = {"features", "item_ids"} - set(arrays)
    if absent:
      raise sources.DataFormatError(f"{path}: expected the arrays 'features' and 'item_ids'; "
                                    f"{sorted(absent)} absent (has {sorted(arrays)}).")
  elif not ids_path:
    raise sources.DataFormatError(f"{path}: an .npy of features needs its row order, the "
                                  "item-id file config key data.images.item_ids.")
  else:
    arrays["item_ids"] = _read_ids(ids_path)
  features, ids = arrays["features"], arrays["item_ids"]
  if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
    raise sources.DataFormatError(f"{path}: features must be a 2-D float array [items, F], got "
                                  f"{features.dtype}{list(features.shape)}.")
  if not np.isfinite(features).all():
    bad = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
    raise sources.DataFormatError(f"{path}: features row {bad} is not finite.")
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise sources.DataFormatError(f"{path}: item_ids must be a 1-D integer array, got "
                                  f"{ids.dtype}{list(ids.shape)}.")
  if len(ids) != len(features):
    raise sources.DataFormatError(f"{ids_path or path}: {len(ids)} item ids for "
                                  f"{len(features)} feature rows.")
  unique, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    raise sources.DataFormatError(f"{ids_path or path}: item id {int(unique[counts > 1][0])} "
                                  "appears more than once.")
  return features.astype(np.float32), ids.astype(np.int64)


def _read_ids(path: str) -> np.ndarray:
  """The original item ids of a text file, one per line (blank lines skipped)."""
  ids = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        ids.append(int(line))
      except ValueError as error:
        raise sources.DataFormatError(f"{path}, line {line_number}: item id {line.strip()!r} "
                                      "is not an integer.") from error
  return np.asarray(ids, np.int64)


def decode(file: str, size: int) -> np.ndarray:
  """``uint8[size, size, 3]``: ``file`` decoded by Pillow, as RGB, resized (bilinear)."""
  from PIL import Image  # Only the 'files' source needs Pillow.

  try:
    with Image.open(file) as image:
      rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
      return np.asarray(rgb, np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise sources.DataFormatError(f"{file}: cannot decode this image ({error}).") from error


def _folder(path: str) -> dict[int, str]:
  if not os.path.isdir(path):
    raise sources.DataFormatError(f"config key data.images.path={path!r}: no such folder or "
                                  "CSV manifest.")
  files: dict[int, str] = {}
  for name in sorted(os.listdir(path)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in EXTENSIONS or not stem.lstrip("-").isdigit():
      continue
    item = int(stem)
    # One file per item: the first extension in EXTENSIONS wins.
    if item not in files or (EXTENSIONS.index(ext.lower())
                             < EXTENSIONS.index(os.path.splitext(files[item])[1].lower())):
      files[item] = os.path.join(path, name)
  return files


def _manifest(path: str) -> dict[int, str]:
  root = os.path.dirname(os.path.abspath(path))
  files: dict[int, str] = {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {"item_id", "path"} <= set(reader.fieldnames):
      raise sources.DataFormatError(f"{path}: a manifest needs the header 'item_id,path', got "
                                    f"{reader.fieldnames}.")
    for line, record in enumerate(reader, start=2):
      try:
        item = int(record["item_id"])
      except (TypeError, ValueError) as error:
        raise sources.DataFormatError(f"{path}, line {line}: item_id {record['item_id']!r} is "
                                      "not an integer.") from error
      files[item] = os.path.join(root, record["path"] or "")
  return files


def settings(data_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every setting the picture table depends on (JSON-serialisable)."""
  images = data_config.images
  if images.source not in SOURCES:
    raise ValueError(f"config key data.images.source={images.source!r}; expected one of "
                     f"{', '.join(SOURCES)} (a model with model.item_encoder != 'id' needs "
                     "pictures).")
  if images.source != "features" and (not isinstance(images.size, int) or images.size < 4):
    raise ValueError(f"config key data.images.size: expected an int >= 4, got {images.size!r}.")
  result: dict[str, Any] = {"source": images.source}
  if images.source != "features":
    result["size"] = images.size
  if images.source == "synthetic":
    if data_config.name != "synthetic":
      raise ValueError("config key data.images.source='synthetic' draws pictures of the "
                       f"synthetic dataset only, not of data.name={data_config.name!r}.")
    result["synthetic"] = data_config.synthetic.to_dict()
  else:
    path = os.path.abspath(os.path.expanduser(images.path or ""))
    if not images.path or not os.path.exists(path):
      raise sources.DataFormatError(f"config key data.images.path={images.path!r}: no such "
                                    "folder or CSV manifest.")
    result.update(path=path, fingerprint=builders.fingerprint(path))
    ids_path = images.get("item_ids", "") if images.source == "features" else ""
    if ids_path:
      ids_path = os.path.abspath(os.path.expanduser(ids_path))
      if not os.path.isfile(ids_path):
        raise sources.DataFormatError(f"config key data.images.item_ids={images.item_ids!r}: "
                                      "no such file.")
      result.update(item_ids=ids_path, item_ids_fingerprint=builders.fingerprint(ids_path))
  return result


def build(data_config: ml_collections.ConfigDict, item_ids: np.ndarray) -> ItemImages:
  """The picture table of ``config.data`` for ``item_ids``, without any cache."""
  config = settings(data_config)
  if config["source"] == "synthetic":
    return synthetic_table(item_ids, data_config.synthetic, config["size"])
  if config["source"] == "features":
    return read_features(item_ids, config["path"], config.get("item_ids", ""))
  return read_files(item_ids, config["path"], config["size"])


def load(data_config: ml_collections.ConfigDict, dataset: builders.Dataset) -> ItemImages:
  """``build``, cached as .npy in the prepared dataset's folder (keyed by ``settings``).

  Args:
    data_config: ``config.data``; ``dataset`` must be ``builders.load`` of it.
    dataset: the prepared dataset (its ``item_ids`` order the rows).

  Returns:
    ``ItemImages`` with ``num_items + 1`` rows.
  """
  config = settings(data_config)
  blob = json.dumps(config, sort_keys=True, default=str)
  prefix = f"{config['size']}px" if "size" in config else config["source"]
  key = f"{prefix}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
  folder = builders.get_builder(data_config).data_dir
  image_file = os.path.join(folder, f"item_images-{key}.npy")
  missing_file = os.path.join(folder, f"item_images-{key}-missing.npy")
  if os.path.exists(image_file) and os.path.exists(missing_file):
    table = ItemImages(np.load(image_file), np.load(missing_file))
    if len(table.images) == dataset.num_items + 1:
      return table
  table = build(data_config, dataset.item_ids)
  # Missing file first: the picture file is the one a reader looks for.
  _save_atomic(missing_file, table.missing)
  _save_atomic(image_file, table.images)
  return table


def _save_atomic(file: str, array: np.ndarray) -> None:
  """``np.save`` to a temporary file in the same folder, then rename it into place."""
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(file), suffix=".npy.tmp")
  try:
    with os.fdopen(handle, "wb") as f:
      np.save(f, array)
    os.replace(temporary, file)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def for_model(config: ml_collections.ConfigDict, dataset: builders.Dataset
              ) -> np.ndarray | None:
  """The pictures ``uint8[N + 1, S, S, 3]`` (or features ``float32[N + 1, F]``) a run's
  model reads, or None ('id' encoder)."""
  if config.model.get("item_encoder", "id") == "id":
    return None
  table = load(config.data, dataset)
  if table.num_missing:
    logging.warning("%d of %d items have no %s (zeros).", table.num_missing,
                    dataset.num_items,
                    "features" if config.data.images.source == "features" else "picture")
  return table.images
