"""The click-through task: pairs, metrics against float64 references, a small fit."""

import jax
import numpy as np
import pytest

from deeprec_jax import ctr
from deeprec_jax.data import builders, cold_start, images
from deeprec_jax.models import ctr as ctr_model
from experiments.configs import tiny


def _auc_reference(scores, labels):
  pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
  wins = (pos[:, None] > neg[None]).astype(np.float64) + 0.5 * (pos[:, None] == neg[None])
  return wins.mean()


def test_metrics_match_references():
  rng = np.random.default_rng(0)
  logits = np.round(rng.normal(size=200), 1)  # rounded: ties happen
  labels = (rng.random(200) < 0.4).astype(np.float32)
  got = ctr.metrics(logits.astype(np.float32), labels)
  assert got["auc"] == pytest.approx(_auc_reference(logits, labels), abs=1e-12)
  p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  logloss = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean()
  assert got["logloss"] == pytest.approx(logloss, rel=1e-6)
  assert got["accuracy"] == pytest.approx(((p > 0.5) == (labels > 0.5)).mean())
  assert np.isnan(ctr.auc(np.ones(3), np.ones(3)))


@pytest.fixture(scope="module")
def data():
  config = tiny.get_config("sasrec").data
  config.images.size = 12
  dataset = cold_start.split(builders.load(config), 0.2, seed=0)
  return dataset, images.load(config, dataset).images


def test_pairs(data):
  dataset, _ = data
  pairs = ctr.make_pairs(dataset, split="train", max_len=6, num_negatives=2, seed=0)
  again = ctr.make_pairs(dataset, split="train", max_len=6, num_negatives=2, seed=0)
  np.testing.assert_array_equal(pairs.candidate, again.candidate)
  assert pairs.history.shape == (len(pairs), 6)
  assert abs(pairs.label.mean() - 1 / 3) < 0.02
  assert not np.isin(pairs.candidate, dataset.withheld_items).any()
  test = ctr.make_pairs(dataset, split="test", max_len=6, seed=0)
  assert test.label.sum() == dataset.num_users and len(test) == 2 * dataset.num_users
  with pytest.raises(ValueError, match="split"):
    ctr.make_pairs(dataset, split="nope", max_len=6)


def test_fit_beats_chance(data):
  dataset, pictures = data
  model = ctr_model.Model(num_items=dataset.num_items, num_users=0, max_len=6, dim=8,
                          hidden=(16,), image_channels=(4, 8), image_dense=16)
  pairs = ctr.make_pairs(dataset, split="train", max_len=6, num_negatives=1, seed=0)
  params, losses = ctr.train(model, pairs, pictures, num_steps=150, batch_size=64,
                             learning_rate=3e-3)
  assert np.mean(losses[-20:]) < np.mean(losses[:20])
  result = ctr.evaluate(model, params, ctr.make_pairs(dataset, split="test", max_len=6,
                                                      seed=1), pictures)
  assert result["count"] == 2 * dataset.num_users
  assert result["auc"] > 0.6 and result["logloss"] < 0.69, result
  assert jax.tree.leaves(params)


@pytest.mark.slow  # A second compile of the whole model (~25 s of CPU).
def test_run_from_config():
  from experiments.configs import ctr as ctr_config

  config = ctr_config.get_config()
  config.data = tiny.get_config("sasrec").data
  config.data.images.size = 12
  config.data.max_len = 6
  config.model.update(dim=8, hidden=(8,), image_channels=(4,), image_dense=8, use_id=True)
  config.train.update(num_steps=5, batch_size=32)
  result = ctr.run(config)
  assert set(result) == {"train/final_loss"} | {f"{split}/{name}" for split in ("valid", "test")
                                                for name in ("logloss", "auc", "accuracy",
                                                             "count")}
  assert result["test/count"] == 2 * 64
