"""Executors: submitit (LocalExecutor subprocesses; the sbatch script) and Ray.

The real runs train tiny SASRec runs through each executor into the same
results and table as the local executor, sharing one persistent compilation
cache, so only the local sweep compiles: one point x 2 seeds by default, the
2 x 2 grid x 2 seeds under ``-m slow``. The other tests use a fake train
function (no JAX) in real job and task processes: a failing point and a job
that dies are recorded while the other runs finish, and a rerun skips the
finished ones.
"""

import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from deeprec_jax.ablation import executors, plan, report, run
from experiments.configs.ablations import tiny_grid

submitit = pytest.importorskip("submitit")
ray = pytest.importorskip("ray")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
METRICS = ("hr@10", "ndcg@10", "mrr@10")


def fake_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Deterministic metrics from the config; 'linear' fails, 'crash' kills the process."""
  if config.model.attention == "crash":
    os._exit(3)  # a job that dies without recording itself (out of memory, node loss)
  if config.model.attention not in ("dot_product", "additive"):
    raise ValueError(f"model.attention={config.model.attention!r} is not supported")
  value = 0.1 * config.model.num_blocks + 0.05 * (config.model.attention == "additive")
  results = {f"{split}/{m}": value + 0.01 * config.seed for split in ("valid", "test")
             for m in METRICS}
  results["best_step"] = 1
  plan.write_json(os.path.join(workdir, plan.FINAL_METRICS), results)
  return results


def _grid(epochs: int = 1, attentions=("dot_product", "additive")) -> ml_collections.ConfigDict:
  config = tiny_grid.get_config()
  config.overrides.train.num_epochs = epochs
  config.axes = (("model.attention", attentions),)
  return config


@pytest.fixture
def by_value():
  """Pickles this module's functions (fake_train) by value: jobs never import it."""
  import cloudpickle
  from ray import cloudpickle as ray_cloudpickle

  module = sys.modules[__name__]
  for pickler in (cloudpickle, ray_cloudpickle):
    pickler.register_pickle_by_value(module)
  yield
  for pickler in (cloudpickle, ray_cloudpickle):
    pickler.unregister_pickle_by_value(module)


@pytest.fixture(scope="module")
def local_ray():
  """A bounded local Ray instance for the module, shut down after it."""
  before = os.environ.get("RAY_worker_niceness")
  os.environ["RAY_worker_niceness"] = "0"  # as RayExecutor starts its own instances
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield
  ray.shutdown()
  if before is None:
    os.environ.pop("RAY_worker_niceness")
  else:
    os.environ["RAY_worker_niceness"] = before


def _submitit_local(tmp_path, parallelism: int = 4) -> executors.SubmititExecutor:
  options = executors.SlurmOptions(time_min=10, array_parallelism=parallelism)
  return executors.SubmititExecutor(str(tmp_path / "submitit"), options, cluster="local")


def _rows_by_run(rows):
  return {(row["label"], row["seed"]): row for row in rows}


# ----------------------------------------------------------------------------
# Options and the sbatch script (no SLURM).


def test_slurm_options_come_from_the_config_block_then_flags():
  config = _grid()
  config.slurm = ml_collections.ConfigDict({"partition": "cpu", "time_min": 30,
                                            "sbatch": {"account": "abc"}})
  options = executors.slurm_options(config, partition="gpu", gpus_per_run=None)
  assert (options.partition, options.time_min, options.sbatch) == ("gpu", 30, {"account": "abc"})
  config.slurm.partitoin = "x"
  with pytest.raises(ValueError, match="partitoin"):
    executors.slurm_options(config)
  assert executors.parse_sbatch(["qos=high", "--exclusive"]) == {"qos": "high",
                                                                 "exclusive": True}
  with pytest.raises(ValueError, match="key=value"):
    executors.parse_sbatch(["=x"])


