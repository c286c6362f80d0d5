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
  for split in ("valid", "test"):
    for name in ("logloss", "auc", "accuracy", "count", "ranked_count", "ndcg@10", "hr@10"):
      assert f"{split}/{name}" in result
  assert result["test/count"] == 2 * 64 and result["test/ranked_count"] == 64
  assert not any("/cold/" in key for key in result)  # no cold start here


def _small_model(dataset, **fields):
  return ctr_model.Model(num_items=dataset.num_items, num_users=0, max_len=6, dim=8,
                         hidden=(16,), image_channels=(4, 8), image_dense=16, **fields)


@pytest.mark.parametrize("use_id", [False, True])
def test_rank_logits_are_the_pairwise_logits(data, use_id):
  """``rank_logits`` over the catalogue's vectors = ``__call__`` on every (user, item) pair."""
  dataset, pictures = data
  model = _small_model(dataset, use_id=use_id)
  rng = np.random.default_rng(3)
  history = rng.integers(0, dataset.num_items + 1, size=(3, 6)).astype(np.int32)
  items = np.arange(dataset.num_items + 1, dtype=np.int32)
  params = model.init(jax.random.key(0), history[:1], items[:1], pictures[:1])["params"]
  params = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(x.dtype), params)
  vectors = model.apply({"params": params}, items, pictures, method="encode_items")
  ranked = np.asarray(model.apply({"params": params}, history, vectors, method="rank_logits"))
  pairwise = np.stack([np.asarray(model.apply({"params": params}, np.repeat(row[None], len(items),
                                                                           0), items, pictures))
                       for row in history])
  assert ranked.shape == (3, dataset.num_items + 1)
  np.testing.assert_allclose(ranked, pairwise, rtol=1e-5, atol=1e-5)


def test_rank_evaluation_matches_numpy_ranking(data):
  """Full ranking of the click logits: HR/NDCG@10 against a NumPy ranking, warm and cold."""
  dataset, pictures = data
  config = tiny.get_config("sasrec")
  config.data.max_len = 6
  config.eval.num_sampled_negatives = 0
  model = _small_model(dataset)
  items = np.arange(dataset.num_items + 1, dtype=np.int32)
  params = model.init(jax.random.key(1), np.zeros((1, 6), np.int32), items[:1],
                      pictures[:1])["params"]
  got = ctr.rank_evaluation(model, params, dataset, pictures, config, "test")
  vectors = model.apply({"params": params}, items, pictures, method="encode_items")
  cold = set(np.asarray(dataset.withheld_items).tolist())
  ndcg = {"warm": [], "cold": []}
  for user in range(dataset.num_users):
    seq = np.asarray(dataset.source[user]["item_seq"])
    history, target = seq[:-1], int(seq[-1])
    row = np.zeros((1, 6), np.int32)
    row[0, 6 - min(6, len(history)):] = history[-6:]
    logits = np.asarray(model.apply({"params": params}, row, vectors,
                                    method="rank_logits"))[0].astype(np.float64)
    left_out = ({0} | set(history.tolist())) - {target}
    rank = sum(logits[j] >= logits[target] for j in range(len(logits))
               if j != target and j not in left_out)
    ndcg["cold" if target in cold else "warm"].append(1 / np.log2(rank + 2) if rank < 10 else 0)
  assert got["count"] == dataset.num_users and got["cold/count"] == len(ndcg["cold"]) > 0
  np.testing.assert_allclose(got["ndcg@10"], np.mean(ndcg["warm"] + ndcg["cold"]), rtol=1e-5)
  for side in ("warm", "cold"):
    np.testing.assert_allclose(got[f"{side}/ndcg@10"], np.mean(ndcg[side]), rtol=1e-5)


def test_pair_metrics_split_warm_and_cold(data):
  """Held-out pairs of a cold click (and its negatives) are ``cold/``; AUC per side."""
  dataset, pictures = data
  test = ctr.make_pairs(dataset, split="test", max_len=6, num_negatives=3, seed=0)
  withheld = np.isin(test.candidate, dataset.withheld_items)
  np.testing.assert_array_equal(test.cold[test.label > 0.5], withheld[test.label > 0.5])
  assert test.cold.any() and not test.cold.all()
  model = _small_model(dataset)
  params = model.init(jax.random.key(2), test.history[:1], test.candidate[:1],
                      pictures[:1])["params"]
  result = ctr.evaluate(model, params, test, pictures)
  logits = ctr.predict(model, params, test, pictures)
  for side, rows in (("cold", test.cold), ("warm", ~test.cold)):
    assert result[f"{side}/count"] == rows.sum()
    assert result[f"{side}/auc"] == pytest.approx(_auc_reference(logits[rows], test.label[rows]))
  assert not ctr.make_pairs(dataset, split="train", max_len=6, seed=0).cold.any()


def test_ablation_runner_trains_ctr_points(tmp_path):
  """A 'ctr' point goes to ctr.train_and_evaluate: config.json and strict final_metrics.json."""
  import json  # pylint: disable=g-import-not-at-top

  from deeprec_jax.ablation import run as ablation_run  # pylint: disable=g-import-not-at-top
  from experiments.configs import ctr as ctr_config  # pylint: disable=g-import-not-at-top

  config = ctr_config.get_config()
  config.data = tiny.get_config("sasrec").data
  config.data.images.size = 12
  config.data.max_len = 6
  config.data.cold_start_fraction = 0.2
  config.model.update(dim=8, hidden=(8,), image_channels=(4,), image_dense=8)
  config.train.update(num_steps=3, batch_size=32)
  result = ablation_run.run_point(config, str(tmp_path), {"label": "CTR", "seed": 0})
  assert result["status"] == "ok", result
  final = json.loads((tmp_path / "final_metrics.json").read_text(),
                     parse_constant=lambda name: pytest.fail(f"non-strict JSON: {name}"))
  for key in ("test/auc", "test/cold/auc", "test/warm/auc", "test/ndcg@10",
              "test/cold/ndcg@10", "test/warm/hr@10", "best_step"):
    assert key in final, key
  assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "ctr"
