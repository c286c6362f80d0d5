"""Loads an exported recommender and answers top-K queries in original ids.

This module imports only ``jax`` and ``numpy`` (and the standard library and
the numpy-only ``deeprec_jax.inputs``): it needs neither the dataset cache,
nor the training config, nor the Flax model code. An artifact directory
(written by ``exporter.export_trained``) holds:

* ``function.jax_export``: the serialized ``jax.export.Exported`` of
  ``f(params, item_seq, exclude, user) -> (items, scores)``, with
  ``params: {path: array}``, ``item_seq: int32[b, max_len]``,
  ``exclude: int32[b, h]`` (0-padded), ``user: int32[b]`` and the outputs
  ``int32[b, top_k]`` (model ids) and ``float32[b, top_k]``, best first
  (``b`` and ``h`` are symbolic); for image item encoders (format 2) one
  more argument, ``item_vectors: float32[num_items + 1, dim]``;
* ``params.npz``: the parameters, one entry per ``/``-joined path;
* ``item_vectors.npy`` (format 2, image item encoders only): the catalogue's
  item vectors, computed once at export (``models.item_vectors`` over the
  run's pictures), which the function scores against instead of running the
  image tower per request;
* ``item_ids.npy``: ``int64[num_items + 1]``, the original id of each model id
  (entry 0, padding, is -1); ``user_ids.npy``: ``int64[num_users]``;
* ``config.json`` (the run's config, for the record) and ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from deeprec_jax import inputs

# Format 1: f(params, item_seq, exclude, user). Format 2 adds the catalogue's
# precomputed item vectors (image item encoders): a file and a fifth argument.
# The exporter writes 1 whenever it can, so that format-1 loaders keep reading
# id-table artifacts; this loader reads both.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
FUNCTION = "function.jax_export"
PARAMS = "params.npz"
ITEM_VECTORS = "item_vectors.npy"
ITEM_IDS = "item_ids.npy"
USER_IDS = "user_ids.npy"
CONFIG = "config.json"
# The exclusion width is padded to MIN_EXCLUDE_WIDTH * 4**j: few shapes to
# compile (3 for ML-1M's longest history, 2,314), and the scatter of a wider
# list costs next to nothing beside the model.
MIN_EXCLUDE_WIDTH = 256
DEFAULT_MAX_BATCH = 512


class UnknownIdError(ValueError):
  """Ids that the artifact does not know, by history.

  Attributes:
    items: ``{history index: [unknown original item ids]}``.
    users: unknown original user ids.
  """

  def __init__(self, items: Mapping[int, list[int]], users: Sequence[int] = ()):
    self.items = dict(items)
    self.users = list(users)
    parts = []
    if self.items:
      shown = "; ".join(f"history {index}: {ids[:10]}{' ...' if len(ids) > 10 else ''}"
                        for index, ids in list(self.items.items())[:10])
      parts.append(f"item ids not in the artifact's catalogue ({shown})")
    if self.users:
      parts.append(f"user ids not in the artifact: {self.users[:10]}")
    super().__init__("; ".join(parts) or "unknown ids")


@dataclasses.dataclass(frozen=True)
class Row:
  """One encoded query: what the exported function takes for one history.

  Attributes:
    item_seq: ``int32[max_len]`` model input (``model_input``).
    exclude: ``int32[h]`` model ids never to recommend (empty: none).
    user: the model's user index (0 for models without user ids).
  """

  item_seq: np.ndarray
  exclude: np.ndarray
  user: int = 0


# The model input for one history: the rule of evaluation batches, shared
# (numpy only) with ``deeprec_jax.data.pipeline.eval_input``.
model_input = inputs.eval_input


def bucket(n: int, cap: int | None = None) -> int:
  """The next power of two ``>= n`` (at least 1), at most ``cap``: the padded batch."""
  size = 1 << max(int(n) - 1, 0).bit_length()
  return size if cap is None else min(size, cap)


def exclude_width(n: int) -> int:
  """The padded exclusion width for ``n`` items: ``MIN_EXCLUDE_WIDTH * 4**j >= n``."""
  width = MIN_EXCLUDE_WIDTH
  while width < n:
    width *= 4
  return width


def _as_ids(values: Any, what: str) -> np.ndarray:
  """``int64[n]`` from a sequence of integers (not booleans); ValueError otherwise."""
  ids = []
  try:
    for value in values:
      if isinstance(value, (bool, np.bool_)):
        raise TypeError("a boolean is not an id")
      ids.append(operator.index(value))
    return np.asarray(ids, np.int64)
  except (TypeError, OverflowError) as e:
    raise ValueError(f"{what}: expected a list of integer ids, got {values!r:.200}") from e


class _IdMap:
  """Original ids -> indices, vectorized (``searchsorted`` over the sorted ids)."""

  def __init__(self, original: np.ndarray, first: int):
    original = np.asarray(original, np.int64)[first:]
    order = np.argsort(original, kind="stable")
    self._sorted = original[order]
    self._index = (order + first).astype(np.int64)

  def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, known)``; indices are meaningless where ``known`` is False."""
    if not len(self._sorted):
      return np.zeros_like(ids), np.zeros(ids.shape, bool)
    pos = np.clip(np.searchsorted(self._sorted, ids), 0, len(self._sorted) - 1)
    known = self._sorted[pos] == ids
    return self._index[pos], known


