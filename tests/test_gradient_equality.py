"""The train step's loss and raw gradients, whatever the mesh and the row layout.

One Adam step moves each weight by about ``lr * sign(g)`` and cannot see a
gradient that is 2x (or 4x) too large, e.g. a ``psum`` over the data axis
where a ``pmean`` belongs. These tests therefore read the gradients
themselves:

* ``train.make_train_step`` runs with ``capture_gradients()``, an optimizer
  that leaves the params alone and stores the gradient it receives in its
  state, jitted with the shardings ``train._train_loop`` uses;
* the reference is ``jax.value_and_grad`` of the same objective (the model
  in training mode with the step's dropout key, then ``losses.loss_fn``) on
  the whole numpy batch on one device, no mesh;
* the real training loop (``train.train_and_evaluate``) runs a few steps of
  plain SGD, whose update is ``-lr * g``, so a wrong gradient scale shows in
  the parameters.

Tolerances: float32 round-off of sums taken in another order (4 devices, a
split table, packed rows): ``rtol = 1e-4`` per element plus ``atol = 1e-5``
of the leaf's largest gradient (measured: below 1e-6 relative). A gradient
off by a factor 2 is off by 100% of itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deeprec_jax import losses, models, optimizers, sharding, train
from deeprec_jax.data import packing
from experiments.configs import tiny

RTOL, ATOL = 1e-4, 1e-5
# XLA optimization level 0 about halves compile times; the values stay
# float32 round-off apart, and the collectives are the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def capture_gradients() -> optax.GradientTransformation:
  """An optimizer whose update is zero and whose state is the last gradient it saw."""

  def init(params):
    return {"grads": jax.tree.map(jnp.zeros_like, params)}

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), {"grads": grads}

  return optax.GradientTransformation(init, update)


def assert_trees_close(actual, expected, what: str) -> None:
  flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
  flat_actual = jax.tree.leaves(actual)
  assert len(flat_actual) == len(flat_expected), what
  for (path, want), got in zip(flat_expected, flat_actual, strict=True):
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    name = f"{what} {jax.tree_util.keystr(path)}"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.abs(want).max(),
                               err_msg=name)


def make_trainer(model="sasrec", **train_overrides) -> train.Trainer:
  config = tiny.get_config(model)
  for key, value in train_overrides.items():
    if key in ("dropout_rate",):
      config.model[key] = value
    elif key == "max_len":
      config.data.max_len = value
    else:
      config.train[key] = value
  return train.Trainer(config, train.builders.load(config.data))


def dropout_key_data(state, step):
  """The raw dropout key ``train.make_train_step`` derives for ``step``."""
  key = jax.random.wrap_key_data(state["rng"], impl=train.DROPOUT_RNG_IMPL)
  return jax.device_get(jax.random.key_data(jax.random.fold_in(key, step)))


def make_reference(trainer):
  """``(params, dropout key data, numpy batch) -> (loss, grads)``: the objective, one device.

  ``jax.value_and_grad`` of the train step's objective, jitted without any
  mesh or sharding, on the whole batch.
  """
  loss_fn = losses.loss_fn(trainer.config.train.loss)
  num_items = trainer.dataset.num_items

  @jax.jit(compiler_options=FAST_COMPILE)
  def value_and_grad(params, key_data, batch):
    key = jax.random.wrap_key_data(key_data, impl=train.DROPOUT_RNG_IMPL)

    def objective(params):
      hidden = trainer.model.apply({"params": params}, batch["item_seq"], user=batch["user"],
                                   deterministic=False, rngs={"dropout": key},
                                   **packing.packing_kwargs(batch))
      return loss_fn(hidden, models.item_table(params, num_items), batch["targets"],
                     batch["negatives"])
    return jax.value_and_grad(objective)(params)

  return lambda *args: jax.device_get(value_and_grad(*args))


def captured_loss_and_grads(trainer, batch):
  """The loss and gradients inside ``make_train_step``, jitted on the trainer's mesh."""
  trainer.tx = capture_gradients()
  state = trainer.init_state()
  shardings = sharding.param_shardings(state, trainer.mesh)
  step = jax.jit(
      train.make_train_step(trainer.model, trainer.tx, loss=trainer.config.train.loss,
                            num_items=trainer.dataset.num_items),
      in_shardings=(shardings, sharding.batch_sharding(trainer.mesh)),
      out_shardings=(shardings, sharding.replicated(trainer.mesh)),
      compiler_options=FAST_COMPILE)
  new_state, metrics = step(state, sharding.to_global(batch, trainer.mesh))
  new_state, metrics = jax.device_get((new_state, metrics))
  return jax.device_get(state), float(metrics["loss"]), new_state["opt_state"]["grads"]


