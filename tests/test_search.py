"""The Optuna search: space, pruning, resume after a kill, the best config with seeds.

Most tests use ``fake_train``, which writes validation rows through the real
``MetricWriter`` (so pruning sees them) and final metrics whose test values
differ from the validation ones (so a test metric used as the objective would
show). ``test_tiny_search_through_the_binary`` trains for real (``-m slow``).
"""

import math
import os
import subprocess
import sys

import ml_collections
import pytest

from deeprec_jax import models, writers
from deeprec_jax.ablation import executors, plan, report, search
from experiments.configs.ablations import search_tiny

optuna = pytest.importorskip("optuna")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "experiments/configs/tiny.py:sasrec"
SPACE = "experiments/configs/ablations/search_tiny.py"


def _valid_value(config: ml_collections.ConfigDict) -> float:
  """Peaks at learning rate 1e-2, one block, additive attention."""
  lr = config.train.learning_rate
  return (1.0 - abs(math.log10(lr) + 2.0) / 2 - 0.1 * (config.model.num_blocks - 1)
          + 0.05 * (config.model.attention == "additive"))


def fake_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  value = _valid_value(config)
  writer = writers.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, "valid", {"ndcg@10": value * step / 3})
  writer.close()
  results = {f"valid/{m}": value for m in ("hr@10", "ndcg@10", "mrr@10")}
  # Test metrics favour the opposite config: the objective must never read them.
  results.update({f"test/{m}": 1.0 - value + 0.01 * config.seed
                  for m in ("hr@10", "ndcg@10", "mrr@10")})
  results["best_step"] = 3
  plan.write_json(os.path.join(workdir, plan.FINAL_METRICS), results)
  return results


def _space(**changes) -> ml_collections.ConfigDict:
  config = search_tiny.get_config()
  for key, value in changes.items():
    setattr(config, key, value)
  return config


def _load(workdir) -> "optuna.Study":
  return optuna.load_study(study_name="search", storage=search.storage_url(str(workdir)))


# ----------------------------------------------------------------------------
# Space files.


def test_space_parses_ranges_ints_and_choices():
  params = {p.key: p for p in search.parse_space(_space())}
  lr, blocks, attention = (params[k].distribution() for k in
                           ("train.learning_rate", "model.num_blocks", "model.attention"))
  assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log
  assert isinstance(blocks, optuna.distributions.IntDistribution)
  assert (blocks.low, blocks.high) == (1, 2)
  assert attention.choices == ("dot_product", "additive")


def test_the_ml1m_best_space_builds_a_model_at_each_end():
  """search_ml1m_best: every parameter's ends (with the fixed overrides) make a valid SASRec."""
  space = plan.load_config("experiments/configs/ablations/search_ml1m_best.py")
  params = search.parse_space(space)
  base = plan.load_config("experiments/configs/sasrec.py:ml-1m")
  fixed = plan.flatten(space.overrides, skip_none=True)
  for end in (0, -1):
    values = {p.key: (p.choices[end] if p.choices else (p.low if end == 0 else p.high))
              for p in params}
    config = plan.apply_overrides(base, {**fixed, **values})
    assert config.train.loss == "softmax" and config.model.init_std == 0.02
    models.create_model(config.model, num_items=20, num_users=3, max_len=config.data.max_len)


@pytest.mark.parametrize("space,message", [
    ((("train.learning_rate", {"low": 1.0, "high": 0.1}),), "low < high"),
    ((("model.attention", {"choices": ()}),), "non-empty"),
    ((("model.attention", {"values": (1,)}),), "unknown field"),
    ((), "at least one"),
])
def test_bad_spaces_are_refused(space, message):
  with pytest.raises(ValueError, match=message):
    search.parse_space(_space(space=space))


def test_unknown_keys_fail_before_any_trial(tmp_path):
  space = _space(space=(("model.atention", {"choices": ("additive",)}),))
  with pytest.raises(ValueError, match="model.atention"):
    search.run_search(BASE, space, str(tmp_path), 2, train_fn=fake_train)
  assert not os.path.exists(tmp_path / "study.db")
  fixed = _space()
  fixed.overrides.train.learning_rate = 0.1
  with pytest.raises(ValueError, match="both searched and fixed"):
    search.run_search(BASE, fixed, str(tmp_path), 2, train_fn=fake_train)


# ----------------------------------------------------------------------------
# Searches with the fake train function.


def test_search_objective_is_the_validation_metric_and_best_gets_seeds(tmp_path):
  outcome = search.run_search(BASE, _space(), str(tmp_path), 4, train_fn=fake_train)
  study = _load(tmp_path)
  assert len(study.trials) == 4
  for trial in study.trials:
    if trial.state == optuna.trial.TrialState.COMPLETE:
      config = plan.apply_overrides(plan.load_config(BASE), trial.params)
      assert trial.value == pytest.approx(_valid_value(config))
      assert os.path.exists(tmp_path / "trials" / f"trial_{trial.number:04d}" / "point.json")
  assert outcome.best_value == pytest.approx(study.best_value)
  assert outcome.best_params == study.best_params
  # The best config, with every final seed, on the test split (the only test metrics).
  assert [row["seed"] for row in outcome.final_rows] == [0, 1, 2]
  for row in outcome.final_rows:
    assert row["status"] == "ok" and row["split"] == "test"
    assert row["ndcg@10"] == pytest.approx(1.0 - study.best_value + 0.01 * row["seed"])
  final = tmp_path / "final" / f"best_trial_{study.best_trial.number:04d}"
  table = (final / "table.md").read_text()
  assert "search budget: 4 trials of at most 2 epochs" in table
  assert "objective valid ndcg@10" in table and "over 3 seeds (0, 1, 2)" in table
  assert len(report.read_csv(str(tmp_path / "trials.csv"))) == 4
  assert "Trials (validation only)" in (tmp_path / "search.md").read_text()


