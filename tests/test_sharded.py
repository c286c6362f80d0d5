"""The item table split by rows over the 'model' mesh axis changes no number.

Each test runs the tiny config twice on the 4 forced CPU devices, once with
the table replicated (``train.model_parallel = 1``) and once split over 2 or
4 devices, and compares. Tolerances are float32 round-off: a split table
sums the log-sum-exp, gradients and rank counts in another order.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from deeprec_jax import evaluate, losses, metrics, models, sharding, train
from deeprec_jax.models import item_embedding
from experiments.configs import tiny


def _records(workdir: str, split: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _trainer(model_parallel: int, loss: str = "bce", model: str = "sasrec") -> train.Trainer:
  config = tiny.get_config(model)
  config.train.model_parallel = model_parallel
  config.train.loss = loss
  return train.Trainer(config, train.builders.load(config.data))


def _gathered_shapes(hlo: str) -> list[list[int]]:
  """Result shapes of every all-gather (tuples included) in compiled HLO text."""
  shapes = []
  for line in hlo.splitlines():
    match = re.search(r"= (.*?) all-gather(?:-start)?\(", line)
    if match:
      shapes += [[int(d) for d in dims.split(",") if d]
                 for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))]
  return shapes


def _real_rows(trainer: train.Trainer) -> int:
  return trainer.dataset.num_items + 1  # Padding row 0 and items 1..N (SASRec).


def _assert_table_never_gathered(hlo: str, trainer: train.Trainer) -> None:
  """No all-gather yields an array with the table's rows (the table, or all scores)."""
  rows = {_real_rows(trainer), item_embedding.table_rows(_real_rows(trainer))}
  for shape in _gathered_shapes(hlo):
    assert not rows & set(shape), f"all-gather of shape {shape} (table rows {rows})"


def test_only_the_item_table_and_its_moments_are_split():
  trainer = _trainer(model_parallel=4)
  state = trainer.init_state()
  table = state["params"]["item_embed"]["embedding"]
  assert table.shape[0] == item_embedding.table_rows(_real_rows(trainer))
  assert table.shape[0] % 4 == 0 and table.shape[0] - _real_rows(trainer) < 128
  np.testing.assert_array_equal(jax.device_get(table)[_real_rows(trainer):], 0.0)

  split = PartitionSpec(sharding.MODEL_AXIS, None)
  specs = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda x: x.sharding.spec, state))[0]
  names = {jax.tree_util.keystr(path): spec for path, spec in specs}
  split_names = [name for name, spec in names.items() if spec == split]
  # The table, Adam's first and second moments; nothing else.
  assert len(split_names) == 3, split_names
  assert all(name.endswith("['item_embed']['embedding']") for name in split_names)
  assert all(spec == PartitionSpec() for spec in names.values() if spec != split)


def test_model_parallel_must_divide_the_devices():
  config = tiny.get_config("sasrec")
  config.train.model_parallel = 3
  with pytest.raises(ValueError, match="train.model_parallel"):
    train.Trainer(config, train.builders.load(config.data))


@pytest.mark.parametrize("loss", ["bce", "sampled_softmax", "softmax"])
def test_loss_and_gradients_match_unsharded(loss):
  outputs = []
  for model_parallel in (1, 2):
    trainer = _trainer(model_parallel, loss)
    state = trainer.init_state()
    batch = sharding.to_global(trainer.train_batches(epoch=0)[0], trainer.mesh)
    num_items = trainer.dataset.num_items

    def loss_and_grads(params, batch, trainer=trainer, num_items=num_items):
      def objective(params):
        hidden = trainer.model.apply({"params": params}, batch["item_seq"], user=batch["user"])
        return losses.compute(loss, hidden, models.item_table(params, num_items),
                              batch["targets"], batch["negatives"])
      return jax.value_and_grad(objective)(params)

    shardings = sharding.param_shardings(state["params"], trainer.mesh)
    step = jax.jit(loss_and_grads,
                   in_shardings=(shardings, sharding.batch_sharding(trainer.mesh)),
                   out_shardings=(sharding.replicated(trainer.mesh), shardings))
    compiled = step.lower(state["params"], batch).compile()
    if model_parallel > 1:
      _assert_table_never_gathered(compiled.as_text(), trainer)
    value, grads = jax.device_get(compiled(state["params"], batch))
    table = grads["item_embed"]["embedding"]
    np.testing.assert_array_equal(table[_real_rows(trainer):], 0.0)  # Padding rows.
    outputs.append((value, grads))
  (value_1, grads_1), (value_2, grads_2) = outputs
  np.testing.assert_allclose(value_2, value_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               grads_2, grads_1)


