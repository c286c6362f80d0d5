"""Cold-start split: withheld items never reach training; metrics by target kind."""


import numpy as np
import pytest

from deeprec_jax import evaluate, train
from deeprec_jax.data import builders, cold_start, pipeline, preprocess
from experiments.configs import tiny


@pytest.fixture(scope="module")
def dataset():
  return builders.load(tiny.get_config("sasrec").data)


def test_cold_items_are_deterministic():
  a = cold_start.cold_items(40, 0.25, seed=0)
  assert len(a) == 10 and a.min() >= 1 and a.max() <= 40 and len(set(a)) == 10
  np.testing.assert_array_equal(a, cold_start.cold_items(40, 0.25, seed=0))
  assert not np.array_equal(a, cold_start.cold_items(40, 0.25, seed=1))
  assert len(cold_start.cold_items(40, 0.0, seed=0)) == 0
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="data.cold_start_fraction"):
      cold_start.cold_items(40, bad, seed=0)


def test_withhold():
  is_cold = np.zeros(10, bool)
  is_cold[[2, 5]] = True
  np.testing.assert_array_equal(cold_start.withhold(np.array([1, 2, 3, 5, 4]), is_cold),
                                [1, 3, 5, 4])  # held-out items stay, cold or not
  np.testing.assert_array_equal(cold_start.withhold(np.array([2, 5, 1]), is_cold), [1])
  np.testing.assert_array_equal(cold_start.withhold(np.array([2, 1]), is_cold), [1])


def test_split_keeps_cold_items_out_of_training(dataset):
  assert cold_start.split(dataset, 0.0, seed=0) is dataset
  cold_data = cold_start.split(dataset, 0.25, seed=0)
  cold = set(cold_data.withheld_items.tolist())
  assert len(cold) == 10
  targets = set()
  for user in range(dataset.num_users):
    before = np.asarray(dataset.source[user]["item_seq"])
    after = np.asarray(cold_data.source[user]["item_seq"])
    assert cold_data.lengths[user] == len(after)
    assert not cold & set(preprocess.split_train(after).tolist())
    if len(after) >= 3:
      np.testing.assert_array_equal(after[-2:], before[-2:])
      targets |= set(after[-2:].tolist())
  assert cold & targets  # cold items are still asked for
  counts = pipeline.train_item_counts(cold_data)
  assert not counts[sorted(cold)].any()
  batches = pipeline.train_batches(cold_data, task="autoregressive", max_len=10,
                                   global_batch_size=16, num_negatives=3, seed=0, epoch=0)
  for batch in batches:
    for key in ("item_seq", "targets", "negatives"):
      assert not cold & set(np.unique(batch[key]).tolist()), key
  with pytest.raises(ValueError, match="window"):
    cold_start.split(dataset, 0.25, seed=0, task="window")


def test_metrics_by_target_kind(dataset):
  cold_data = cold_start.split(dataset, 0.25, seed=0)
  config = tiny.get_config("sasrec")
  trainer = train.Trainer(config, dataset)
  params = trainer.init_state()["params"]
  batches = list(pipeline.eval_batches(cold_data, split="test", task="autoregressive",
                                       max_len=10, batch_size=32, num_sampled_negatives=5))
  step = evaluate.make_eval_step(trainer.model, dataset.num_items, (5, 10),
                                 cold_items=cold_data.withheld_items)
  result = evaluate.evaluate(step, params, batches)
  plain = evaluate.evaluate(evaluate.make_eval_step(trainer.model, dataset.num_items, (5, 10)),
                            params, batches)
  assert result["cold/count"] + result["warm/count"] == result["count"] == plain["count"]
  is_cold = np.isin(np.concatenate([b["target"] for b in batches]), cold_data.withheld_items)
  weight = np.concatenate([b["weight"] for b in batches])
  assert result["cold/count"] == float((weight * is_cold).sum()) > 0
  for name in ("ndcg@10", "hr@5", "sampled_mrr@10"):
    assert result[name] == pytest.approx(plain[name], abs=1e-6)
    mixed = (result["cold/" + name] * result["cold/count"]
             + result["warm/" + name] * result["warm/count"]) / result["count"]
    assert mixed == pytest.approx(result[name], abs=1e-6)



@pytest.mark.slow  # ~10 s
def test_id_plus_image_starts_cold_rows_at_zero(dataset):
  config = tiny.get_config("sasrec")
  config.model.update(item_encoder="id+image", image_channels=(3,), image_dense=4)
  config.data.images.size = 8
  config.data.cold_start_fraction = 0.25
  trainer = train.Trainer(config, dataset)
  table = np.asarray(trainer.init_state()["params"]["item_embed"]["embedding"])
  cold = trainer.dataset.withheld_items
  assert not table[cold].any()
  warm = np.setdiff1d(np.arange(1, dataset.num_items + 1), cold)
  assert (np.abs(table[warm]).sum(1) > 0).all()
