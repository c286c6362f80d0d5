"""Whole full-ranking evaluation passes of SASRec over every ML-1M user.

The library evaluates users grouped by history length (``pipeline.eval_lengths``:
``config.eval.length_buckets`` input lengths, L, L/2, L/4, ...), and its models
run the last block at the last position only (``last_only``, used by
``evaluate.score_items``). Both are exact: outputs at the last position do not
depend on left padding, and no other position is read.

``eval_setups`` builds the passes to time on synthetic ML-1M-shaped histories
(``benchmarks.inputs``): ``library`` (grouped as the pipeline groups them) and
``one_length`` (every user at L = 200, as with ``--config.eval.length_buckets=1``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from benchmarks import inputs, kernels
from deeprec_jax import evaluate, models
from deeprec_jax.data import pipeline


def grouped_batches(batch: dict[str, np.ndarray], input_lengths: np.ndarray, batch_size: int,
                    lengths: tuple[int, ...]) -> list[dict[str, Any]]:
  """Users grouped by the shortest of ``lengths`` that holds their input, as the pipeline does.

  Args:
    batch: one eval batch with a row per user (all users), ``item_seq [U, L]``.
    input_lengths: ``int[U]``, each user's number of non-padding input items.
    batch_size: rows per batch; each group's last batch is padded with
      ``weight = 0`` rows.
    lengths: increasing input lengths, the last one ``>= max(input_lengths)``.

  Returns:
    Device-resident batches, one compiled shape per length.
  """
  group_of = np.searchsorted(np.asarray(lengths), input_lengths)
  out = []
  for group, seq_len in enumerate(lengths):
    users = np.flatnonzero(group_of == group)
    for start in range(0, len(users), batch_size):
      rows = users[start:start + batch_size]
      pad = batch_size - len(rows)
      chunk = {k: np.concatenate([v[rows], np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      chunk["item_seq"] = np.ascontiguousarray(chunk["item_seq"][:, -seq_len:])
      chunk["weight"] = (np.arange(batch_size) < len(rows)).astype(np.float32)
      out.append(jax.device_put(chunk))
  return out


def eval_setups(batch_size: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """The evaluation passes to time, over every ML-1M user (synthetic histories).

  Returns:
    ``({name: {'step', 'batches', 'note'}}, meta)`` where ``meta`` holds the
    ``params`` and ``users_per_length``.
  """
  config = kernels.ml1m_config("sasrec")
  max_len = config.data.max_len
  model = models.create_model(config.model, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS, max_len=max_len)
  everyone = inputs.eval_batch(batch=inputs.ML1M_USERS, max_len=max_len,
                               num_items=inputs.ML1M_ITEMS, num_users=inputs.ML1M_USERS,
                               exclude_width=kernels.EVAL_EXCLUDE_WIDTH,
                               num_sampled_negatives=config.eval.num_sampled_negatives)
  input_lengths = (everyone["item_seq"] > 0).sum(axis=1)
  params = jax.device_put(model.init(jax.random.PRNGKey(0), everyone["item_seq"][:1])["params"])
  lengths = pipeline.eval_lengths(max_len, config.eval.length_buckets)
  step = jax.jit(evaluate.make_eval_step(model, inputs.ML1M_ITEMS, tuple(config.eval.ks),
                                         exclude_history=config.eval.exclude_history))
  setups = {
      "library": dict(step=step, batches=grouped_batches(everyone, input_lengths, batch_size,
                                                         lengths),
                      note=f"library: users grouped by input length {lengths}"),
      "one_length": dict(step=step, batches=grouped_batches(everyone, input_lengths, batch_size,
                                                            (max_len,)),
                         note=f"every user at L={max_len} (eval.length_buckets=1)"),
  }
  group_of = np.searchsorted(np.asarray(lengths), input_lengths)
  meta = dict(params=params, users_per_length={
      int(n): int(np.sum(group_of == g)) for g, n in enumerate(lengths)})
  return setups, meta
