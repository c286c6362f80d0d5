"""Training negatives (popularity, in-batch, logQ, shared per sequence) and label smoothing."""

import jax
import numpy as np
import pytest

from deeprec_jax import losses, models, sharding, train
from deeprec_jax.data import preprocess
from experiments.configs import tiny


def _trainer(sampling: str, loss: str = "sampled_softmax", item_optimizer: str = "dense",
             pack: bool = True) -> train.Trainer:
  config = tiny.get_config("sasrec")
  config.train.pack = pack
  config.model.dropout_rate = 0.0  # the step's loss is then the deterministic loss
  config.train.update(loss=loss, num_negatives=8, negative_sampling=sampling,
                      item_optimizer=item_optimizer)
  return train.Trainer(config, train.builders.load(config.data))


def _counts(trainer: train.Trainer) -> np.ndarray:
  return train.pipeline.train_item_counts(trainer.dataset)


def _draws_and_expectation(trainer: train.Trainer) -> tuple[np.ndarray, np.ndarray]:
  """Observed negatives per item over 3 epochs, and their expected counts by popularity.

  Each draw for user ``u`` picks item ``i`` outside ``u``'s training part with
  probability ``c_i / sum_{j not seen} c_j`` (``c`` = training counts).
  """
  counts = _counts(trainer).astype(np.float64)
  observed, expected = np.zeros_like(counts), np.zeros_like(counts)
  for epoch in range(3):
    for batch in trainer.train_batches(epoch):
      for row, user in enumerate(batch["user"]):
        has_target = batch["targets"][row] > 0
        drawn = batch["negatives"][row][has_target]
        assert (batch["negatives"][row][~has_target] == 0).all()
        seen = np.unique(preprocess.split_train(trainer.dataset.source[int(user)]["item_seq"]))
        assert not np.isin(drawn, seen).any()  # never an item the user trains on
        allowed = counts.copy()
        allowed[seen] = 0.0
        observed += np.bincount(drawn.ravel(), minlength=len(counts))
        expected += drawn.size * allowed / allowed.sum()
  return observed, expected


def test_popularity_negatives_follow_the_training_counts_and_avoid_seen_items():
  distances = {}
  for sampling in ("uniform", "popularity"):
    trainer = _trainer(sampling, pack=False)
    observed, expected = _draws_and_expectation(trainer)
    distances[sampling] = 0.5 * np.abs(observed / observed.sum()
                                       - expected / expected.sum()).sum()
  # Total variation distance to the popularity expectation. With ~15k draws
  # over 40 items its sampling noise is ~0.02; 0.05 is 2.5 times that.
  assert distances["popularity"] < 0.05, distances
  assert distances["uniform"] > 0.1, distances


def test_log_q_is_the_smoothed_log_share_of_the_training_counts():
  trainer = _trainer("popularity")
  counts = _counts(trainer).astype(np.float64)
  expected = np.log((counts[1:] + 1) / (counts[1:] + 1).sum())
  np.testing.assert_allclose(trainer.log_q[1:], expected, rtol=1e-6)
  assert _trainer("popularity", loss="bce").log_q is None  # logQ belongs to the softmax
  assert _trainer("uniform").log_q is None


@pytest.mark.parametrize("sampling,item_optimizer", [("popularity", "dense"),
                                                      ("popularity", "lazy_adam"),
                                                      ("in_batch", "dense")])
def test_the_step_subtracts_log_q_from_every_logit(sampling, item_optimizer):
  trainer = _trainer(sampling, item_optimizer=item_optimizer)
  state = trainer.init_state()
  local = trainer.train_batches(epoch=0)[0]
  batch = sharding.to_global(local, trainer.mesh)
  step = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss="sampled_softmax",
                                       num_items=trainer.dataset.num_items,
                                       log_q=trainer.log_q))
  _, metrics = step(state, batch)
  params = jax.device_get(state["params"])
  hidden = trainer.model.apply({"params": params}, local["item_seq"], user=local["user"],
                               **train.packing.packing_kwargs(local))
  table = models.item_table(params, trainer.dataset.num_items)
  corrected = losses.sampled_softmax(hidden, table, local["targets"], local["negatives"],
                                     log_q=trainer.log_q)
  plain = losses.sampled_softmax(hidden, table, local["targets"], local["negatives"])
  np.testing.assert_allclose(metrics["loss"], corrected, rtol=1e-5)
  assert abs(float(corrected) - float(plain)) > 1e-3  # the correction changes the loss


def test_shared_negatives_train_unpacked_and_the_step_scores_them():
  """train.shared_negatives: rows unpacked, [B, 1, k] batches, the step's loss is the loss's."""
  config = tiny.get_config("sasrec")
  config.model.dropout_rate = 0.0
  config.train.update(loss="sampled_softmax", num_negatives=16, shared_negatives=True)
  trainer = train.Trainer(config, train.builders.load(config.data))
  assert not trainer.pack
  state = trainer.init_state()
  local = trainer.train_batches(epoch=0)[0]
  assert local["negatives"].shape == (config.train.batch_size, 1, 16)
  step = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss="sampled_softmax",
                                       num_items=trainer.dataset.num_items))
  _, metrics = step(state, sharding.to_global(local, trainer.mesh))
  params = jax.device_get(state["params"])
  hidden = trainer.model.apply({"params": params}, local["item_seq"], user=local["user"])
  table = models.item_table(params, trainer.dataset.num_items)
  expected = losses.sampled_softmax(hidden, table, local["targets"],
                                    np.repeat(local["negatives"], local["targets"].shape[1], 1))
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_window_models_and_unknown_samplers_are_refused():
  config = tiny.get_config("caser")
  config.train.negative_sampling = "popularity"
  trainer = train.Trainer(config, train.builders.load(config.data))
  with pytest.raises(ValueError, match="train.negative_sampling='popularity' or 'in_batch' "
                     "needs a sequence"):
    trainer.train_batches(0)
  with pytest.raises(ValueError, match="train.negative_sampling='hard'"):
    _trainer("hard")


