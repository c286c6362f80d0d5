"""The optimizer of a run: Adam or AdamW, the learning-rate schedule, decay masks.

``create_optimizer(config.train, total_steps)`` is the one place a run's
optimizer is built; with ``train.item_optimizer`` other than 'dense' it
returns a ``row_sparse.SparseOptimizer`` (docs/scaling.md).
"""

from typing import Any

import jax
import ml_collections
import optax

from deeprec_jax import row_sparse

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(train_config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then constant or cosine decay to 0."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  if train_config.schedule not in SCHEDULES:
    raise ValueError(f"config key train.schedule={train_config.schedule!r}; expected one of "
                     f"{', '.join(SCHEDULES)}.")
  if train_config.schedule == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
  """True for the weights that get weight decay: matrices, and embeddings if asked.

  Biases, layer-norm scales and peephole vectors (1-D) never decay.
  """
  def is_decayed(path, leaf) -> bool:
    names = [getattr(k, "key", str(k)) for k in path]
    if names and names[-1] == "embedding":
      return decay_embeddings
    return leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(train_config: ml_collections.ConfigDict, total_steps: int,
                     mesh: jax.sharding.Mesh | None = None
                     ) -> optax.GradientTransformation | row_sparse.SparseOptimizer:
  """Adam or AdamW with warmup, schedule, global-norm clipping and masked decay.

  With ``train.item_optimizer`` other than 'dense', a ``row_sparse.SparseOptimizer``:
  the same chain for every other parameter, the item table row-wise (per
  shard of the table on ``mesh``, if given).
  """
  if train_config.optimizer not in OPTIMIZERS:
    raise ValueError(f"config key train.optimizer={train_config.optimizer!r}; expected one of "
                     f"{', '.join(OPTIMIZERS)}.")
  item_optimizer = train_config.get("item_optimizer", "dense")
  if item_optimizer not in row_sparse.ITEM_OPTIMIZERS:
    raise ValueError(f"config key train.item_optimizer={item_optimizer!r}; expected one of "
                     f"{', '.join(row_sparse.ITEM_OPTIMIZERS)}.")
  schedule = learning_rate_schedule(train_config, total_steps)
  b2 = train_config.get("adam_b2", 0.999)
  if not 0.0 <= b2 < 1.0:
    raise ValueError(f"config key train.adam_b2={b2!r}; expected a decay in [0, 1).")
  mask = lambda params: decay_mask(params, train_config.decay_embeddings)
  chain = []
  if train_config.grad_clip_norm > 0 and item_optimizer == "dense":
    chain.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
  if train_config.optimizer == "adamw":
    chain.append(optax.adamw(schedule, b2=b2, weight_decay=train_config.weight_decay,
                             mask=mask))
  else:
    if train_config.weight_decay > 0:  # Adam's coupled L2 penalty, added to the gradient.
      chain.append(optax.add_decayed_weights(train_config.weight_decay, mask=mask))
    chain.append(optax.adam(schedule, b2=b2))
  if item_optimizer == "dense":
    return optax.chain(*chain)
  item_lr = train_config.get("item_learning_rate", 0.0) or train_config.learning_rate
  item_schedule = lambda count: schedule(count) * (item_lr / train_config.learning_rate)
  decay = train_config.weight_decay if train_config.decay_embeddings else 0.0
  if item_optimizer == "lazy_adam":
    rows = row_sparse.lazy_adam(item_schedule, b2=b2, weight_decay=decay,
                                decoupled=train_config.optimizer == "adamw")
  else:
    rows = row_sparse.rowwise_adagrad(item_schedule, weight_decay=decay)
  return row_sparse.SparseOptimizer(optax.chain(*chain), rows, train_config.grad_clip_norm,
                                    mesh)