def test_train_step_and_evaluation_match_unsharded():
  params, results = [], []
  for model_parallel in (1, 4):
    trainer = _trainer(model_parallel)
    state = trainer.init_state()
    shardings = sharding.param_shardings(state, trainer.mesh)
    step = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss="bce",
                                         num_items=trainer.dataset.num_items),
                   in_shardings=(shardings, sharding.batch_sharding(trainer.mesh)),
                   out_shardings=(shardings, sharding.replicated(trainer.mesh)))
    batch = sharding.to_global(trainer.train_batches(epoch=0)[0], trainer.mesh)
    state, _ = step(state, batch)
    table = jax.device_get(state["params"]["item_embed"]["embedding"])
    np.testing.assert_array_equal(table[_real_rows(trainer):], 0.0)  # Still zero.
    params.append(jax.device_get(state["params"]))
    results.append(trainer.evaluate(state["params"], "valid"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *params)
  assert results[0].keys() == results[1].keys()
  for name, value in results[0].items():
    np.testing.assert_allclose(results[1][name], value, rtol=1e-5, err_msg=name)


def test_evaluation_never_gathers_the_table():
  trainer = _trainer(model_parallel=2)
  state = trainer.init_state()
  local = next(train.pipeline.eval_batches(
      trainer.dataset, split="valid", task=trainer.task, max_len=trainer.config.data.max_len,
      batch_size=trainer.config.eval.batch_size))
  batch = sharding.to_global(local, trainer.mesh)
  _assert_table_never_gathered(trainer._eval_step.lower(state["params"], batch).compile()
                               .as_text(), trainer)


def test_top_k_matches_unsharded():
  trainer = _trainer(model_parallel=4)
  state = trainer.init_state()
  num_items, k = trainer.dataset.num_items, 10
  local = next(train.pipeline.eval_batches(
      trainer.dataset, split="test", task=trainer.task, max_len=trainer.config.data.max_len,
      batch_size=8))

  def top_k(params, item_seq, exclude, mesh):
    return evaluate.top_k(trainer.model, params, num_items, item_seq, exclude, k, mesh=mesh)

  sharded = jax.jit(lambda *args: top_k(*args, mesh=trainer.mesh))
  compiled = sharded.lower(state["params"], local["item_seq"], local["exclude"]).compile()
  _assert_table_never_gathered(compiled.as_text(), trainer)
  items, scores = jax.device_get(compiled(state["params"], local["item_seq"], local["exclude"]))
  params = jax.device_get(state["params"])  # One device, one lax.top_k.
  expected_items, expected_scores = jax.jit(lambda *args: top_k(*args, mesh=None))(
      params, local["item_seq"], local["exclude"])
  np.testing.assert_array_equal(items, expected_items)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


@pytest.mark.parametrize("num_columns,k", [(41, 5), (41, 41), (9, 7), (1001, 20)])
def test_sharded_top_k_keeps_values_ids_and_tie_order(num_columns, k):
  mesh = sharding.make_mesh(4, model_parallel=4)
  rng = np.random.default_rng(num_columns)
  scores = rng.integers(0, 4, size=(6, num_columns)).astype(np.float32)  # Many ties.
  exclude = rng.integers(0, num_columns, size=(6, 3)).astype(np.int32)
  items, values = jax.jit(lambda s, e: metrics.top_k_items(s, e, k, mesh=mesh))(scores, exclude)
  expected_items, expected_values = metrics.top_k_items(scores, exclude, k)
  np.testing.assert_array_equal(items, expected_items)
  np.testing.assert_array_equal(values, expected_values)


@pytest.mark.slow  # ~17 s: two sharded runs and their restores (keeps the suite under 10 min)
def test_checkpoints_move_between_model_axes(tmp_path):
  """A run saved with the table split 4 ways resumes split 2 ways and evaluates unsplit."""
  config = tiny.get_config("sasrec")
  config.train.model_parallel = 4
  config.train.num_epochs = 1
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  assert final["best_step"] == 4  # One epoch of 4 steps, one checkpoint.

  trainer, params, step = train.load_trained(workdir, config)  # The run's own layout.
  assert step == 4
  params = jax.device_get(params)
  table = params["item_embed"]["embedding"]
  manager = train.checkpoints.create_manager(workdir, keep=config.train.keep_checkpoints,
                                             best_metric=config.train.best_metric)
  own_state = jax.device_get(train.restore_state(trainer, manager, step)[0])
  # A run from a machine with 8 devices (4 x 2-way split) evaluates on these 4, unsplit.
  config.train.num_devices, config.train.model_parallel = 8, 2
  other, other_params, other_step = train.load_trained(workdir, config)
  assert other.mesh.shape[sharding.MODEL_AXIS] == 1 and other.mesh.devices.size == 4
  assert other_step == step
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(other_params), params)
  state, _ = train.restore_state(other, manager, step)
  tables = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
            if jax.tree_util.keystr(path).endswith("['item_embed']['embedding']")]
  assert len(tables) == 3  # The table and Adam's two moments.
  # One layout whatever the mesh: the table is padded once, at creation.
  assert all(leaf.shape[0] == table.shape[0] == item_embedding.table_rows(_real_rows(trainer))
             for leaf in tables)
  # Exactly the saved state: step, params, Adam's moments and count, RNG key.
  assert int(state["step"]) == step
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), own_state)
  np.testing.assert_allclose(other.evaluate(state["params"], "test")["ndcg@10"],
                             final["test/ndcg@10"], rtol=1e-5)

  # Resuming on the 2-way split restores the 4-way checkpoint exactly and trains on.
  config.train.num_devices = 0
  config.train.model_parallel = 2
  config.train.num_epochs = 2
  two_way = train.Trainer(config, train.builders.load(config.data))
  restored, _ = train.restore_state(two_way, manager, step)
  manager.close()
  restored_table = restored["params"]["item_embed"]["embedding"]
  assert restored_table.sharding.spec == sharding.item_table_sharding(two_way.mesh).spec
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), own_state)
  resumed = train.train_and_evaluate(config, workdir)
  valid = [(r["step"], r["ndcg@10"]) for r in _records(workdir, "valid")]
  assert [s for s, _ in valid] == [4, 8]  # Resumed at step 4: its evaluation not redone.
  best = max(value for _, value in valid)
  assert resumed["best_step"] in [s for s, value in valid if value == best]
  _, params, resumed_step = train.load_trained(workdir, config)
  assert resumed_step == resumed["best_step"]
  resumed_table = jax.device_get(params["item_embed"]["embedding"])
  assert resumed_table.shape[0] == table.shape[0]
  np.testing.assert_array_equal(resumed_table[_real_rows(trainer):], 0.0)