def test_sbatch_script_of_a_slurm_array_submission(tmp_path, monkeypatch):
  """The real SlurmExecutor path up to sbatch: the script, the pickled runs."""
  from submitit.core import utils

  submitted = []

  class FakeSbatch:
    def __init__(self, command, **kwargs):
      self.command = command

    def __call__(self):
      submitted.append(self.command)
      with open(self.command[-1], encoding="utf-8") as f:
        submitted.append(f.read())
      return "Submitted batch job 4242"

  monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
  monkeypatch.setattr(utils, "CommandFunction", FakeSbatch)
  monkeypatch.chdir(tmp_path)
  options = executors.SlurmOptions(
      partition="gpu", time_min=90, gpus_per_run=1, cpus_per_task=8, mem_gb=32,
      array_parallelism=2, sbatch={"account": "recsys", "qos": "high"},
      setup=("source /opt/venv/bin/activate",))
  executor = executors.SubmititExecutor(str(tmp_path / "jobs"), options)
  runs = plan.plan_runs(_grid(), str(tmp_path / "sweep")) + plan.plan_runs(
      _grid(attentions=("additive",)), str(tmp_path / "sweep2"))[:1]
  jobs = executor.submit(runs, [None] * len(runs))
  assert [job.job_id for job in jobs] == [f"4242_{i}" for i in range(len(runs))]
  command, script = submitted
  assert command[0] == "sbatch"
  lines = script.splitlines()
  for expected in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                   "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                   f"#SBATCH --array=0-{len(runs) - 1}%2", f"#SBATCH --chdir={tmp_path}",
                   "#SBATCH --account=recsys", "#SBATCH --qos=high", "#SBATCH --nodes=1",
                   "#SBATCH --ntasks-per-node=1", "#SBATCH --job-name=deeprec",
                   "source /opt/venv/bin/activate"):
    assert expected in lines, expected
  srun = lines[-1] if lines[-1] else lines[-2]
  assert re.fullmatch(r"srun --unbuffered --output \S+%A_%a_%t_log\.out --error \S+ "
                      rf"{re.escape(sys.executable)} -u -m submitit\.core\._submit "
                      rf"{re.escape(str(tmp_path / 'jobs'))}/%j", srun), srun
  # The same text as --slurm_print_script shows.
  assert executor.sbatch_script(len(runs)) == script
  # Each array task unpickles run_job with its own run's config and sub-workdir.
  for job, r in zip(jobs, runs, strict=True):
    delayed = utils.DelayedSubmission.load(job.paths.submitted_pickle)
    assert delayed.function is executors.run_job
    config, workdir, info = delayed.args[:3]
    assert workdir == r.workdir and workdir.endswith(f"_seed{r.point.seed}")
    assert config.model.attention == r.config.model.attention and config.seed == r.point.seed
    assert info["label"] == r.point.label