@pytest.mark.parametrize("num_devices,model_parallel", [(1, 1), (4, 1), (4, 2)])
def test_train_step_gradients_equal_the_one_device_reference(num_devices, model_parallel):
  """1 device, 4 data-parallel devices, and 2 x 2 with the item table split by rows."""
  trainer = make_trainer(num_devices=num_devices, model_parallel=model_parallel)
  assert trainer.mesh.shape == {"data": num_devices // model_parallel,
                                "model": model_parallel}
  assert trainer.config.model.dropout_rate > 0  # Dropout is part of the objective.
  batch = trainer.train_batches(epoch=0)[0]
  state, loss, grads = captured_loss_and_grads(trainer, batch)
  want_loss, want_grads = make_reference(trainer)(state["params"],
                                                  dropout_key_data(state, 0), batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_trees_close(grads, want_grads, f"mesh {dict(trainer.mesh.shape)}")
  assert np.abs(want_grads["item_embed"]["embedding"]).max() > 0


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_packed_rows_give_the_unpacked_gradients(model):
  """Several users per row (segment ids, positions), 4 devices: the unpacked objective."""
  # Longer rows than most histories: rows to spare for packing. No dropout:
  # its masks follow the batch's shape, which packing changes.
  trainer = make_trainer(model, pack=True, max_len=40, dropout_rate=0.0)
  packed = trainer.train_batches(epoch=0)[0]
  trainer.pack = False
  unpacked = trainer.train_batches(epoch=0)[0]
  assert "segment_ids" in packed and "segment_ids" not in unpacked
  assert packed["item_seq"].shape[0] < unpacked["item_seq"].shape[0]
  np.testing.assert_array_equal(np.sort(packed["targets"][packed["targets"] > 0]),
                                np.sort(unpacked["targets"][unpacked["targets"] > 0]))
  state, loss, grads = captured_loss_and_grads(trainer, packed)
  want_loss, want_grads = make_reference(trainer)(state["params"], dropout_key_data(state, 0),
                                                  unpacked)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_trees_close(grads, want_grads, f"{model} packed")


def test_training_loop_takes_plain_sgd_steps_of_the_true_gradient(tmp_path, monkeypatch):
  """``train_and_evaluate`` on 2 x 2 devices with SGD: params move by exactly -lr * sum(g)."""
  lr, num_steps = 0.5, 3
  monkeypatch.setattr(optimizers, "create_optimizer", lambda *args: optax.sgd(lr))
  config = tiny.get_config("sasrec")
  config.train.num_steps = num_steps
  config.train.model_parallel = 2
  config.eval.length_buckets = 1  # One evaluation program to compile, not four.
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  trainer, params, step = train.load_trained(workdir)
  assert step == num_steps and trainer.mesh.shape == {"data": 2, "model": 2}
  trained = jax.device_get(params)

  # The same run by hand: SGD on the reference gradients of each step's batch.
  state = jax.device_get(trainer.init_state())
  batches = trainer.train_batches(epoch=0)
  params, reference = state["params"], make_reference(trainer)
  for index in range(num_steps):
    _, grads = reference(params, dropout_key_data(state, index), batches[index])
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  initial = state["params"]
  assert_trees_close(jax.tree.map(np.subtract, trained, initial),
                     jax.tree.map(np.subtract, params, initial), "SGD updates")

