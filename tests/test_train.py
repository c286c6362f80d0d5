"""The training loop: outputs, data parallelism, resume, failure handling."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from deeprec_jax import checkpoints, optimizers, train
from experiments.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(workdir, split=None):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if split is None or r["split"] == split]


def test_tiny_sasrec_writes_every_output(tmp_path):
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(tiny.get_config("sasrec"), workdir)

  for name in ("config.json", "metrics.jsonl", "final_metrics.json", train.TRAIN_TIME_FILE):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, train.TRAIN_TIME_FILE), encoding="utf-8") as f:
    assert json.load(f)["train_seconds"] > 0
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  train_records = [r for r in _records(workdir, "train") if "loss" in r]
  assert train_records and all(np.isfinite(r["loss"]) for r in train_records)
  assert any("compile_seconds" in r for r in _records(workdir, "train"))
  valid = _records(workdir, "valid")
  assert len(valid) == 2  # one per epoch in the tiny config
  for name in ("hr@10", "ndcg@10", "mrr@10", "hr@1", "ndcg@20", "sampled_hr@10"):
    assert 0.0 <= valid[-1][name] <= 1.0, name
  assert 0.0 <= results["test/ndcg@10"] <= results["test/hr@10"] <= 1.0
  assert results["valid/count"] == 64  # every synthetic user evaluated once


# One step on 1 vs 4 devices and packed vs unpacked rows: see
# test_gradient_equality.py, which compares the loss and the raw gradients
# (an Adam step, ~lr * sign(g), would not see a gradient 2x too large).


def _train_command(workdir, *overrides):
  return [sys.executable, "-m", "experiments.train",
          "--config=experiments/configs/tiny.py:sasrec", f"--workdir={workdir}",
          "--config.train.num_epochs=4", *overrides]


def _restore_latest(config, workdir):
  """``(step, state)`` of the newest checkpoint in ``workdir``, restored on the host."""
  trainer = train.Trainer(config, train.builders.load(config.data))
  manager = checkpoints.create_manager(workdir, keep=config.train.keep_checkpoints,
                                       best_metric=config.train.best_metric)
  step = manager.latest_step()
  state, _ = train.restore_state(trainer, manager, step)
  manager.close()
  return step, jax.device_get(state)


def _losses_by_step(workdir):
  """``{step: [loss, ...]}`` of every train record with a loss, in file order."""
  losses = {}
  for record in _records(workdir, "train"):
    if "loss" in record:
      losses.setdefault(record["step"], []).append(record["loss"])
  return losses


def test_sigkill_then_rerun_gives_the_uninterrupted_metrics(tmp_path):
  config = tiny.get_config("sasrec")
  config.train.num_epochs = 4
  straight_dir = str(tmp_path / "straight")
  uninterrupted = train.train_and_evaluate(config, straight_dir)

  workdir = tmp_path / "killed"
  process = subprocess.Popen(_train_command(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 180
  ckpt_dir = workdir / "checkpoints"
  while time.time() < deadline and process.poll() is None:
    if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) > 0 for p in ckpt_dir.iterdir()):
      break
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  manager = checkpoints.create_manager(str(workdir), keep=2, best_metric="ndcg@10")
  resume_step = manager.latest_step()
  manager.close()
  assert resume_step is not None and resume_step > 0  # A real resume, not a fresh start.

  resumed = train.train_and_evaluate(config, str(workdir))
  assert resumed.keys() == uninterrupted.keys()
  for name, value in uninterrupted.items():
    np.testing.assert_allclose(resumed[name], value, rtol=1e-6, err_msg=name)

  # The final states: parameters, both Adam moments, the step and the RNG key.
  (step, state), (straight_step, straight_state) = (
      _restore_latest(config, str(workdir)), _restore_latest(config, straight_dir))
  assert step == straight_step == 16  # 4 epochs of 4 steps.
  flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
  flat_straight = jax.tree.leaves(straight_state)
  assert len(flat_state) == len(flat_straight)
  for (path, leaf), expected in zip(flat_state, flat_straight, strict=True):
    np.testing.assert_allclose(leaf, expected, rtol=1e-6, atol=0,
                               err_msg=jax.tree_util.keystr(path))

  # Every logged loss, before the kill and after the resume, is the straight run's;
  # the resumed run wrote nothing at or before the step it resumed from.
  losses, straight_losses = _losses_by_step(str(workdir)), _losses_by_step(straight_dir)
  assert losses.keys() == straight_losses.keys() == set(range(2, 17, 2))
  for log_step, values in losses.items():
    np.testing.assert_allclose(values, straight_losses[log_step][0], rtol=1e-6,
                               err_msg=f"step {log_step}")
    if log_step <= resume_step:
      assert len(values) == 1, f"step {log_step} logged again after resuming at {resume_step}"
  valid_steps = [r["step"] for r in _records(str(workdir), "valid")]
  assert sorted(set(valid_steps)) == [4, 8, 12, 16]
  assert all(valid_steps.count(s) == 1 for s in valid_steps if s <= resume_step)


def test_unfinished_save_does_not_hide_the_last_good_checkpoint(tmp_path):
  config = tiny.get_config("sasrec")
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  manager = checkpoints.create_manager(workdir, keep=2, best_metric="ndcg@10")
  latest = manager.latest_step()
  manager.close()
  assert latest == 8  # 2 epochs of 4 steps.
  _, good_params, good_step = train.load_trained(workdir)
  assert good_step == final["best_step"]
  # What a process killed in the middle of writing step latest+1 leaves behind.
  partial = os.path.join(workdir, "checkpoints", f"{latest + 1}.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "half_written"), "wb") as f:
    f.write(b"\0" * 100)
  trainer, params, step = train.load_trained(workdir)
  # Exactly the checkpoint restored before the half-written step appeared.
  assert step == good_step
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(good_params))
  manager = checkpoints.create_manager(workdir, keep=2, best_metric="ndcg@10")
  assert manager.latest_step() == latest and latest + 1 not in manager.all_steps()
  manager.close()


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
  config = tiny.get_config("sasrec")
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  good = train.load_trained(workdir)[1]
  config.train.num_epochs = 4
  config.train.learning_rate = 1e30  # diverges at once on resume
  with pytest.raises(FloatingPointError, match="non-finite"):
    train.train_and_evaluate(config, workdir)
  _, params, _ = train.load_trained(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(good), jax.device_get(params))


def test_early_stopping_stops_after_patience(tmp_path):
  config = tiny.get_config("sasrec")
  config.train.num_epochs = 30
  config.train.learning_rate = 0.0  # nothing ever improves
  config.train.patience = 2
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  assert len(_records(workdir, "valid")) == 3  # the first, then 2 without improvement


def test_weight_decay_skips_biases_norms_and_embeddings():
  params = {"item_embed": {"embedding": np.ones((5, 3))},
            "dense": {"kernel": np.ones((3, 3)), "bias": np.ones(3)},
            "norm": {"scale": np.ones(3)}}
  mask = optimizers.decay_mask(params, decay_embeddings=False)
  assert mask == {"item_embed": {"embedding": False},
                  "dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
  assert optimizers.decay_mask(params, decay_embeddings=True)["item_embed"]["embedding"]


def test_warmup_then_cosine_schedule():
  config = tiny.get_config("sasrec").train
  config.warmup_steps, config.schedule, config.learning_rate = 10, "cosine", 1.0
  schedule = optimizers.learning_rate_schedule(config, total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_adamw_decays_only_masked_weights():
  config = tiny.get_config("sasrec").train
  config.optimizer, config.weight_decay, config.learning_rate = "adamw", 0.5, 0.1
  tx = optimizers.create_optimizer(config, total_steps=10)
  params = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}}
  zero_grads = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["bias"], 1.0)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_b2_sets_the_second_moment_decay(name):
  """Three steps against a float64 NumPy Adam with b2 = 0.98 (rtol 1e-5)."""
  config = tiny.get_config("sasrec").train
  config.optimizer, config.learning_rate, config.adam_b2 = name, 0.1, 0.98
  tx = optimizers.create_optimizer(config, total_steps=10)
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3,)) for _ in range(3)]
  params = {"w": np.zeros(3, np.float32)}
  state = tx.init(params)
  mu, nu, expected = np.zeros(3), np.zeros(3), np.zeros(3)
  for step, grad in enumerate(grads, start=1):
    updates, state = tx.update({"w": grad.astype(np.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    mu, nu = 0.9 * mu + 0.1 * grad, 0.98 * nu + 0.02 * grad**2
    expected -= 0.1 * (mu / (1 - 0.9**step)) / (np.sqrt(nu / (1 - 0.98**step)) + 1e-8)
  np.testing.assert_allclose(params["w"], expected, rtol=1e-5)


def test_mistyped_override_names_the_key(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}",
       "--config=experiments/configs/tiny.py:sasrec", "--config.train.bach_size=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "bach_size" in result.stderr


@pytest.mark.parametrize("key,value,message", [
    ("train.loss", "hinge", "train.loss"),
    ("train.optimizer", "sgd", "train.optimizer"),
    ("model.attention", "linear", "attention"),
])
def test_bad_config_values_name_the_key(tmp_path, key, value, message):
  config = tiny.get_config("sasrec")
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