def test_ablate_binary_prints_the_script_and_refuses_it_without_submitit(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
  base = [sys.executable, "-m", "experiments.ablate",
          "--config=experiments/configs/ablations/tiny_grid.py", f"--workdir={tmp_path}/w"]
  result = subprocess.run([*base, "--executor=submitit", "--slurm_partition=gpu",
                           "--slurm_gpus_per_run=2", "--slurm_sbatch=account=abc",
                           "--slurm_print_script"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for line in ("#SBATCH --array=0-7%8", "#SBATCH --partition=gpu", "#SBATCH --account=abc",
               "#SBATCH --gpus-per-node=2", f"#SBATCH --chdir={REPO}"):
    assert line in result.stdout.splitlines(), line
  assert not os.path.exists(tmp_path / "w" / "runs")  # nothing submitted or trained
  result = subprocess.run([*base, "--slurm_print_script"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "needs --executor=submitit" in result.stderr


# ----------------------------------------------------------------------------
# Real job and task processes with a fake train function.


# The submitit case (~35 s on 2 busy cores) is slow; its real runs stay in the table test.
@pytest.mark.parametrize("kind", [pytest.param("submitit", marks=pytest.mark.slow), "ray"])
def test_failures_are_recorded_and_finished_runs_skipped(kind, tmp_path, by_value, request):
  if kind == "ray":
    request.getfixturevalue("local_ray")
  executor = (_submitit_local(tmp_path) if kind == "submitit"
              else executors.RayExecutor())
  config = _grid(attentions=("dot_product", "linear", "crash"))
  config.seeds = (0,)
  workdir = str(tmp_path / "sweep")
  outcome = run.run_ablation(config, workdir, executor=executor,
                             train_fn=fake_train)
  rows = {row["label"]: row for row in outcome.rows}
  assert rows["attention=dot_product"]["status"] == "ok"
  assert rows["attention=dot_product"]["hr@10"] == pytest.approx(0.1)
  assert rows["attention=linear"]["status"] == "failed"
  assert rows["attention=linear"]["error"].startswith("ValueError: model.attention='linear'")
  assert rows["attention=crash"]["status"] == "failed"
  assert "failed" in rows["attention=crash"]["error"]
  assert os.path.exists(os.path.join(rows["attention=crash"]["workdir"], "error.txt"))
  if kind == "ray":
    return  # the skip below happens before any executor-specific code
  # A rerun skips the finished run and retries the failed ones.
  finished = os.path.join(rows["attention=dot_product"]["workdir"], plan.FINAL_METRICS)
  before = os.stat(finished).st_mtime_ns
  again = run.run_ablation(config, workdir, executor=executor,
                           train_fn=fake_train)
  assert os.stat(finished).st_mtime_ns == before
  assert [row["status"] for row in again.rows] == ["ok", "failed", "failed"]


# ----------------------------------------------------------------------------
# The real tiny runs: every executor, the same table.


# The default suite trains one point x 2 seeds per executor (one compile);
# the full 2 x 2 grid x 2 seeds runs under -m slow.
GRIDS = {"small": {"attentions": ("dot_product",)},
         "full": {"attentions": ("dot_product", "additive"), "blocks": (1, 2)}}
# Both slow (28 s and more): by default the submission is checked through its
# sbatch script (test_sbatch_script_of_a_slurm_array_submission); -m slow trains.
SIZES = [pytest.param(size, marks=pytest.mark.slow) for size in ("small", "full")]


def _sized_grid(size: str) -> ml_collections.ConfigDict:
  config = _grid(attentions=GRIDS[size]["attentions"])
  if "blocks" in GRIDS[size]:
    config.axes = (*config.axes, ("model.num_blocks", GRIDS[size]["blocks"]))
  return config


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
  """The local executor's sweep of each size, trained once (the reference)."""
  root = tmp_path_factory.mktemp("executors")
  run.use_compilation_cache(str(root / "jax_cache"))
  done = {}

  def local(size: str) -> dict:
    if size not in done:
      outcome = run.run_ablation(_sized_grid(size), str(root / size / "local"))
      assert all(row["status"] == "ok" for row in outcome.rows), outcome.rows
      done[size] = {"root": root / size, "rows": outcome.rows, "text": outcome.text}
    return done[size]
  return local


def _same_results(outcome, expected):
  rows = outcome.rows
  assert len(rows) == len(expected["rows"])
  got, want = _rows_by_run(rows), _rows_by_run(expected["rows"])
  assert got.keys() == want.keys()
  for key, row in got.items():
    assert row["status"] == "ok", row["error"]
    for metric in (*METRICS, "hr@20"):
      np.testing.assert_allclose(row[metric], want[key][metric], rtol=1e-6, err_msg=str(key))
  table = [line for line in outcome.text.splitlines() if line.startswith("|")]
  assert table == [line for line in expected["text"].splitlines() if line.startswith("|")]


@pytest.mark.parametrize("size", SIZES)
def test_submitit_local_jobs_train_the_same_table(sweeps, size):
  expected = sweeps(size)
  workdir = str(expected["root"] / "submitit")
  executor = _submitit_local(expected["root"], parallelism=2)
  outcome = run.run_ablation(_sized_grid(size), workdir, executor=executor)
  _same_results(outcome, expected)
  logs = [name for _, _, names in os.walk(expected["root"] / "submitit")
          for name in names if name.endswith("_log.err")]
  assert len(logs) == len(outcome.rows)  # one job per run
  assert report.read_csv(os.path.join(workdir, "results.csv"))[0]["status"] == "ok"


# Slow: the Ray path is also run by test_failures_are_recorded_and_finished_runs_skipped.
@pytest.mark.parametrize("size", [pytest.param(size, marks=pytest.mark.slow)
                                  for size in ("small", "full")])
def test_ray_tasks_train_the_same_table(sweeps, local_ray, size):
  expected = sweeps(size)
  outcome = run.run_ablation(_sized_grid(size), str(expected["root"] / "ray"),
                             executor=executors.RayExecutor())
  _same_results(outcome, expected)
