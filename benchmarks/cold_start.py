r"""Cold start of a run: how long until the first train step and the first evaluation.

  python -m benchmarks.cold_start --out=/tmp/cold_start [--config=...sasrec.py:ml-1m]

Each measurement is a fresh process (``--child``) that does what a run does
before its first steps and evaluation: builds the ``Trainer`` and its state,
starts building the validation batches (``Trainer.prefetch_eval``, as the
training loop does), compiles and runs two train steps, then evaluates the
validation split twice. Three processes in a row: without the persistent
compilation cache, with an empty one (filled by this run) and with that
cache warm (what every later run of the same config sees; the binaries keep
it in ``~/.cache/deeprec_jax/jax_cache``). Writes ``<out>/cold_start.json``
and prints one line per process. ML-1M must be in the shared data folder.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "/tmp/cold_start", "Folder for cold_start.json and the cache.")
_CONFIG = flags.DEFINE_string("config", "experiments/configs/sasrec.py:ml-1m",
                              "Experiment config file[:dataset].")
_CHILD = flags.DEFINE_string("child", None, "Internal: measure in this process; the cache "
                             "directory or '' for none.")


def measure(config_spec: str, cache_dir: str) -> dict[str, float]:
  """Seconds of each stage of a run's start in this process (see the module docstring)."""
  start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top  (after the cache choice)
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from deeprec_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from deeprec_jax.ablation import plan  # pylint: disable=g-import-not-at-top
  from deeprec_jax.data import builders  # pylint: disable=g-import-not-at-top

  def lap(name: str, times: dict[str, float], since: float) -> float:
    now = time.perf_counter()
    times[name] = now - since
    return now

  times: dict[str, float] = {"imports_s": time.perf_counter() - start}
  config = plan.load_config(config_spec)
  t = time.perf_counter()
  trainer = train.Trainer(config, builders.load(config.data))
  state = trainer.init_state()
  jax.block_until_ready(state)
  t = lap("trainer_and_state_s", times, t)
  # getattr: the same script also times commits from before prefetch_eval existed.
  getattr(trainer, "prefetch_eval", lambda split: None)("valid")
  step_fn = train.make_train_step(trainer.model, trainer.tx, loss=config.train.loss,
                                  num_items=trainer.dataset.num_items)
  shardings = sharding.param_shardings(state, trainer.mesh)
  step = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(trainer.mesh)),
                 out_shardings=(shardings, sharding.replicated(trainer.mesh)),
                 donate_argnums=0)
  batches = trainer.train_batches(0)
  for index, name in enumerate(("first_step_s", "second_step_s")):
    state, metrics = step(state, sharding.to_global(batches[index], trainer.mesh))
    jax.block_until_ready(metrics)
    t = lap(name, times, t)
  for name in ("first_eval_s", "second_eval_s"):
    trainer.evaluate(state["params"], "valid")
    t = lap(name, times, t)
  times["total_s"] = time.perf_counter() - start
  times["load_average"] = os.getloadavg()[0]
  return times


def main(argv: list[str]) -> None:
  del argv
  if _CHILD.value is not None:
    print(json.dumps(measure(_CONFIG.value, _CHILD.value)))
    return
  os.makedirs(_OUT.value, exist_ok=True)
  cache = os.path.join(_OUT.value, "jax_cache")
  shutil.rmtree(cache, ignore_errors=True)
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": ""}
  rows = []
  for label, cache_dir in (("no cache", ""), ("empty cache", cache), ("warm cache", cache)):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cold_start", f"--config={_CONFIG.value}",
         f"--child={cache_dir}"], capture_output=True, text=True, check=True, env=env)
    row = {"cache": label, **json.loads(result.stdout.strip().splitlines()[-1])}
    rows.append(row)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()))
  with open(os.path.join(_OUT.value, "cold_start.json"), "w", encoding="utf-8") as f:
    json.dump({"config": _CONFIG.value, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
