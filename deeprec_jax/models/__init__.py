"""Model zoo: one module per model, chosen by name from the config.

Every module in this package defines:
  * ``Model``: a flax linen Module mapping ``item_seq int32[batch, seq_len]``
    (0 = padding, left-padded) to hidden states ``[batch, seq_len, dim]``
    (or ``[batch, dim]`` for window models); its item embedding submodule is
    named ``item_embed`` so that scores are ``hidden @ item_table.T``.
  * ``TASK``: which training examples it learns from, one of
    ``'autoregressive'`` (targets are the next items), ``'window'`` (Caser: L
    previous items -> T next items) or ``'masked'`` (BERT4Rec cloze).
"""

import importlib
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import ml_collections

MODEL_NAMES = ("popularity", "caser", "rnn", "sasrec", "bert4rec")


def get_module(name: str) -> ModuleType:
  """Returns the module ``deeprec_jax.models.<name>``."""
  if name not in MODEL_NAMES:
    raise ValueError(f"config key model.name: unknown model {name!r}; expected one of "
                     f"{', '.join(MODEL_NAMES)}.")
  return importlib.import_module(f"deeprec_jax.models.{name}")


def create_model(model_config: ml_collections.ConfigDict, *, num_items: int, num_users: int,
                 max_len: int) -> nn.Module:
  """Builds ``Model`` from ``config.model`` (every key but ``name`` is a field)."""
  kwargs: dict[str, Any] = dict(model_config)
  module = get_module(kwargs.pop("name"))
  return module.Model(num_items=num_items, num_users=num_users, max_len=max_len, **kwargs)


def task(name: str) -> str:
  """Returns the training task of model ``name``."""
  return get_module(name).TASK


def item_table(params: Any, num_items: int) -> jax.Array:
  """The shared item embedding, rows 0..num_items: ``[num_items + 1, dim]``.

  Row 0 is padding and must be masked out by whoever ranks; extra rows after
  ``num_items`` (BERT4Rec's mask token) are dropped.
  """
  return params["item_embed"]["embedding"][: num_items + 1]
