"""Row-sparse item-table updates (deeprec_jax/row_sparse.py) against dense Adam and NumPy.

Tolerances: touched rows are float32 round-off of the same formula
(rtol 1e-6 for one optimizer update, 1e-5 after a model's forward and
backward pass, which sums in another order on a small table); untouched rows
must be bit-identical, which is the point of the sparse update.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deeprec_jax import checkpoints, optimizers, row_sparse, sharding, train
from experiments.configs import tiny

ROWS, DIM = 24, 3


def _table_tree(x):
  return {"item_embed": {"embedding": x}}


def test_touched_rows_are_sorted_unique_with_padding_first_and_renumber_the_inputs():
  rng = np.random.default_rng(0)
  seq, negatives = rng.integers(0, 50, (3, 5)), rng.integers(1, 50, (3, 5, 2))
  ids, (local_seq, local_neg) = row_sparse.touched_rows([seq, negatives], num_rows=64)
  expected = np.unique(np.concatenate([[0], seq.ravel(), negatives.ravel()]))
  assert ids.shape == (1 + seq.size + negatives.size,)  # static: one slot per id, + row 0
  np.testing.assert_array_equal(ids[:len(expected)], expected)
  np.testing.assert_array_equal(ids[len(expected):], 64)  # unused slots: out of range
  np.testing.assert_array_equal(np.asarray(ids)[local_seq], seq)
  np.testing.assert_array_equal(np.asarray(ids)[local_neg], negatives)
  # More ids than rows: as many slots as rows.
  ids, _ = row_sparse.touched_rows([np.arange(10).repeat(3)], num_rows=10)
  np.testing.assert_array_equal(ids, np.arange(10))


def test_gather_fills_and_scatter_drops_the_out_of_range_slots():
  table = jnp.arange(12.0).reshape(4, 3)
  ids = jnp.array([0, 2, 4, 4])
  np.testing.assert_array_equal(row_sparse.gather(table, ids)[2:], 0.0)
  new = row_sparse.scatter(table, ids, -jnp.ones((4, 3)))
  np.testing.assert_array_equal(new[jnp.array([0, 2])], -1.0)
  np.testing.assert_array_equal(new[jnp.array([1, 3])], table[jnp.array([1, 3])])


def _moments(rng):
  """A table and nonzero Adam moments, as after some steps of training."""
  table = rng.normal(size=(ROWS, DIM)).astype(np.float32)
  mu = rng.normal(size=(ROWS, DIM)).astype(np.float32) * 0.1
  nu = rng.uniform(0.01, 0.1, size=(ROWS, DIM)).astype(np.float32)
  return table, mu, nu


def _at_step(state, count, mu, nu):
  """An optax Adam(W) state moved to step ``count`` with moments ``mu``, ``nu``."""
  kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)

  def move(x):
    if isinstance(x, optax.ScaleByAdamState):
      return x._replace(count=count, mu=jnp.asarray(mu), nu=jnp.asarray(nu))
    return x._replace(count=count) if isinstance(x, optax.ScaleByScheduleState) else x

  return jax.tree.map(move, state, is_leaf=lambda x: isinstance(x, kinds))


@pytest.mark.parametrize("decay", ["none", "l2", "decoupled"])
def test_lazy_adam_is_optax_adam_on_touched_rows_and_leaves_the_others(decay):
  rng = np.random.default_rng(1)
  table, mu, nu = _moments(rng)
  ids = jnp.array([0, 3, 7, 8, 20, ROWS, ROWS])  # two unused slots
  touched = np.array([0, 3, 7, 8, 20])
  untouched = np.setdiff1d(np.arange(ROWS), touched)
  row_grads = rng.normal(size=(len(ids), DIM)).astype(np.float32)
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  weight_decay = 0.0 if decay == "none" else 0.1
  if decay == "decoupled":
    dense = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    dense = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(schedule))
  sparse = row_sparse.lazy_adam(schedule, weight_decay=weight_decay,
                                decoupled=decay == "decoupled")
  count = jnp.int32(4)
  dense_state = _at_step(dense.init(table), count, mu, nu)  # the same state in both
  sparse_state = row_sparse.LazyAdamState(count, _table_tree(jnp.asarray(mu)),
                                          _table_tree(jnp.asarray(nu)))
  # The dense gradient: the row gradients at their rows, zero elsewhere.
  dense_grads = np.zeros((ROWS, DIM), np.float32)
  dense_grads[touched] = row_grads[:len(touched)]

  updates, _ = dense.update(jnp.asarray(dense_grads), dense_state, jnp.asarray(table))
  dense_table = np.asarray(optax.apply_updates(jnp.asarray(table), updates))
  row_updates, new_state = sparse.update(ids, jnp.asarray(row_grads), sparse_state,
                                         row_sparse.gather(jnp.asarray(table), ids))
  sparse_table = np.asarray(row_sparse.scatter(jnp.asarray(table), ids,
                                               row_sparse.gather(jnp.asarray(table), ids)
                                               + row_updates))

  np.testing.assert_allclose(sparse_table[touched], dense_table[touched], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(sparse_table[untouched], table[untouched])
  new_mu = np.asarray(new_state.mu["item_embed"]["embedding"])
  new_nu = np.asarray(new_state.nu["item_embed"]["embedding"])
  np.testing.assert_array_equal(new_mu[untouched], mu[untouched])
  np.testing.assert_array_equal(new_nu[untouched], nu[untouched])
  effective = row_grads[:len(touched)] + (weight_decay * table[touched] if decay == "l2" else 0)
  np.testing.assert_allclose(new_mu[touched], 0.1 * effective + 0.9 * mu[touched], rtol=1e-5)
  assert int(new_state.count) == 5
  # Dense Adam moves the untouched rows (their momentum): the sparse update differs.
  assert not np.allclose(dense_table[untouched], table[untouched])


def test_rowwise_adagrad_matches_a_float64_reference_over_steps():
  rng = np.random.default_rng(2)
  table = rng.normal(size=(ROWS, DIM))
  lr, eps, initial = 0.05, 1e-8, 0.1
  steps = [np.array([1, 2, 5, ROWS]), np.array([2, 6, 7, 9]), np.array([0, 5, 6, ROWS])]
  grads = [rng.normal(size=(4, DIM)) for _ in steps]

  expected, accumulator = table.copy(), np.full(ROWS, initial)
  for ids, g in zip(steps, grads, strict=True):
    for slot, row in enumerate(ids):
      if row < ROWS:
        accumulator[row] += np.mean(g[slot] ** 2)
        expected[row] -= lr * g[slot] / (np.sqrt(accumulator[row]) + eps)

  sparse = row_sparse.rowwise_adagrad(lr, eps=eps, initial_accumulator=initial)
  params = jnp.asarray(table, jnp.float32)
  state = sparse.init(params)
  assert state.accumulator["item_embed"]["embedding"].shape == (ROWS,)  # one moment per row
  for ids, g in zip(steps, grads, strict=True):
    ids = jnp.asarray(ids)
    rows = row_sparse.gather(params, ids)
    updates, state = sparse.update(ids, jnp.asarray(g, jnp.float32), state, rows)
    params = row_sparse.scatter(params, ids, rows + updates)
  np.testing.assert_allclose(params, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.accumulator["item_embed"]["embedding"], accumulator,
                             rtol=1e-6)
  never = np.setdiff1d(np.arange(ROWS), np.concatenate(steps))
  np.testing.assert_array_equal(np.asarray(params)[never], table.astype(np.float32)[never])


def _trainer(item_optimizer: str, loss: str = "bce", model_parallel: int = 1,
             model: str = "sasrec") -> train.Trainer:
  config = tiny.get_config(model)
  # A catalogue much larger than a batch (8 x 10 x 4 ids), so that most rows
  # are untouched and the step's table ([U, d]) is smaller than the full one.
  config.data.synthetic.update(num_items=1500, num_users=64)
  config.train.batch_size = 8
  config.train.loss = loss
  config.train.num_negatives = 2
  config.train.item_optimizer = item_optimizer
  config.train.model_parallel = model_parallel
  return train.Trainer(config, train.builders.load(config.data))


def _steps(trainer: train.Trainer, num_steps: int = 2):
  """``(initial params, state after the steps, rows each step touched, losses, jitted step)``."""
  state = trainer.init_state()
  init = jax.device_get(state["params"])
  shardings = sharding.param_shardings(state, trainer.mesh)
  step = jax.jit(train.make_train_step(trainer.model, trainer.tx,
                                       loss=trainer.config.train.loss,
                                       num_items=trainer.dataset.num_items),
                 in_shardings=(shardings, sharding.batch_sharding(trainer.mesh)),
                 out_shardings=(shardings, sharding.replicated(trainer.mesh)))
  touched, losses = [], []
  for local in trainer.train_batches(epoch=0)[:num_steps]:
    ids = np.concatenate([[0]] + [np.ravel(local[k]) for k in ("item_seq", "targets",
                                                                "negatives")])
    touched.append(np.unique(ids))
    # The step's table has one row per id slot: fewer than the full table.
    assert ids.size < state["params"]["item_embed"]["embedding"].shape[0]
    state, metrics = step(state, sharding.to_global(local, trainer.mesh))
    losses.append(float(metrics["loss"]))
  return init, jax.device_get(state), touched, losses, step


# gbce also checks that the calibration gets N, not the small table's rows;
# sampled_softmax is also checked (against the unsharded sparse step) in the
# sharded test below; softmax's path only skips the renumbering.
@pytest.mark.parametrize("loss", ["gbce", pytest.param("bce", marks=pytest.mark.slow),
                                  pytest.param("sampled_softmax", marks=pytest.mark.slow),
                                  pytest.param("softmax", marks=pytest.mark.slow)])
def test_lazy_adam_steps_equal_dense_adam_except_on_rows_left_untouched(loss):
  init, dense, _, dense_losses, _ = _steps(_trainer("dense", loss))
  _, sparse, touched, sparse_losses, _ = _steps(_trainer("lazy_adam", loss))
  np.testing.assert_allclose(sparse_losses, dense_losses, rtol=1e-5)
  table, dense_table = (s["params"]["item_embed"]["embedding"] for s in (sparse, dense))
  init_table = init["item_embed"]["embedding"]
  rows = np.arange(table.shape[0])
  if loss == "softmax":  # Scores every item: every row is touched, lazy = dense.
    first_only, never = np.array([], int), rows[len(init_table) - 1:]  # only padding rows
  else:
    first_only = np.setdiff1d(touched[0], touched[1])
    never = np.setdiff1d(rows, np.concatenate(touched))
  assert loss == "softmax" or len(first_only) > 5
  # Step 1 from zero moments: dense Adam leaves gradient-free rows alone too,
  # so the states agree everywhere but on rows step 1 touched and step 2 did
  # not, which dense Adam moves again by their momentum.
  others = np.setdiff1d(rows, first_only)
  np.testing.assert_allclose(table[others], dense_table[others], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(table[never], init_table[never])
  if len(first_only):
    assert not np.allclose(table[first_only], dense_table[first_only], rtol=1e-5, atol=1e-6)
  rest, dense_rest = (row_sparse.split_table(s["params"])[0] for s in (sparse, dense))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               rest, dense_rest)


@pytest.mark.slow  # 23 s: four forced devices; the unsharded sparse steps are tested by default
def test_row_sharded_sparse_steps_equal_the_unsharded_ones_and_never_gather_the_table():
  results = []
  for model_parallel in (1, 2, 4):
    trainer = _trainer("lazy_adam", "sampled_softmax", model_parallel)
    _, state, _, losses, step = _steps(trainer)
    if model_parallel == 4:  # one more compilation: the widest split only
      table = state["params"]["item_embed"]["embedding"]
      hlo = step.lower(trainer.init_state(), sharding.to_global(
          trainer.train_batches(epoch=0)[0], trainer.mesh)).compile().as_text()
      for line in hlo.splitlines():
        if " all-gather" in line:  # nothing with the table's rows is all-gathered
          assert f"[{table.shape[0]}," not in line.split(" all-gather")[0], line
    results.append((state, losses))
  (base, base_losses), *split = results
  for state, losses in split:
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 state, base)


def test_rowwise_adagrad_trains_only_the_touched_rows():
  trainer = _trainer("rowwise_adagrad", "bce")
  init, state, touched, losses, _ = _steps(trainer, num_steps=1)
  table = state["params"]["item_embed"]["embedding"]
  init_table = init["item_embed"]["embedding"]
  accumulator = state["opt_state"]["items"].accumulator["item_embed"]["embedding"]
  assert accumulator.shape == table.shape[:1]
  changed = np.flatnonzero(np.any(table != init_table, axis=1))
  assert set(changed) <= set(touched[0]) and len(changed) > 10
  np.testing.assert_array_equal(np.flatnonzero(accumulator), np.flatnonzero(
      np.isin(np.arange(len(accumulator)), touched[0]) & (accumulator > 0)))
  assert np.isfinite(losses).all()


# ~20 s: resume exactness is a default test in test_train.py (SIGKILL), and the
# sparse steps' equality with dense Adam in the tests above.
@pytest.mark.slow
def test_resume_of_a_sparse_run_is_exact(tmp_path):
  config = tiny.get_config("sasrec")
  config.data.synthetic.update(num_items=1500, num_users=64)
  config.train.batch_size = 16  # 4 steps per epoch, a checkpoint after each of 2 epochs
  config.train.item_optimizer = "lazy_adam"
  straight = str(tmp_path / "straight")
  train.train_and_evaluate(config, straight)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  # Drop the last checkpoint: the rerun resumes from the one before it (step 4).
  manager = checkpoints.create_manager(resumed, keep=2, best_metric="ndcg@10")
  last = manager.latest_step()
  manager.close()
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(last)))
  os.remove(os.path.join(resumed, "final_metrics.json"))
  manager = checkpoints.create_manager(resumed, keep=2, best_metric="ndcg@10")
  assert manager.latest_step() == 4  # a real resume, not a fresh start
  manager.close()
  train.train_and_evaluate(config, resumed)

  def latest(workdir):
    trainer = train.Trainer(config, train.builders.load(config.data))
    manager = checkpoints.create_manager(workdir, keep=2, best_metric="ndcg@10")
    step = manager.latest_step()
    state, _ = train.restore_state(trainer, manager, step)
    manager.close()
    return step, jax.device_get(state)

  (step, state), (straight_step, straight_state) = latest(resumed), latest(straight)
  assert step == straight_step == last == 8
  assert isinstance(state["opt_state"]["items"], row_sparse.LazyAdamState)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0),
               state, straight_state)


def test_sparse_updates_refuse_what_they_cannot_do():
  config = tiny.get_config("sasrec")
  config.train.item_optimizer = "sparse_sgd"
  with pytest.raises(ValueError, match="train.item_optimizer='sparse_sgd'"):
    optimizers.create_optimizer(config.train, 10)
  config.train.item_optimizer = "lazy_adam"
  config.privacy.enabled = True
  config.privacy.noise_multiplier = 1.0
  with pytest.raises(ValueError, match="train.item_optimizer must be 'dense' under privacy"):
    train.Trainer(config, train.builders.load(config.data))