def test_pruner_stops_a_trial_at_a_validation_row(tmp_path):
  space = _space()
  params = search.parse_space(space)
  distributions = {p.key: p.distribution() for p in params}
  url = search.storage_url(str(tmp_path))
  study = optuna.create_study(storage=search.open_storage(url), study_name="search",
                              direction="maximize")
  for value in (0.9, 0.8):
    study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": 1e-2, "model.num_blocks": 1,
                "model.attention": "additive"},
        distributions=distributions, value=value,
        intermediate_values={1: value, 2: value, 3: value}))
  trial = study.ask(distributions)
  config = plan.apply_overrides(plan.load_config(BASE), {"train.learning_rate": 1e-3})
  train = search.PruningTrain(url, "search", trial._trial_id, "ndcg@10",  # noqa: SLF001
                              {"n_startup_trials": 2}, fake_train)
  with pytest.raises(search.Pruned, match="pruned at step 1"):
    train(config, str(tmp_path / "trial"))
  assert study.trials[-1].intermediate_values == {1: pytest.approx(_valid_value(config) / 3)}
  # The writer is restored: nothing reports outside a trial.
  fake_train(config, str(tmp_path / "after"))


def test_killed_search_resumes_the_same_study(tmp_path):
  calls = []

  def killed_on_second_trial(config, workdir):
    calls.append(workdir)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the search is killed while trial 1 trains
    return fake_train(config, workdir)

  with pytest.raises(KeyboardInterrupt):
    search.run_search(BASE, _space(), str(tmp_path), 3, train_fn=killed_on_second_trial)
  study = _load(tmp_path)
  assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
  interrupted = study.trials[1].params

  resumed = []

  def counting(config, workdir):
    resumed.append(workdir)
    return fake_train(config, workdir)

  search.run_search(BASE, _space(), str(tmp_path), 3, train_fn=counting)
  study = _load(tmp_path)
  assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
  assert study.trials[1].params == interrupted  # the same trial, finished
  assert resumed[:2] == [str(tmp_path / "trials" / "trial_0001"),
                         str(tmp_path / "trials" / "trial_0002")]
  assert len(resumed) == 2 + 3  # two trials, then the best config's three seeds

  # A third invocation with a larger budget continues the same study.
  search.run_search(BASE, _space(), str(tmp_path), 4, train_fn=fake_train)
  assert [t.number for t in _load(tmp_path).trials] == [0, 1, 2, 3]


@pytest.mark.slow  # ~14 s; the executors have their own tests.
def test_concurrent_trials_go_through_an_executor(tmp_path):
  executor = executors.LocalExecutor(parallel=2)  # spawned processes
  outcome = search.run_search(BASE, _space(final_seeds=(0,)), str(tmp_path), 2,
                              executor=executor, concurrent=2, train_fn=fake_train)
  study = _load(tmp_path)
  assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
  # Both trials reported their validation rows from their worker processes.
  assert all(t.intermediate_values.keys() == {1, 2, 3} for t in study.trials)
  assert [row["seed"] for row in outcome.final_rows] == [0]


# ----------------------------------------------------------------------------
# The real tiny search, through the binary.


@pytest.mark.slow  # 3 trials + 2 seeds of real training (~4 compiles): 1-4 minutes
def test_tiny_search_through_the_binary(tmp_path):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "search"
  command = [sys.executable, "-m", "experiments.search", f"--config={BASE}",
             f"--space={SPACE}", f"--workdir={workdir}", "--trials=3",
             "--space.overrides.train.num_epochs=1", "--space.final_seeds=(0, 1)"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  study = _load(workdir)
  assert len(study.trials) == 3
  assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
  best = study.best_trial
  trial_final = plan.read_json(str(workdir / "trials" / f"trial_{best.number:04d}" /
                                   plan.FINAL_METRICS))
  assert best.value == pytest.approx(trial_final["valid/ndcg@10"])
  final = workdir / "final" / f"best_trial_{best.number:04d}"
  rows = report.read_csv(str(final / "results.csv"))
  assert [(r["seed"], r["status"], r["split"]) for r in rows] == [("0", "ok", "test"),
                                                                  ("1", "ok", "test")]
  point = plan.read_json(os.path.join(rows[0]["workdir"], plan.POINT_FILE))["config"]
  for key, value in best.params.items():
    assert plan.get_value(point, key) == value
  assert "search budget: 3 trials of at most 1 epochs" in result.stdout
  assert "| best (trial" in result.stdout
