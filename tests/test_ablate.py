"""The ablation runner: expansion, resume, failures, tables and plots.

Most tests use ``fake_train`` (deterministic metrics, no JAX); the ``tiny_sweep``
fixture trains the real 2 x 2 x 2-seed tiny grid once, through the binary,
with a persistent compilation cache that the failing-point test reuses.
"""

import json
import math
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from deeprec_jax import workdir as workdir_lib
from deeprec_jax.ablation import plan, publish, report, run
from experiments.configs.ablations import tiny_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join("experiments", "configs", "ablations")
METRICS = ("hr@10", "ndcg@10", "mrr@10")


def fake_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stands in for train.train_and_evaluate: metrics from the config, no JAX."""
  if config.model.attention not in ("dot_product", "additive"):
    raise ValueError(f"config key model.attention={config.model.attention!r}; expected "
                     "dot_product or additive.")
  value = (0.1 * config.model.num_blocks + 0.05 * (config.model.attention == "additive")
           + 0.01 * config.seed)
  results = {f"{split}/{name}": value + (0.5 if split == "valid" else 0.0)
             for split in ("valid", "test") for name in (*METRICS, "hr@20")}
  results["best_step"] = 4
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
    json.dump(results, f)
  return results


def _counting(calls: list) -> run.TrainFn:
  def train_fn(config, workdir):
    calls.append(workdir)
    return fake_train(config, workdir)
  return train_fn


def _tiny(epochs: int = 1) -> ml_collections.ConfigDict:
  config = tiny_grid.get_config()
  config.overrides.train.num_epochs = epochs
  return config


def _points_config(*points, seeds=(0,)) -> ml_collections.ConfigDict:
  config = _tiny()
  config.axes = ()
  config.points = tuple(points)
  config.seeds = seeds
  return config


def _cli_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  # One CPU device: the tiny runs need no data parallelism, and the all-reduce
  # over forced host devices only costs time here.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", ""))
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _ablate(*args: str, cache_dir: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "experiments.ablate", *args], cwd=REPO,
                        env=_cli_env(cache_dir), capture_output=True, text=True, timeout=timeout)


def _parse_markdown(path: str) -> list[list[str]]:
  """Body rows of the markdown table, cells stripped of bold markers."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f.read().splitlines() if line.startswith("|")]
  return [[cell.strip().strip("*") for cell in line.strip("|").split("|")] for line in lines[2:]]


# ----------------------------------------------------------------------------
# Expansion and configs (no training).


def test_grid_expands_in_axis_order_with_seeds_inner():
  points = plan.expand_points(_tiny())
  assert len(points) == 8
  assert [(p.label, p.seed) for p in points[:3]] == [
      ("attention=dot_product, num_blocks=1", 0), ("attention=dot_product, num_blocks=1", 1),
      ("attention=dot_product, num_blocks=2", 0)]
  assert points[-1].values == {"model.attention": "additive", "model.num_blocks": 2}
  assert points[-1].overrides == {"model.attention": "additive", "model.num_blocks": 2,
                                  "train.num_epochs": 1}
  assert {p.base for p in points} == {"experiments/configs/tiny.py:sasrec"}
  config = plan.build_config(points[-1])
  assert (config.model.attention, config.model.num_blocks, config.seed) == ("additive", 2, 1)
  assert config.train.num_epochs == 1


def test_explicit_points_switch_base_and_overrides_win():
  families = plan.load_config(f"{ABLATIONS}/families.py")
  points = plan.expand_points(families)
  models = [plan.build_config(p).model.name for p in points]
  assert models == ["popularity", "caser", "rnn", "sasrec", "sasrec", "bert4rec"]
  # The placeholder override is unset: each family keeps its own budget...
  assert plan.build_config(points[1]).train.num_epochs == 10
  assert plan.build_config(points[3]).train.num_epochs == 200
  assert plan.build_config(points[3]).data.max_len == 200  # ML-1M setting
  # ...until the command line sets it for every point.
  families.overrides.train.num_epochs = 1
  assert {plan.build_config(p).train.num_epochs
          for p in plan.expand_points(families)} == {1}


