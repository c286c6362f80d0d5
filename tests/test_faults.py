"""Faults and bad input: workdir lock, damaged checkpoints, divergence, paths, clean errors."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deeprec_jax import checkpoints, recommend, train
from deeprec_jax import workdir as workdir_lib
from deeprec_jax.data import builders, pipeline, preprocess, sources
from experiments import recommend as recommend_binary
from experiments.configs import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(num_epochs: int = 2):
  config = tiny.get_config("sasrec")
  config.train.num_epochs = num_epochs
  config.train.keep_checkpoints = 3
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2-epoch run (checkpoints at steps 4 and 8) and the 3-epoch run it resumes to."""
  root = tmp_path_factory.mktemp("faults")
  two = str(root / "two_epochs")
  train.train_and_evaluate(_config(2), two)
  three = train.train_and_evaluate(_config(3), str(root / "three_epochs"))
  return two, three


def _copy(run: str, tmp_path) -> str:
  target = str(tmp_path / "run")
  shutil.copytree(run, target)
  return target


def _assert_same(results, expected):
  assert results.keys() == expected.keys()
  for name, value in expected.items():
    np.testing.assert_allclose(results[name], value, rtol=1e-6, err_msg=name)


def _python(*args, cwd=REPO, timeout=240):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, check=False)


def test_a_second_run_on_a_locked_workdir_fails_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lib.locked(workdir):
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f'"pid": {os.getpid()}'):
      train.train_and_evaluate(_config(1), workdir)
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # It wrote nothing.
  # A lock file left behind by a dead holder is taken over.
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w", encoding="utf-8") as f:
    f.write('{"pid": 999999, "host": "gone"}')
  with workdir_lib.locked(workdir):
    pass


def test_the_lock_holds_across_processes_and_the_binary_exits_2(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time\nfrom deeprec_jax import workdir\n"
      f"with workdir.locked({str(workdir)!r}):\n  print('held', flush=True)\n  time.sleep(60)\n")],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    result = _python("-m", "experiments.train", "--config=experiments/configs/tiny.py:sasrec",
                     f"--workdir={workdir}")
    assert result.returncode == 2
    assert f'"pid": {holder.pid}' in result.stderr and "Traceback" not in result.stderr
  finally:
    holder.kill()
    holder.wait()


def test_resume_walks_back_past_a_half_written_step(runs, tmp_path):
  two, three = runs
  workdir = _copy(two, tmp_path)
  ckpt = os.path.join(workdir, "checkpoints")
  os.makedirs(os.path.join(ckpt, "12"))  # A step directory copied in half.
  shutil.copy(os.path.join(ckpt, "8", "_CHECKPOINT_METADATA"), os.path.join(ckpt, "12"))
  results = train.train_and_evaluate(_config(3), workdir)
  _assert_same(results, three)
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints"))[0].startswith("12.")


def test_resume_walks_back_past_a_truncated_file(runs, tmp_path):
  two, three = runs
  workdir = _copy(two, tmp_path)
  data = pathlib.Path(workdir, "checkpoints", "8", "state")
  files = sorted((p for p in data.rglob("*") if p.is_file() and p.stat().st_size > 64),
                 key=lambda p: -p.stat().st_size)
  with open(files[0], "r+b") as f:
    f.truncate(files[0].stat().st_size // 2)
  results = train.train_and_evaluate(_config(3), workdir)
  _assert_same(results, three)  # Resumed from step 4, trained steps 5-12 again.
  moved = os.listdir(os.path.join(workdir, "damaged_checkpoints"))
  assert len(moved) == 1 and moved[0].startswith("8.")


def test_evaluate_falls_back_to_the_next_best_step(runs, tmp_path, caplog):
  two, _ = runs
  workdir = _copy(two, tmp_path)
  manager = checkpoints.create_manager(workdir, keep=3, best_metric="ndcg@10")
  best, second = checkpoints.best_first(manager, "ndcg@10")[:2]
  manager.close()
  os.remove(os.path.join(workdir, "checkpoints", str(best), "state", "manifest.ocdbt"))
  _, _, step = train.load_trained(workdir)
  assert step == second
  assert f"checkpoint step {best}" in caplog.text and "damaged" in caplog.text
  assert os.path.exists(os.path.join(workdir, "checkpoints", str(best)))  # Never deleted.


def test_divergence_stops_before_anything_is_saved(tmp_path):
  config = _config(1)
  config.train.learning_rate = 1e6
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="diverged at step 2.*no checkpoint was saved"):
    train.train_and_evaluate(config, workdir)
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


def test_divergence_guard_names_the_last_good_checkpoint():
  class Manager:
    directory = "/runs/x/checkpoints"

    def latest_step(self):
      return 40

  guard = train.DivergenceGuard(10.0, Manager())
  for step, loss in enumerate([0.9, 0.8, 0.7, 0.75], start=1):
    assert guard.check({"loss": loss, "grad_norm": 1.0}, step) == loss
  with pytest.raises(FloatingPointError, match=r"step 5: loss 8\.1 .*median 0\.775.*step 40"):
    guard.check({"loss": 8.1, "grad_norm": 1.0}, 5)
  with pytest.raises(FloatingPointError, match="non-finite"):
    guard.check({"loss": 0.7, "grad_norm": float("inf")}, 6)
  train.DivergenceGuard(0.0, Manager()).check({"loss": 1e9, "grad_norm": 1.0}, 7)  # Off.
  # A nan at the very first step comes from the initial model or loss, not the rate.
  with pytest.raises(FloatingPointError, match="first step already failed.*not the learning"):
    train.DivergenceGuard(10.0, Manager()).check({"loss": 8.3, "grad_norm": float("nan")}, 1)