def test_the_step_smooths_labels_as_configured():
  config = tiny.get_config("sasrec")
  config.model.dropout_rate = 0.0
  config.train.update(loss="softmax", label_smoothing=0.2)
  trainer = train.Trainer(config, train.builders.load(config.data))
  state = trainer.init_state()
  local = trainer.train_batches(epoch=0)[0]
  step = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss="softmax",
                                       num_items=trainer.dataset.num_items,
                                       label_smoothing=config.train.label_smoothing))
  _, metrics = step(state, sharding.to_global(local, trainer.mesh))
  params = jax.device_get(state["params"])
  hidden = trainer.model.apply({"params": params}, local["item_seq"], user=local["user"],
                               **train.packing.packing_kwargs(local))
  table = models.item_table(params, trainer.dataset.num_items)
  smoothed = losses.softmax_ce(hidden, table, local["targets"], label_smoothing=0.2)
  np.testing.assert_allclose(metrics["loss"], smoothed, rtol=1e-5)
  assert abs(float(smoothed) - float(losses.softmax_ce(hidden, table, local["targets"]))) > 1e-3
  config.privacy.enabled = True
  with pytest.raises(ValueError, match="train.label_smoothing must be 0 under privacy"):
    train.Trainer(config, train.builders.load(config.data))


def test_the_output_table_trains_and_refuses_row_sparse_steps():
  config = tiny.get_config("sasrec")
  config.model.output_table = True
  config.train.update(loss="bce")
  trainer = train.Trainer(config, train.builders.load(config.data))
  state = trainer.init_state()
  step = jax.jit(train.make_train_step(trainer.model, trainer.tx, loss="bce",
                                       num_items=trainer.dataset.num_items))
  new_state, metrics = step(state, sharding.to_global(trainer.train_batches(0)[0],
                                                      trainer.mesh))
  assert np.isfinite(float(metrics["loss"]))
  before, after = (np.asarray(s["params"]["output_embed"]["embedding"])
                   for s in (jax.device_get(state), jax.device_get(new_state)))
  assert np.abs(after - before).max() > 0  # the scored rows learn
  config.train.item_optimizer = "lazy_adam"
  sparse = train.Trainer(config, train.builders.load(config.data))
  with pytest.raises(ValueError, match="model.output_table needs train.item_optimizer='dense'"):
    train.make_train_step(sparse.model, sparse.tx, loss="bce", num_items=40)


@pytest.mark.parametrize("pack", [False, True])
def test_in_batch_negatives_come_from_the_batch_and_never_from_the_history(pack):
  """train.negative_sampling='in_batch': draws are the batch's items, seen ones zeroed."""
  trainer = _trainer("in_batch", pack=pack)
  assert trainer.negative_cdf is None  # no popularity cdf; the same logQ as 'popularity'
  np.testing.assert_array_equal(trainer.log_q, _trainer("popularity").log_q)
  source, max_len = trainer.dataset.source, trainer.config.data.max_len
  unpacked = trainer.train_batches(epoch=0) if not pack else _trainer(
      "in_batch", pack=False).train_batches(epoch=0)
  drawn_any = 0
  for batch, raw in zip(trainer.train_batches(epoch=0), unpacked, strict=True):
    users = raw["user"][raw["targets"].any(axis=1)]  # the global batch's users
    pool = np.concatenate([preprocess.split_train(
        np.asarray(source[int(u)]["item_seq"]))[-(max_len + 1):] for u in users])
    drawn = batch["negatives"][batch["targets"] > 0]
    assert np.isin(drawn[drawn > 0], pool).all()  # only the batch's own items
    assert (batch["negatives"][batch["targets"] == 0] == 0).all()
    drawn_any += int((drawn > 0).sum())
    if not pack:
      for row, user in enumerate(raw["user"]):
        mine = raw["negatives"][row][raw["targets"][row] > 0]
        seen = preprocess.split_train(np.asarray(source[int(user)]["item_seq"]))
        assert not np.isin(mine[mine > 0], seen).any()  # never the user's training items
  assert drawn_any > 0


def test_in_batch_negatives_do_not_depend_on_the_process_count():
  trainer = _trainer("in_batch", pack=False)
  kwargs = dict(task=trainer.task, max_len=trainer.config.data.max_len,
                global_batch_size=trainer.config.train.batch_size, num_negatives=8, seed=0,
                epoch=0, in_batch_negatives=True)
  whole = train.pipeline.train_batches(trainer.dataset, **kwargs)[0]
  halves = [train.pipeline.train_batches(trainer.dataset, process_index=p, process_count=2,
                                         **kwargs)[0] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["negatives"] for h in halves]),
                                whole["negatives"])