@pytest.mark.parametrize("name,count", [("families", 6), ("attention", 36), ("rnn_cell", 18),
                                        ("caser", 9), ("loss", 9), ("tiny_grid", 8),
                                        ("leaderboard", 12), ("leaderboard.py:ml-1m-chrono", 3),
                                        ("hstu_time", 6)])
def test_every_shipped_ablation_builds_every_run(tmp_path, name, count):
  path = f"{ABLATIONS}/{name}" if ".py" in name else f"{ABLATIONS}/{name}.py"
  runs = plan.plan_runs(plan.load_config(path), str(tmp_path))
  assert len(runs) == count
  assert len({r.workdir for r in runs}) == count
  for r in runs:
    for key, value in r.point.values.items():
      if key != "base":
        assert plan.get_value(r.config, key) == value, (r.point.label, key)


def test_loss_points_pair_negatives_with_loss(tmp_path):
  runs = plan.plan_runs(plan.load_config(f"{ABLATIONS}/loss.py"), str(tmp_path))
  pairs = {(r.config.train.loss, r.config.train.num_negatives) for r in runs}
  assert pairs == {("bce", 1), ("sampled_softmax", 100), ("softmax", 1)}


def test_apply_overrides_sets_keys_and_names_unknown_ones():
  base = plan.load_config("experiments/configs/tiny.py:sasrec")
  config = plan.apply_overrides(base, {"model.num_blocks": 3, "eval.ks": [1, 10]})
  assert config.model.num_blocks == 3 and config.eval.ks == (1, 10)
  assert base.model.num_blocks == 1  # the base is not modified
  with pytest.raises(ValueError, match=r"'model\.atention'.*Did you mean model\.attention"):
    plan.apply_overrides(base, {"model.atention": "additive"})
  with pytest.raises(ValueError, match=r"'modle\.attention'.*'modle' is not a section"):
    plan.apply_overrides(base, {"modle.attention": "additive"})
  with pytest.raises(ValueError, match=r"'model\.num_blocks' cannot be set to 'two'"):
    plan.apply_overrides(base, {"model.num_blocks": "two"})


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c, "points", ({"label": "a"},)), "exactly one of"),
    (lambda c: setattr(c, "axes", (("model.num_blocks", (1, 2)), ("model.num_blocks", (3,)))),
     "more than once"),
    (lambda c: setattr(c, "seeds", ()), "seeds"),
    (lambda c: setattr(c, "metrics", ("ndcg@50",)), "eval.ks"),
    (lambda c: setattr(c, "split", "train"), "split"),
])
def test_bad_ablation_configs_fail_at_planning(tmp_path, change, message):
  config = _tiny()
  change(config)
  with pytest.raises(ValueError, match=message):
    plan.plan_runs(config, str(tmp_path))


def test_axis_fixed_in_overrides_is_refused(tmp_path):
  config = _tiny()
  config.overrides.model = ml_collections.ConfigDict({"num_blocks": 2})
  with pytest.raises(ValueError, match="'model.num_blocks' is both an axis and fixed"):
    plan.plan_runs(config, str(tmp_path))


def test_duplicate_point_labels_are_refused(tmp_path):
  config = _points_config({"label": "x", "model.num_blocks": 1},
                          {"label": "x", "model.num_blocks": 2})
  with pytest.raises(ValueError, match="duplicate labels"):
    plan.plan_runs(config, str(tmp_path))


def test_unknown_axis_key_fails_before_training(tmp_path):
  config = _tiny()
  config.axes = (("model.atention", ("dot_product", "additive")),)
  calls = []
  with pytest.raises(ValueError, match="model.atention"):
    run.run_ablation(config, str(tmp_path / "sweep"), train_fn=_counting(calls))
  assert not calls and not os.path.exists(tmp_path / "sweep")

  result = _ablate(f"--config={ABLATIONS}/tiny_grid.py", f"--workdir={tmp_path / 'cli'}",
                   "--config.axes=(('model.atention', ('additive',)),)",
                   cache_dir=str(tmp_path / "cache"), timeout=120)
  assert result.returncode != 0
  assert "model.atention" in result.stderr
  assert not os.path.exists(tmp_path / "cli" / "runs")


