"""Multi-process training through experiments.launch_local.

Two processes (jax.distributed, gloo collectives) must train what one
process with four devices trains, whether they split the batch (2 x 2
devices) or the item table (2 x 1 device, model_parallel=2), and the
checkpoint they write together must restore in a single process.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deeprec_jax import train
from experiments.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4  # One epoch of the tiny config: one evaluation, one checkpoint.


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: this process, 4 forced devices, a replicated item table.

  Run first: it also prepares the dataset that the subprocesses then find
  in $DEEPREC_DATA_DIR.
  """
  config = tiny.get_config("sasrec")
  config.train.num_steps = NUM_STEPS
  workdir = str(tmp_path_factory.mktemp("one_process"))
  metrics = train.train_and_evaluate(config, workdir)
  _, params, step = train.load_trained(workdir)
  assert step == NUM_STEPS
  return jax.device_get(params), metrics


def _launch(workdir: str, devices_per_process: int, *overrides: str) -> dict[str, float]:
  """Trains the tiny config with 2 local processes; returns final_metrics.json."""
  result = subprocess.run(
      [sys.executable, "-m", "experiments.launch_local", "--num_processes=2",
       f"--devices_per_process={devices_per_process}", "--",
       "--config=experiments/configs/tiny.py:sasrec", f"--workdir={workdir}",
       f"--config.train.num_steps={NUM_STEPS}", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert "[p0]" in result.stdout and "[p1]" in result.stdout
  # Host 0 alone wrote the run's files (one validation record, not one per process).
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert len([line for line in f if '"valid"' in line]) == 1
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    return json.load(f)


def _assert_same_run(params, metrics, reference) -> None:
  params_ref, metrics_ref = reference
  # The gradient all-reduce runs over gloo between processes instead of
  # in-process, so sums may round differently: float32 tolerances, as for 1
  # vs 4 devices in test_train (measured: max |difference| 6e-8). Every
  # parameter gets a real gradient (the softmax-invariant key bias is gone),
  # so Adam cannot blow rounding noise on a zero gradient up to a full +-lr
  # step, and atol can stay tiny.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, params_ref)
  assert metrics.keys() == metrics_ref.keys()
  for name, value in metrics_ref.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_two_processes_train_what_one_does_and_their_checkpoint_restores(one_process, tmp_path):
  workdir = str(tmp_path / "two_processes")
  metrics = _launch(workdir, devices_per_process=2)
  trainer, params, step = train.load_trained(workdir)  # 2 processes wrote, 1 restores.
  assert step == NUM_STEPS
  _assert_same_run(jax.device_get(params), metrics, one_process)


@pytest.mark.slow  # ~60 s; the sharded table on one process: test_sharded.py.
def test_item_table_split_across_processes(one_process, tmp_path):
  # One device per process and model_parallel=2: the 'model' axis spans the
  # two processes, which both feed the whole batch (sharding.batch_block).
  workdir = str(tmp_path / "split_table")
  metrics = _launch(workdir, 1, "--config.train.model_parallel=2")
  trainer, params, step = train.load_trained(workdir)
  assert step == NUM_STEPS
  params = jax.device_get(params)
  table = params["item_embed"]["embedding"]
  # Padding rows stay zero.
  np.testing.assert_array_equal(table[trainer.dataset.num_items + 1:], 0.0)
  _assert_same_run(params, metrics, one_process)


_FAIL_ONE = """
import os, sys, time
marker = os.environ["FAIL_ONE_DIR"]
if "--process_id=1" in sys.argv:
  # Fail only once process 0 is surely running, so that it has to be stopped.
  while not os.path.exists(os.path.join(marker, "pid0")):
    time.sleep(0.05)
  sys.exit(3)
with open(os.path.join(marker, "pid0.tmp"), "w") as f:
  f.write(str(os.getpid()))
os.rename(os.path.join(marker, "pid0.tmp"), os.path.join(marker, "pid0"))
time.sleep(120)  # Process 0 would wait for its peer for ever.
open(os.path.join(marker, "finished0"), "w").close()
"""


def _is_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_launcher_fails_with_the_first_failure_and_stops_the_rest(tmp_path):
  (tmp_path / "fail_one.py").write_text(_FAIL_ONE)
  env = dict(os.environ, PYTHONPATH=str(tmp_path), FAIL_ONE_DIR=str(tmp_path))
  # The timeout is below process 0's sleep: a launcher that waited for it would fail here.
  result = subprocess.run(
      [sys.executable, "-m", "experiments.launch_local", "--num_processes=2", "--module=fail_one"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=100)
  assert result.returncode == 3, result.stdout + result.stderr
  assert "process 1 exited with status 3" in result.stderr
  # Process 0 was running when process 1 failed, and the launcher stopped it:
  # it is gone (reaped, not left behind) and never got to the end of its sleep.
  pid = int((tmp_path / "pid0").read_text())
  assert not _is_running(pid)
  assert not (tmp_path / "finished0").exists()
