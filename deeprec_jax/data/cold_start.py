"""Cold-start split: a fraction of the items never reaches training.

``split(dataset, fraction, seed)`` withholds ``round(fraction * N)`` items
(chosen by ``seed``) from training: they are cut out of every training part
(``seq[:-2]``), and ``Dataset.withheld_items`` keeps them out of the sampled
negatives (``pipeline``). They still occur as validation and test targets, and
as inputs of test histories (the validation item), so a model meets them only
through side information such as their pictures. Evaluation reports
``cold/<metric>`` and ``warm/<metric>`` by the target's kind
(``evaluate.make_eval_step(cold_items=...)``).

A user whose training part would be left empty keeps only its warm held-out
items, as a training-only sequence (``preprocess.split_train``): a sequence of
two items would otherwise train on both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deeprec_jax.data import builders, preprocess
from deeprec_jax.models.item_embedding import ITEM_TABLE

_SALT = 0xC01D  # keeps the choice of items apart from the run's other draws


def cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
  """``int64[round(fraction * num_items)]``: the withheld item ids, ascending."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config key data.cold_start_fraction: expected a fraction in [0, 1), "
                     f"got {fraction!r}.")
  count = int(round(fraction * num_items))
  rng = np.random.default_rng([int(seed) % 2**32, _SALT])
  return np.sort(rng.choice(np.arange(1, num_items + 1), size=count, replace=False)
                 ).astype(np.int64)


def withhold(sequence: np.ndarray, is_cold: np.ndarray) -> np.ndarray:
  """One user's sequence without cold items in its training part (see the module doc)."""
  sequence = np.asarray(sequence, np.int64)
  if len(sequence) < preprocess.MIN_SEQUENCE_LENGTH:
    return sequence[~is_cold[sequence]]
  train, held_out = sequence[:-2], sequence[-2:]
  train = train[~is_cold[train]]
  if not len(train):
    return held_out[~is_cold[held_out]]
  return np.concatenate([train, held_out])


class _Withheld(Sequence):
  """A record source whose ``item_seq`` go through ``withhold``."""

  def __init__(self, source: Sequence[Mapping[str, Any]], is_cold: np.ndarray):
    self._source, self._is_cold = source, is_cold

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {**record, "item_seq": withhold(record["item_seq"], self._is_cold)}

  def __getitem__(self, index):
    return self._convert(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    getitems = getattr(self._source, "__getitems__", None)
    records = (getitems(indices) if getitems is not None
               else [self._source[i] for i in indices])
    return [self._convert(r) for r in records]


def split(dataset: builders.Dataset, fraction: float, seed: int, *,
          task: str = "autoregressive") -> builders.Dataset:
  """``dataset`` with ``cold_items(N, fraction, seed)`` withheld from training (0 = as is).

  ``task`` is the model's; window examples (Caser) draw their negatives
  elsewhere (``negatives.WindowTable``) and refuse a cold-start split.
  """
  cold = cold_items(dataset.num_items, fraction, seed)
  if not len(cold):
    return dataset
  if task == "window":
    raise ValueError("config key data.cold_start_fraction: the 'window' task (Caser) has no "
                     "cold-start split; use a sequence model.")
  is_cold = np.zeros(dataset.num_items + 1, bool)
  is_cold[cold] = True
  source = _Withheld(dataset.source, is_cold)
  lengths = np.array([len(r["item_seq"]) for r in source.__getitems__(range(len(source)))],
                     np.int64)
  return dataclasses.replace(dataset, source=source, lengths=lengths,
                             name=f"{dataset.name}+cold{fraction:g}", withheld_items=cold)


def zero_table_rows(params: Any, items: np.ndarray) -> Any:
  """``params`` with the id-table rows of ``items`` set to 0 (``'id+image'`` encoders).

  A withheld item's row never gets a gradient (it is neither an input, a
  target nor a negative in training), so its random initial row would only
  add noise to its picture's vector; zeroed, it stays zero.
  """
  table, param = ITEM_TABLE
  rows = params[table][param]
  return {**params, table: {**params[table], param: rows.at[np.asarray(items)].set(0.0)}}