def test_report_only_tables_the_finished_runs_and_trains_nothing(tmp_path):
  config = _points_config({"label": "a"}, {"label": "b"})
  workdir = str(tmp_path / "sweep")
  calls = []
  run.run_ablation(config, workdir, train_fn=_counting(calls))  # both points, once
  assert len(calls) == 2
  config.points = ({"label": "a"}, {"label": "b"}, {"label": "c"})
  outcome = run.run_ablation(config, workdir, report_only=True, train_fn=_counting(calls))
  assert len(calls) == 2  # nothing new trained
  assert [row["status"] for row in outcome.rows] == ["ok", "ok", "todo"]
  with open(os.path.join(workdir, "table.md"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines[4] == "| c | todo | todo | todo |", lines


def test_publish_copies_the_report_and_only_finished_runs_small_files(tmp_path):
  config = _points_config({"label": "a"}, {"label": "b"})
  workdir = str(tmp_path / "sweep")
  run.run_ablation(config, workdir, train_fn=fake_train)
  runs = plan.plan_runs(config, workdir)
  finished, unfinished = (r.workdir for r in runs)
  os.remove(os.path.join(unfinished, plan.FINAL_METRICS))  # now 'todo'
  os.makedirs(os.path.join(finished, "checkpoints", "4"))
  dest = tmp_path / "results"
  os.makedirs(dest / "superseded")
  (dest / "superseded" / "kept.json").write_text("{}")
  written = publish.publish(workdir, [r.workdir for r in runs], str(dest))
  name = os.path.basename(finished)
  assert {"table.md", "results.csv", "table.tex", f"runs/{name}/final_metrics.json",
          f"runs/{name}/point.json", f"runs/{name}/status.json"} <= set(written), written
  assert not any(os.path.basename(unfinished) in path or "checkpoints" in path
                 for path in written), written
  with open(dest / "runs" / name / plan.FINAL_METRICS, encoding="utf-8") as f:
    copied = json.load(f)
  assert copied == plan.read_json(os.path.join(finished, plan.FINAL_METRICS))
  assert "test/ndcg@10" in copied
  assert (dest / "superseded" / "kept.json").exists()
  with pytest.raises(FileNotFoundError, match="no report"):
    publish.publish(str(tmp_path / "empty"), [], str(dest))


def test_second_sweep_on_a_busy_workdir_is_refused_and_trains_nothing(tmp_path):
  workdir = str(tmp_path / "sweep")
  calls = []
  with workdir_lib.locked(workdir):  # stands in for a sweep already training there
    with pytest.raises(workdir_lib.WorkdirLockedError, match="in use by another run"):
      run.run_ablation(_tiny(), workdir, train_fn=_counting(calls))
    assert not calls
    # Reading the finished runs does not need the lock.
    run.run_ablation(_tiny(), workdir, report_only=True, train_fn=_counting(calls))
  assert not calls
  run.run_ablation(_tiny(), workdir, train_fn=_counting(calls))  # released: trains
  assert len(calls) == 8


def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path):
  calls = []
  outcome = run.run_ablation(_tiny(), str(tmp_path / "sweep"), dry_run=True,
                                  train_fn=_counting(calls))
  assert not calls and outcome.rows == [] and not os.path.exists(tmp_path / "sweep")
  assert outcome.text.count("_seed") == 8

  result = _ablate(f"--config={ABLATIONS}/tiny_grid.py", f"--workdir={tmp_path / 'cli'}",
                   "--dry_run", cache_dir=str(tmp_path / "cache"), timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  listed = [line for line in result.stdout.splitlines() if "_seed" in line]
  assert len(listed) == 8
  assert all(line.split()[0] == "todo" for line in listed)
  assert str(tmp_path / "cli" / "runs" / "attention=additive_num_blocks=2_seed1") in result.stdout
  assert not os.path.exists(tmp_path / "cli")


# ----------------------------------------------------------------------------
# Running with a fake train function.


def test_failed_point_is_recorded_and_retried_on_rerun(tmp_path):
  config = _points_config({"label": "good", "model.num_blocks": 2},
                          {"label": "broken", "model.attention": "linear"},
                          {"label": "additive", "model.attention": "additive"}, seeds=(0, 1))
  calls = []
  outcome = run.run_ablation(config, str(tmp_path), train_fn=_counting(calls))
  assert len(calls) == 6
  status = {(row["label"], row["seed"]): row["status"] for row in outcome.rows}
  assert status == {("good", 0): "ok", ("good", 1): "ok", ("broken", 0): "failed",
                    ("broken", 1): "failed", ("additive", 0): "ok", ("additive", 1): "ok"}
  broken = [row for row in outcome.rows if row["label"] == "broken"]
  assert all("model.attention='linear'" in row["error"] for row in broken)
  assert all(os.path.exists(os.path.join(row["workdir"], "error.txt")) for row in broken)
  assert "failed" in outcome.text  # the table cell of the point that never finished

  rerun_calls = []
  run.run_ablation(config, str(tmp_path), train_fn=_counting(rerun_calls))
  assert sorted(rerun_calls) == sorted(row["workdir"] for row in broken)


def test_parallel_runs_match_sequential_ones(tmp_path):
  config = _tiny()
  sequential = run.run_ablation(config, str(tmp_path / "seq"), train_fn=fake_train).rows
  parallel = run.run_ablation(config, str(tmp_path / "par"), parallel=2,
                                   train_fn=fake_train).rows
  assert [r["label"] for r in parallel] == [r["label"] for r in sequential]
  for name in METRICS:
    np.testing.assert_allclose([r[name] for r in parallel], [r[name] for r in sequential])
  assert all(r["status"] == "ok" for r in parallel)


def test_changed_config_in_the_same_workdir_is_refused(tmp_path):
  run.run_ablation(_tiny(), str(tmp_path), train_fn=fake_train)
  with pytest.raises(ValueError, match=r"train\.num_epochs: 1 -> 3"):
    run.run_ablation(_tiny(epochs=3), str(tmp_path), train_fn=fake_train)


def test_unfinished_run_resumes_with_a_new_patience_and_a_finished_one_refuses(tmp_path):
  def interrupted(config, workdir):
    raise RuntimeError("killed")  # stands in for a run stopped part-way
  config = _points_config({"label": "a"})
  run.run_ablation(config, str(tmp_path), train_fn=interrupted)
  config.overrides.train.patience = 10
  calls = []
  outcome = run.run_ablation(config, str(tmp_path), train_fn=_counting(calls))
  assert len(calls) == 1 and outcome.rows[0]["status"] == "ok"
  point = plan.read_json(os.path.join(calls[0], plan.POINT_FILE))
  assert point["config"]["train"]["patience"] == 10  # the record names the new value
  config.overrides.train.patience = 3
  with pytest.raises(ValueError, match=r"train\.patience: 10 -> 3"):
    run.run_ablation(config, str(tmp_path), train_fn=_counting(calls))


# ----------------------------------------------------------------------------
# Summaries, tables and plots on synthetic rows.


def _rows():
  rows = []
  for label, blocks, values in [("a", 1, [0.2, 0.4, 0.3]), ("b", 2, [0.5, 0.5, 0.5]),
                                ("c", 3, [0.1])]:
    for seed, value in enumerate(values):
      rows.append({"label": label, "model.num_blocks": blocks, "seed": seed, "status": "ok",
                   "hr@10": value, "ndcg@10": value / 2})
  rows.append({"label": "c", "model.num_blocks": 3, "seed": 1, "status": "failed",
               "error": "ValueError: boom"})
  rows.append({"label": "d", "model.num_blocks": 4, "seed": 0, "status": "failed"})
  return rows


def test_summarize_takes_mean_and_sample_std_of_finished_seeds():
  summaries = report.summarize(_rows(), ["hr@10", "ndcg@10"], ["model.num_blocks"])
  assert [s.label for s in summaries] == ["a", "b", "c", "d"]
  a, b, c, d = summaries
  assert a.mean["hr@10"] == pytest.approx(0.3)
  assert a.std["hr@10"] == pytest.approx(np.std([0.2, 0.4, 0.3], ddof=1))
  assert b.std["hr@10"] == pytest.approx(0.0)
  assert (c.num_runs, c.num_ok, c.count["hr@10"]) == (2, 1, 1) and math.isnan(c.std["hr@10"])
  assert d.num_ok == 0 and math.isnan(d.mean["hr@10"])
  assert c.values == {"model.num_blocks": 3}


def test_markdown_bolds_the_best_and_marks_missing_seeds():
  summaries = report.summarize(_rows(), ["hr@10", "ndcg@10"], ["model.num_blocks"])
  text = report.render_markdown(summaries, ["hr@10", "ndcg@10"], "Caption.",
                                         ["model.num_blocks"])
  lines = text.splitlines()
  assert lines[0] == "| num_blocks | HR@10 | NDCG@10 |"
  assert lines[2] == "| 1 | 0.3000 ± 0.1000 | 0.1500 ± 0.0500 |"
  assert lines[3] == "| 2 | **0.5000 ± 0.0000** | **0.2500 ± 0.0000** |"
  assert lines[4] == "| 3 | 0.1000 † | 0.0500 † |"  # one of two seeds: no std
  assert lines[5] == "| 4 | failed | failed |"
  assert lines[-1] == "Caption."


def test_rows_take_the_training_time_over_all_resumes(tmp_path):
  """collect_results: train_time.json (every resume) wins over status.json (one invocation)."""
  config = _points_config({"label": "p"})
  (only,) = plan.plan_runs(config, str(tmp_path))
  os.makedirs(only.workdir)
  plan.write_json(os.path.join(only.workdir, plan.POINT_FILE), {"label": "p", "seed": 0})
  plan.write_json(os.path.join(only.workdir, plan.STATUS_FILE),
                  {"status": "ok", "train_seconds": 60.0})
  (row,) = report.collect_results(str(tmp_path))
  assert row["train_seconds"] == 60.0
  plan.write_json(os.path.join(only.workdir, plan.TRAIN_TIME_FILE), {"train_seconds": 600.0})
  (row,) = report.collect_results(str(tmp_path))
  assert row["train_seconds"] == 600.0


def test_points_not_run_yet_say_todo_not_failed():
  rows = [{"label": "a", "seed": 0, "status": "ok", "hr@10": 0.5},
          {"label": "b", "seed": 0, "status": "todo"},
          {"label": "c", "seed": 0, "status": "failed", "error": "boom"}]
  summaries = report.summarize(rows, ["hr@10"])
  lines = report.render_markdown(summaries, ["hr@10"], "Caption.").splitlines()
  assert lines[3:5] == ["| b | todo |", "| c | failed |"]
  config = _points_config({"label": "a"})
  caption = report.caption_text(config, summaries)
  assert "'todo': not run yet" in caption and "'failed': no seed finished" in caption
  assert "'failed'" not in report.caption_text(config, summaries[:2])


def test_budget_columns_average_best_epoch_and_minutes_of_finished_seeds():
  rows = [{"label": "a", "seed": 0, "status": "ok", "hr@10": 0.2, "best_epoch": 40.0,
           "train_seconds": 600.0, "epochs_run": 50.0, "epoch_budget": 100},
          {"label": "a", "seed": 1, "status": "ok", "hr@10": 0.4, "best_epoch": 60.0,
           "train_seconds": 1200.0, "epochs_run": 70.0, "epoch_budget": 100},
          {"label": "a", "seed": 2, "status": "failed", "best_epoch": 99.0},
          {"label": "b", "seed": 0, "status": "todo"}]
  summaries = report.summarize(rows, ["hr@10"])
  columns = report.budget_columns(rows, summaries)
  assert columns == {"epochs": ["60 of 100", "n/a"], "best epoch": ["50.0", "n/a"],
                     "train min": ["15", "n/a"]}
  lines = report.render_markdown(summaries, ["hr@10"], "Caption.",
                                 extra_columns=columns).splitlines()
  assert lines[0] == "| point | HR@10 | epochs | best epoch | train min |"
  assert lines[1] == "|---|---:|---:|---:|---:|"
  assert lines[2] == "| a | **0.3000 ± 0.1414 †** | 60 of 100 | 50.0 | 15 |"  # 2 of 3 seeds


def test_epochs_run_come_from_the_last_validation_step(tmp_path):
  """8 steps per epoch (best step 24 at epoch 3); the last validation at step 40: 5 epochs."""
  lines = [{"step": 8, "split": "valid"}, {"step": 40, "split": "valid"},
           {"step": 40, "split": "final_test"}, {"step": 48, "split": "train"}]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 9')  # a cut last line
  assert report._epochs_run(str(tmp_path), {"best_step": 24, "best_epoch": 3.0}) == 5.0
  assert report._epochs_run(str(tmp_path), {}) is None


def test_published_text_is_a_table_column_and_never_config(tmp_path):
  config = _points_config({"label": "a", "published": "0.18, Someone 2023"}, {"label": "b"})
  runs = plan.plan_runs(config, str(tmp_path / "sweep"))
  assert [r.point.published for r in runs] == ["0.18, Someone 2023", ""]
  assert "published" not in runs[0].point.values and "published" not in runs[0].point.overrides
  assert plan.varied_keys(config) == []
  calls = []
  outcome = run.run_ablation(config, str(tmp_path / "sweep"), train_fn=_counting(calls))
  lines = outcome.text.splitlines()
  assert lines[0] == "| point | HR@10 | NDCG@10 | MRR@10 | published |", lines[0]
  assert lines[2].endswith("| 0.18, Someone 2023 |") and lines[3].endswith("| - |")
  config.points = ({"label": "a"}, {"label": "b"})  # no published texts: no column
  assert "published" not in run.run_ablation(config, str(tmp_path / "sweep"),
                                             train_fn=_counting(calls)).text
  assert len(calls) == 2  # the text is not config: the finished runs stand


def test_a_point_may_name_its_own_seeds(tmp_path):
  config = _points_config({"label": "a", "seeds": (0, 1, 2)}, {"label": "b"}, seeds=(0,))
  runs = plan.plan_runs(config, str(tmp_path / "sweep"))
  assert [(r.point.label, r.point.seed) for r in runs] == [("a", 0), ("a", 1), ("a", 2),
                                                           ("b", 0)]
  assert "seeds" not in runs[0].point.values and "seeds" not in runs[0].point.overrides
  outcome = run.run_ablation(config, str(tmp_path / "sweep"), train_fn=fake_train)
  assert "over each row's seeds (1 to 3" in outcome.text
  a = [line for line in outcome.text.splitlines() if line.startswith("| a |")][0]
  assert "±" in a  # three seeds: mean ± std
  config.points = ({"label": "a", "seeds": (1, 1)},)
  with pytest.raises(ValueError, match="point 'a': seeds"):
    plan.plan_runs(config, str(tmp_path / "other"))


def test_latex_escapes_labels_and_bolds_ties():
  rows = [{"label": "x_1 & y", "seed": 0, "status": "ok", "hr@10": 0.5},
          {"label": "z%", "seed": 0, "status": "ok", "hr@10": 0.5},
          {"label": "w", "seed": 0, "status": "ok", "hr@10": 0.25}]
  summaries = report.summarize(rows, ["hr@10"])
  tex = report.render_latex(summaries, ["hr@10"], "One seed (0): no std.")
  assert r"\begin{tabular}{lc}" in tex and r"\end{tabular}" in tex
  assert tex.count(r"\begin{") == tex.count(r"\end{") == 2
  assert r"x\_1 \& y & $\mathbf{0.5000}$ \\" in tex
  assert r"z\% & $\mathbf{0.5000}$ \\" in tex
  assert r"w & $0.2500$ \\" in tex


def test_caption_states_dataset_split_protocol_and_seeds():
  config = _tiny()
  summaries = report.summarize(_rows(), ["hr@10"])
  text = report.caption_text(config, summaries)
  for part in ("tiny synthetic", "test split", "full ranking", "leave-one-out",
               "over 2 seeds (0, 1)", "ddof=1", "bold", "†", "no seed finished"):
    assert part in text, part
  config.seeds = (3,)
  assert "One seed (3): no std" in report.caption_text(config, summaries)


def test_plots_lines_for_numeric_axes_and_bars_otherwise(tmp_path):
  rows = []
  for attention in ("dot_product", "additive"):
    for blocks in (1, 2, 3):
      for seed in (0, 1):
        rows.append({"label": f"{attention}{blocks}", "model.attention": attention,
                     "model.num_blocks": blocks, "seed": seed, "status": "ok",
                     "hr@10": 0.1 * blocks + 0.01 * seed})
  keys = ["model.attention", "model.num_blocks"]
  lines = report.plot(report.summarize(rows, ["hr@10"], keys), ["hr@10"],
                               str(tmp_path / "lines"), keys)
  metrics = ["hr@10", "ndcg@10"]
  bars = report.plot(report.summarize(_rows(), metrics), metrics,
                              str(tmp_path / "bars"))
  assert [os.path.basename(p) for p in lines] == ["hr_at_10.png"]
  assert len(bars) == 2
  for path in lines + bars:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------
# The real tiny grid, trained once through the binary.


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("ablate")
  workdir, cache = str(root / "sweep"), str(root / "jax_cache")
  result = _ablate(f"--config={ABLATIONS}/tiny_grid.py", f"--workdir={workdir}",
                   "--config.overrides.train.num_epochs=1", cache_dir=cache)
  assert result.returncode == 0, result.stderr[-5000:]
  return {"workdir": workdir, "cache": cache, "stdout": result.stdout}


@pytest.mark.slow  # the tiny_sweep fixture: ~60 s of training through the binary
def test_tiny_grid_writes_a_row_per_run(tiny_sweep):
  workdir = tiny_sweep["workdir"]
  rows = report.read_csv(os.path.join(workdir, "results.csv"))
  assert len(rows) == 8
  assert all(row["status"] == "ok" for row in rows), [row["error"] for row in rows]
  columns = list(rows[0])
  assert columns[:6] == ["label", "model.attention", "model.num_blocks", "seed", "status",
                         "split"]
  assert columns[6:9] == list(METRICS)
  for name in ("hr@20", "sampled_ndcg@10", "train_seconds", "workdir"):
    assert name in columns
  for row in rows:
    assert os.path.exists(os.path.join(row["workdir"], "final_metrics.json"))
    assert os.path.basename(row["workdir"]).endswith(f"_seed{row['seed']}")
    assert 0.0 <= float(row["ndcg@10"]) <= float(row["hr@10"]) <= 1.0
  assert sorted(os.listdir(os.path.join(workdir, "plots"))) == [
      "hr_at_10.png", "mrr_at_10.png", "ndcg_at_10.png"]
  assert "| attention | num_blocks | HR@10 | NDCG@10 | MRR@10 |" in tiny_sweep["stdout"]


@pytest.mark.slow  # the tiny_sweep fixture: ~60 s of training through the binary
def test_table_mean_and_std_match_numpy_over_results_csv(tiny_sweep):
  workdir = tiny_sweep["workdir"]
  rows = report.read_csv(os.path.join(workdir, "results.csv"))
  table = _parse_markdown(os.path.join(workdir, "table.md"))
  assert len(table) == 4
  for cells in table:
    attention, blocks = cells[:2]
    group = [r for r in rows
             if r["model.attention"] == attention and r["model.num_blocks"] == blocks]
    assert len(group) == 2
    for name, cell in zip(METRICS, cells[2:], strict=True):
      values = np.array([float(r[name]) for r in group])
      mean, std = (float(x) for x in cell.split(" ± "))
      assert mean == pytest.approx(values.mean(), abs=5e-5), (attention, blocks, name)
      assert std == pytest.approx(values.std(ddof=1), abs=5e-5), (attention, blocks, name)


@pytest.mark.slow  # the tiny_sweep fixture: ~60 s of training through the binary
def test_latex_table_is_structurally_sound(tiny_sweep):
  with open(os.path.join(tiny_sweep["workdir"], "table.tex"), encoding="utf-8") as f:
    tex = f.read()
  assert r"\begin{tabular}{llccc}" in tex
  for env in ("table", "tabular"):
    assert tex.count(rf"\begin{{{env}}}") == tex.count(rf"\end{{{env}}}") == 1
  body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")].splitlines()[1:]
  assert len(body) == 4 and all(line.count("&") == 4 for line in body)
  assert tex.count(r"\mathbf{") == 3  # one best per metric column
  assert r"\caption{" in tex and "2 seeds" in tex and "test split" in tex


@pytest.mark.slow  # the tiny_sweep fixture: ~60 s of training through the binary
def test_rerun_skips_finished_runs(tiny_sweep):
  workdir = tiny_sweep["workdir"]
  finals = [os.path.join(workdir, "runs", name, "final_metrics.json")
            for name in sorted(os.listdir(os.path.join(workdir, "runs")))]
  before = [os.stat(path).st_mtime_ns for path in finals]
  calls = []
  outcome = run.run_ablation(_tiny(), workdir, train_fn=_counting(calls))
  assert not calls
  assert len(outcome.rows) == 8 and all(row["status"] == "ok" for row in outcome.rows)
  assert [os.stat(path).st_mtime_ns for path in finals] == before


@pytest.mark.slow  # the tiny_sweep fixture: ~60 s of training through the binary
def test_failing_point_is_recorded_and_the_others_finish(tiny_sweep, tmp_path):
  config_file = tmp_path / "broken.py"
  config_file.write_text(
      "from experiments.configs.ablations import tiny_grid\n\n\n"
      "def get_config():\n"
      "  config = tiny_grid.get_config()\n"
      "  config.axes = ()\n"
      "  config.points = ({'label': 'good', 'model.attention': 'dot_product',\n"
      "                    'model.num_blocks': 1},\n"
      "                   {'label': 'broken', 'model.attention': 'linear'})\n"
      "  config.seeds = (0,)\n"
      "  config.overrides.train.num_epochs = 1\n"
      "  return config\n")
  workdir = tmp_path / "sweep"
  result = _ablate(f"--config={config_file}", f"--workdir={workdir}",
                   cache_dir=tiny_sweep["cache"])  # 'good' is compiled already
  assert result.returncode == 1, result.stderr[-3000:]
  assert "1 of 2 runs failed" in result.stderr
  good, broken = report.read_csv(os.path.join(workdir, "results.csv"))
  assert good["status"] == "ok" and float(good["hr@10"]) > 0
  assert broken["status"] == "failed" and "attention" in broken["error"]
  assert broken["error"].startswith("ValueError")
  with open(os.path.join(broken["workdir"], "error.txt"), encoding="utf-8") as f:
    assert "Traceback" in f.read()
  assert "| broken | failed | failed | failed |" in result.stdout


def test_a_run_dir_of_another_config_is_refused_but_older_layouts_are_not(tmp_path):
  """Resuming checks the saved config; keys added since (at their old-run value) pass."""
  config = _points_config({"label": "p", "model.num_blocks": 1})
  (first,) = plan.plan_runs(config, str(tmp_path))
  saved = plan.config_json(first.config)
  # A run written before model.block / init_std / ffn_dim / l2_norm and
  # train.shared_negatives existed.
  for block, key in (("model", "block"), ("model", "init_std"), ("model", "ffn_dim"),
                     ("model", "l2_norm"), ("model", "positions_from"), ("model", "qkv_init"),
                     ("train", "shared_negatives"), ("train", "bce_log_k_offset")):
    del saved[block][key]
  del saved["data"]["images"]["item_ids"]
  os.makedirs(first.workdir)
  plan.write_json(os.path.join(first.workdir, plan.POINT_FILE), {"config": saved})
  assert [r.workdir for r in plan.plan_runs(config, str(tmp_path))] == [first.workdir]
  saved["model"]["dim"] += 1  # a real change
  plan.write_json(os.path.join(first.workdir, plan.POINT_FILE), {"config": saved})
  with pytest.raises(ValueError, match=r"holds a run of a different config \(model.dim"):
    plan.plan_runs(config, str(tmp_path))


@pytest.mark.parametrize("loss, num_negatives, refused", [
    ("bce", 1, False), ("sampled_softmax", 8, False), ("bce", 8, True), ("gbce", 8, True)])
def test_an_added_key_passes_where_it_cannot_change_the_run(tmp_path, loss, num_negatives,
                                                              refused):
  """train.bce_log_k_offset (new default True; older runs False) matters for bce/gbce, k > 1."""
  config = _points_config({"label": "p", "train.loss": loss,
                           "train.num_negatives": num_negatives})
  (first,) = plan.plan_runs(config, str(tmp_path))
  assert first.config.train.bce_log_k_offset
  saved = plan.config_json(first.config)
  del saved["train"]["bce_log_k_offset"]  # written before the key existed
  os.makedirs(first.workdir)
  plan.write_json(os.path.join(first.workdir, plan.POINT_FILE), {"config": saved})
  if refused:
    with pytest.raises(ValueError, match=r"train.bce_log_k_offset: None -> True"):
      plan.plan_runs(config, str(tmp_path))
  else:
    assert [r.workdir for r in plan.plan_runs(config, str(tmp_path))] == [first.workdir]