class Artifact:
  """An exported recommender, ready to answer queries (``load`` builds one).

  Attributes:
    directory: where the artifact was loaded from.
    manifest: the artifact's ``manifest.json``.
    exported: the deserialized ``jax.export.Exported``.
    item_ids: ``int64[num_items + 1]``, the original id of each model id.
    user_ids: ``int64[num_users]``, the original id of each user index.
    max_batch: rows per call of the compiled function; bigger requests are
      split, smaller ones padded to the next power of two.
    shapes_run: the ``(batch, exclusion width)`` shapes called so far (each
      compiled once).
  """

  def __init__(self, directory: str, *, max_batch: int = DEFAULT_MAX_BATCH):
    self.directory = directory
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
      self.manifest: dict[str, Any] = json.load(f)
    version = self.manifest.get("format_version")
    if version not in READABLE_FORMATS:
      raise ValueError(f"{directory}: artifact format {version!r}; this loader reads "
                       f"formats {', '.join(map(str, READABLE_FORMATS))}.")
    if max_batch < 1:
      raise ValueError(f"max_batch={max_batch}: expected a positive integer.")
    self.max_batch = int(max_batch)
    with open(os.path.join(directory, FUNCTION), "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    backend = jax.default_backend()
    # jax names the CUDA/ROCm backend 'gpu'; lowering names them 'cuda', 'rocm'.
    names = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
    if not set(names) & set(self.exported.platforms):
      raise ValueError(f"{directory}: exported for {', '.join(self.exported.platforms)}; "
                       f"this process runs on {backend!r}. Export again on (or for) it.")
    with np.load(os.path.join(directory, PARAMS)) as stored:
      self._params = jax.device_put({name: stored[name] for name in stored.files})
    # Format 2, image item encoders: the vectors every score is against.
    vectors_file = self.manifest.get("files", {}).get("item_vectors") if version >= 2 else None
    self._vectors: tuple[Any, ...] = ()
    if vectors_file:
      vectors = np.load(os.path.join(directory, vectors_file))
      if vectors.ndim != 2 or len(vectors) != self.num_items + 1:
        raise ValueError(f"{directory}: {vectors_file} has shape {vectors.shape}; expected "
                         f"[num_items + 1 = {self.num_items + 1}, dim].")
      self._vectors = (jax.device_put(vectors),)
    self.item_ids = np.load(os.path.join(directory, ITEM_IDS))
    self.user_ids = np.load(os.path.join(directory, USER_IDS))
    if len(self.item_ids) != self.num_items + 1:
      raise ValueError(f"{directory}: {ITEM_IDS} has {len(self.item_ids)} rows; the manifest "
                       f"says num_items={self.num_items} (+1 for padding).")
    self._items = _IdMap(self.item_ids, first=1)
    self._users = _IdMap(self.user_ids, first=0)
    self._call = jax.jit(self.exported.call)
    self.shapes_run: set[tuple[int, int]] = set()

  @property
  def model(self) -> str:
    return self.manifest["model"]

  @property
  def task(self) -> str:
    return self.manifest["task"]

  @property
  def max_len(self) -> int:
    return int(self.manifest["max_len"])

  @property
  def top_k(self) -> int:
    """The largest ``k`` a query may ask for (fixed at export)."""
    return int(self.manifest["top_k"])

  @property
  def num_items(self) -> int:
    return int(self.manifest["num_items"])

  @property
  def needs_user(self) -> bool:
    """Whether queries must name a user (Caser)."""
    return bool(self.manifest["needs_user"])

  @property
  def item_encoder(self) -> str:
    """'id' (scores against the item table), 'image' or 'id+image' (precomputed vectors)."""
    return self.manifest.get("item_encoder", "id")

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def encode(self, histories: Sequence[Sequence[int]], *, users: Sequence[int] | None = None,
             exclude_seen: bool = True) -> list[Row]:
    """Maps original ids to model inputs, one ``Row`` per history.

    Args:
      histories: original item ids, oldest first, one list per query. Only
        the most recent ``max_len`` items (``max_len - 1`` for BERT4Rec) feed
        the model; every item of the history is excluded.
      users: original user ids, one per history; required when
        ``needs_user`` (Caser), ignored otherwise.
      exclude_seen: leave the history's items out of the recommendations.

    Returns:
      One ``Row`` per history.

    Raises:
      UnknownIdError: naming every unknown item (by history) and user id.
      ValueError: for ids that are not integers, an empty history (allowed
        only for models with user ids), or missing or mismatched ``users``.
    """
    if self.needs_user:
      if users is None:
        raise ValueError(f"model {self.model!r} needs a user id per history (users=).")
      users = _as_ids(users, "users")
      if len(users) != len(histories):
        raise ValueError(f"got {len(users)} user ids for {len(histories)} histories.")
    encoded, unknown_items = [], {}
    for index, history in enumerate(histories):
      ids = _as_ids(history, f"history {index}")
      if not len(ids) and not self.needs_user:
        raise ValueError(f"history {index} is empty: give at least one item.")
      model_ids, known = self._items.lookup(ids)
      if not known.all():
        unknown_items[index] = [int(i) for i in dict.fromkeys(ids[~known].tolist())]
      encoded.append(model_ids)
    user_index = np.zeros((len(histories),), np.int64)
    unknown_users: list[int] = []
    if self.needs_user:
      user_index, known = self._users.lookup(users)
      unknown_users = [int(u) for u in dict.fromkeys(users[~known].tolist())]
    if unknown_items or unknown_users:
      raise UnknownIdError(unknown_items, unknown_users)
    empty = np.zeros((0,), np.int32)
    return [Row(model_input(ids, task=self.task, max_len=self.max_len, num_items=self.num_items),
                ids.astype(np.int32) if exclude_seen else empty, int(user))
            for ids, user in zip(encoded, user_index, strict=True)]

  def score(self, rows: Sequence[Row], k: int, *,
            max_batch: int | None = None) -> list[list[tuple[int, float]]]:
    """The ``k`` best items of each row, as ``(original item id, score)``, best first.

    Rows go to the compiled function ``max_batch`` (default ``self.max_batch``)
    at a time, the batch padded to a power of two (``bucket``, repeating the
    first row) and the exclusion list to ``exclude_width``, so few shapes are
    ever compiled. Fewer than ``k`` pairs come back when fewer than
    ``k`` items remain.
    """
    self._check_k(k)
    limit = min(max_batch or self.max_batch, self.max_batch)
    results: list[list[tuple[int, float]]] = []
    for start in range(0, len(rows), limit):
      chunk = rows[start:start + limit]
      size = bucket(len(chunk), limit)
      width = exclude_width(max(len(row.exclude) for row in chunk))
      item_seq = np.zeros((size, self.max_len), np.int32)
      exclude = np.zeros((size, width), np.int32)
      user = np.zeros((size,), np.int32)
      for i, row in enumerate(chunk):
        item_seq[i], user[i] = row.item_seq, row.user
        exclude[i, :len(row.exclude)] = row.exclude
      item_seq[len(chunk):] = item_seq[0]  # Padding rows: a real input, results dropped.
      self.shapes_run.add((size, width))
      items, scores = jax.device_get(self._call(self._params, item_seq, exclude, user,
                                                *self._vectors))
      originals = self.item_ids[items[:len(chunk), :k]]
      for row_items, row_scores in zip(originals, scores[:len(chunk), :k], strict=True):
        finite = np.isfinite(row_scores)
        results.append(list(zip(row_items[finite].tolist(), row_scores[finite].tolist(),
                                strict=True)))
    return results

  def recommend(self, histories: Sequence[Sequence[int]], k: int = 10, *,
                users: Sequence[int] | None = None,
                exclude_seen: bool = True) -> list[list[tuple[int, float]]]:
    """The ``k`` best items after each history, in original ids.

    Args:
      histories: original item ids, oldest first, one list per query.
      k: how many items per history, ``1 <= k <= top_k``.
      users: original user ids, one per history (required by Caser).
      exclude_seen: leave the history's items out of the recommendations.

    Returns:
      One list of up to ``k`` ``(original item id, score)`` pairs per history,
      best first (the same pairs as ``deeprec_jax.recommend.recommend``).

    Raises:
      UnknownIdError: for item or user ids the artifact does not know (none
        are dropped silently).
      ValueError: for a bad ``k`` or malformed input.
    """
    self._check_k(k)
    return self.score(self.encode(histories, users=users, exclude_seen=exclude_seen), k)

  def warm_up(self, max_batch: int | None = None, longest_history: int | None = None) -> int:
    """Compiles every shape that queries up to these sizes need; returns how many.

    Args:
      max_batch: the largest batch (default ``self.max_batch``): every power
        of two up to it, and it.
      longest_history: the longest history to expect (default the manifest's
        ``longest_history``, the dataset's longest): every exclusion width
        up to ``exclude_width`` of it.
    """
    limit = min(max_batch or self.max_batch, self.max_batch)
    longest = longest_history or self.manifest.get("longest_history") or 1
    sizes = sorted({bucket(n, limit) for n in range(1, limit + 1)})
    widths = [MIN_EXCLUDE_WIDTH]
    while widths[-1] < longest:
      widths.append(widths[-1] * 4)
    for width in widths:
      row = Row(np.ones((self.max_len,), np.int32), np.ones((width,), np.int32), 0)
      for size in sizes:
        self.score([row] * size, 1, max_batch=limit)
    return len(sizes) * len(widths)

  def _check_k(self, k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.top_k:
      raise ValueError(f"k={k!r}: expected an integer in [1, {self.top_k}] (the artifact's "
                       "top_k).")


def load(directory: str, *, max_batch: int = DEFAULT_MAX_BATCH) -> Artifact:
  """Loads the artifact in ``directory`` (written by ``experiments.export``)."""
  return Artifact(directory, max_batch=max_batch)
