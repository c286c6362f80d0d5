"""Field checks shared by every model, and the one table of compute dtypes.

Every error names the config key (``model.<field>``, ``task.<field>``) and
says what was expected, so a bad override fails at ``create_model`` with a
message the user can act on, not at the first trace.
"""

import numbers
from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np

# Attention forms of the self-attention models (encoder.SelfAttentionBlock).
ATTENTION_KINDS = ("dot_product", "additive")
# SASRec's block (LN on the query, normalized residuals) or a textbook pre-LN one.
BLOCK_ARRANGEMENTS = ("sasrec", "pre_ln", "post_ln")
# model.positions_from: which end of a sequence gets positional row 0 / max_len - 1.
POSITION_ORIGINS = ("end", "start")
# model.qkv_init: Q/K/V kernels like the other kernels, or as nn.MultiheadAttention.
QKV_INITS = ("same", "torch_mha")
ATTENTION_IMPLEMENTATIONS = ("xla", "pallas")  # layers (XLA) or pallas_attention kernels
# Names accepted by ``config.model.dtype``; parameters always stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def is_int(value: Any) -> bool:
  """True for Python and NumPy ints (dataset sizes often are np.int64), not bools."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """True for Python and NumPy real numbers, not bools."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check(ok: bool, key: str, expected: str, value: Any) -> None:
  """Raises ``ValueError('config key <key>: expected <expected>; got <value>')`` unless ok."""
  if not ok:
    raise ValueError(f"config key {key}: expected {expected}; got {value!r}.")


def compute_dtype(name: str, key: str = "model.dtype") -> Any:
  """Maps a dtype name ('float32' | 'bfloat16') to its jnp dtype."""
  check(name in COMPUTE_DTYPES, key, f"one of {', '.join(COMPUTE_DTYPES)}", name)
  return COMPUTE_DTYPES[name]


def check_sizes(model: Any, *, needs_users: bool = False) -> None:
  """Checks the fields every model gets from the data: num_items, num_users, max_len."""
  # num_items and num_users come from the dataset, max_len from data.max_len.
  check(is_int(model.num_items) and model.num_items >= 1, "model.num_items (from the dataset)",
        "an int >= 1", model.num_items)
  low = 1 if needs_users else 0
  check(is_int(model.num_users) and model.num_users >= low, "model.num_users (from the dataset)",
        f"an int >= {low}" + (" (this model embeds users)" if needs_users else ""),
        model.num_users)
  check(is_int(model.max_len) and model.max_len >= 1, "data.max_len", "an int >= 1",
        model.max_len)


def check_int(model: Any, field: str, low: int) -> None:
  value = getattr(model, field)
  check(is_int(value) and value >= low, f"model.{field}", f"an int >= {low}", value)


def check_fraction(model: Any, field: str) -> None:
  """A rate in ``[0, 1)`` (dropout)."""
  value = getattr(model, field)
  check(is_real(value) and 0.0 <= value < 1.0, f"model.{field}", "a float in [0, 1)", value)


def check_choice(model: Any, field: str, choices: Iterable[str]) -> None:
  value, choices = getattr(model, field), tuple(choices)
  check(value in choices, f"model.{field}", f"one of {', '.join(choices)}", value)


def check_bool(model: Any, field: str) -> None:
  value = getattr(model, field)
  check(isinstance(value, (bool, np.bool_)), f"model.{field}", "True or False", value)


def validate_fields(model: Any, rules: dict[str, Callable[[Any, str], None]]) -> None:
  """Applies ``rules[field](model, field)`` to each field, in order."""
  for field, rule in rules.items():
    rule(model, field)


def check_attention_encoder(model: Any) -> None:
  """Checks the fields of a self-attention encoder (SASRec, BERT4Rec)."""
  check_sizes(model)
  validate_fields(model, {"dim": lambda m, f: check_int(m, f, 1),
                          "num_blocks": lambda m, f: check_int(m, f, 0),
                          "ffn_dim": lambda m, f: check_int(m, f, 0)})
  check(is_int(model.num_heads) and model.num_heads >= 1 and model.dim % model.num_heads == 0,
        "model.num_heads", f"a positive int dividing model.dim={model.dim}", model.num_heads)
  check_fraction(model, "dropout_rate")
  check_choice(model, "attention", ATTENTION_KINDS)
  check_choice(model, "attention_impl", ATTENTION_IMPLEMENTATIONS)
  check_choice(model, "block", BLOCK_ARRANGEMENTS)
  check_choice(model, "positions_from", POSITION_ORIGINS)
  check_choice(model, "qkv_init", QKV_INITS)
  check_bool(model, "l2_norm")
  check_bool(model, "output_table")
  check(not (model.output_table and getattr(model, "item_encoder", "id") != "id"),
        "model.output_table", "False with model.item_encoder != 'id' (pictures give the "
        "scored vectors)", model.output_table)
  check(is_real(model.init_std) and model.init_std >= 0, "model.init_std",
        "a float >= 0 (0 = the model's own initializer)", model.init_std)
  check_bool(model, "positional")
  compute_dtype(model.dtype)


def validate_task(task_config: Any) -> None:
  """Checks ``config.task``: the pipeline's task settings.

  Args:
    task_config: a ConfigDict (or mapping) with ``mask_prob`` and ``num_targets``.
  """
  mask_prob, num_targets = task_config["mask_prob"], task_config["num_targets"]
  check(is_real(mask_prob) and 0.0 < mask_prob < 1.0, "task.mask_prob", "a float in (0, 1)",
        mask_prob)
  check(is_int(num_targets) and num_targets >= 1, "task.num_targets", "an int >= 1",
        num_targets)
