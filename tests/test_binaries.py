"""The evaluate and recommend binaries on a tiny trained run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deeprec_jax import evaluate, recommend, train
from deeprec_jax.data import pipeline
from experiments.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny.get_config("sasrec"), workdir)
  return workdir


def _run(*args):
  env = dict(os.environ, XLA_FLAGS="")  # one device is enough here
  result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_evaluate_binary_matches_the_final_metrics(workdir):
  out = json.loads(_run("experiments.evaluate", f"--workdir={workdir}", "--split=test"))
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    final = json.load(f)
  assert out["step"] == final["best_step"]
  for name in ("hr@10", "ndcg@10", "mrr@10", "sampled_hr@10"):
    np.testing.assert_allclose(out[name], final[f"test/{name}"], rtol=1e-5, err_msg=name)
  assert os.path.exists(os.path.join(workdir, "eval_test.json"))


def test_recommend_returns_unseen_items_in_original_ids(workdir, tmp_path):
  trainer, params, _ = train.load_trained(workdir)
  item_ids = trainer.dataset.item_ids
  history = [int(i) for i in item_ids[[3, 7, 5]]]
  out = _run("experiments.recommend", f"--workdir={workdir}",
             f"--history={','.join(map(str, history))}", "--top_k=5")
  top = json.loads(out.splitlines()[-1])["recommendations"]
  items = [r["item"] for r in top]
  assert len(items) == 5 and not set(items) & set(history)
  assert set(items) <= set(int(i) for i in item_ids[1:])
  scores = [r["score"] for r in top]
  assert scores == sorted(scores, reverse=True)

  # Batch mode gives one line per history, the same answer for the same history.
  histories = tmp_path / "histories.txt"
  histories.write_text(f"{','.join(map(str, history))}\n\n{history[0]} {history[1]}\n")
  lines = _run("experiments.recommend", f"--workdir={workdir}",
               f"--histories_file={histories}", "--top_k=5").strip().splitlines()
  assert len(lines) == 2
  assert [r["item"] for r in json.loads(lines[0])["recommendations"]] == items


def test_recommendations_are_the_models_top_scores(workdir):
  trainer, params, _ = train.load_trained(workdir)
  history = np.array([3, 7, 5])
  top = recommend.recommend(trainer, params, [history], top_k=4, exclude_seen=False)[0]
  item_seq = np.zeros((1, trainer.config.data.max_len), np.int32)
  item_seq[0, -3:] = history
  scores = np.array(jax.device_get(evaluate.score_items(
      trainer.model, params, trainer.dataset.num_items, item_seq)))[0]
  scores[0] = -np.inf
  expected = np.argsort(-scores, kind="stable")[:4]
  assert [item for item, _ in top] == [int(trainer.dataset.item_ids[i]) for i in expected]


def test_unknown_history_items_are_named(workdir):
  trainer, _, _ = train.load_trained(workdir)
  with pytest.raises(ValueError, match="999999"):
    recommend.encode_history([int(trainer.dataset.item_ids[1]), 999999],
                             trainer.dataset.item_ids)


def test_recommend_for_a_known_user(workdir):
  """--user alone: the history is the user's whole sequence, all of it excluded."""
  trainer, _, _ = train.load_trained(workdir)
  dataset = trainer.dataset
  user_id = int(dataset.user_ids[5])
  out = json.loads(_run("experiments.recommend", f"--workdir={workdir}", f"--user={user_id}",
                        "--top_k=5", "--show_history").splitlines()[-1])
  expected = [int(dataset.item_ids[i]) for i in dataset.source[5]["item_seq"]]
  assert out["user"] == user_id and out["history"] == expected
  items = [r["item"] for r in out["recommendations"]]
  assert len(items) == 5 and not set(items) & set(expected)
  with pytest.raises(ValueError, match="user id -7"):
    recommend.encode_user(-7, dataset.user_ids)


def test_recommend_passes_user_ids_to_caser():
  """Caser is personalized: recommendations use the user's embedding."""
  config = tiny.get_config("caser")
  trainer = train.Trainer(config, train.builders.load(config.data))
  params = trainer.init_state()["params"]
  history = np.array([3, 7, 5, 2, 9])
  tops = [recommend.recommend(trainer, params, [history], top_k=3, exclude_seen=False,
                              users=[user])[0] for user in (0, 1)]
  for user, top in zip((0, 1), tops, strict=True):
    item_seq = pipeline.eval_input(history, task=trainer.task, max_len=config.data.max_len,
                                   num_items=trainer.dataset.num_items)[None]
    scores = np.array(jax.device_get(evaluate.score_items(
        trainer.model, params, trainer.dataset.num_items, item_seq,
        user=np.array([user], np.int32))))[0]
    scores[0] = -np.inf
    expected = np.argsort(-scores, kind="stable")[:3]
    assert [item for item, _ in top] == [int(trainer.dataset.item_ids[i]) for i in expected]
  with pytest.raises(ValueError, match="user"):
    recommend.recommend(trainer, params, [history], top_k=3)