def test_saved_paths_are_absolute_so_any_directory_reads_them(tmp_path, monkeypatch):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  rng = np.random.default_rng(0)
  lines = [f"{user} {item}" for user in range(1, 31) for item in rng.choice(40, 8, False) + 1]
  (data_dir / "seqs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
  config = _config(1)
  config.data.name, config.data.path = "sasrec_text", "data/seqs.txt"
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(config, "run")
  with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["data"]["path"] == str(data_dir / "seqs.txt")
  monkeypatch.chdir(REPO)
  trainer, _, _ = train.load_trained(str(tmp_path / "run"))
  assert trainer.dataset.num_users == 30


def test_recommend_validates_top_k_and_reports_bad_lines(runs, tmp_path):
  two, _ = runs
  trainer, params, _ = train.load_trained(two)
  history = [recommend.encode_history([int(trainer.dataset.item_ids[3])],
                                      trainer.dataset.item_ids)]
  with pytest.raises(ValueError, match=r"top_k=41: expected an int in \[1, 40\]"):
    recommend.recommend(trainer, params, history, top_k=41)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n", encoding="utf-8")
  with pytest.raises(ValueError, match="no history in the file"):
    recommend_binary.read_histories(str(empty))

  known = [int(i) for i in trainer.dataset.item_ids[1:4]]
  lines = tmp_path / "histories.txt"
  lines.write_text(f"{known[0]},{known[1]}\n{known[2]} 999999\nabc\n{known[2]}\n",
                   encoding="utf-8")
  result = _python("-m", "experiments.recommend", f"--workdir={two}",
                   f"--histories_file={lines}", "--top_k=3")
  assert result.returncode == 0, result.stderr
  answers = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(answers) == 2 and all(len(a["recommendations"]) == 3 for a in answers)
  assert "history" not in answers[0]
  assert "line 2: item ids not in the dataset: [999999]" in result.stderr
  assert "line 3: expected integer item ids" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--config.train.num_epoch=3"], 'Did you mean "num_epochs"'),
    (["--config=experiments/configs/default.py:ml-100k", "--config.data.path=/nonexistent"],
     "data.path='/nonexistent'"),
])
def test_user_errors_print_one_message_and_exit_2(tmp_path, args, message):
  result = _python("-m", "experiments.train", f"--workdir={tmp_path / 'run'}", *args)
  assert result.returncode == 2
  assert message in result.stderr and "Traceback" not in result.stderr
  assert len(result.stderr.strip().splitlines()) <= 3
  assert not (tmp_path / "run").exists()  # A failed start leaves no workdir.


def _kill_during_saves(workdir: pathlib.Path, seed: int) -> None:
  """Starts the 3-epoch run and SIGKILLs it while it writes a checkpoint (or soon after)."""
  command = [sys.executable, "-m", "experiments.train",
             "--config=experiments/configs/tiny.py:sasrec", f"--workdir={workdir}",
             "--config.train.num_epochs=3", "--config.train.keep_checkpoints=3"]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  target = random.Random(seed).choice([1, 1, 2, 2, 3])  # Which save to interrupt.
  delay = random.Random(seed + 1).uniform(0.0, 0.05)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 180
  while time.time() < deadline and process.poll() is None:
    names = [p.name for p in ckpt.iterdir()] if ckpt.exists() else []
    if sum("tmp" in name or name.isdigit() for name in names) >= target:
      time.sleep(delay)
      break
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()


@pytest.mark.slow
def test_sigkill_at_twenty_points_during_saves_then_rerun_finishes_the_same(runs, tmp_path):
  _, three = runs
  for seed in range(20):
    workdir = tmp_path / f"kill_{seed}"
    _kill_during_saves(workdir, seed)
    _assert_same(train.train_and_evaluate(_config(3), str(workdir)), three)


def test_short_users_can_stay_as_training_only_users():
  """As the SASRec code: a 2-item user trains on both items and is never evaluated."""
  x = sources.Interactions(user=np.array([1, 1, 2, 2, 2, 2], np.int64),
                           item=np.array([1, 2, 1, 2, 3, 1], np.int64),
                           timestamp=np.arange(6, dtype=np.int64))
  assert preprocess.preprocess(x, log=None).num_users == 1  # The default drops user 1.
  messages = []
  data = preprocess.preprocess(x, keep_short_users=True, log=messages.append)
  assert data.num_users == 2 and any("1 users with < 3" in m for m in messages)
  assert preprocess.split_train(data.sequences[0]).tolist() == [1, 2]
  assert preprocess.split_train(data.sequences[1]).tolist() == [1, 2]
  dataset = builders.from_sequences(data)
  counts = pipeline.train_item_counts(dataset)
  assert counts.tolist() == [0, 2, 2, 0]  # Both users' training parts.
  batches = list(pipeline.eval_batches(dataset, split="test", task="autoregressive",
                                       max_len=4, batch_size=4))
  assert sum(float(b["weight"].sum()) for b in batches) == 1.0  # Only user 2.
