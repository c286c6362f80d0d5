"""The SASRec train step in a fresh Python process, with its own XLA set-up.

XLA reads ``XLA_FLAGS`` (and the forced host device count) once, when the
backend starts, so a benchmark that varies them needs a new process per
setting. ``run(spec)`` starts ``python -m benchmarks.subproc '<json spec>'``,
which sets the environment *before* importing jax, times the data-parallel
SASRec train step over a ``('data',)`` mesh (as ``train.py`` jits it:
params replicated, batch split, state donated) and prints one result row.

Spec keys: ``task`` ('train_step' or 'eval_pass', then ``variant``: a
``fast_eval`` pass), ``devices`` (forced CPU devices, 1 = none forced),
``per_device_batch``, ``max_len``, ``repeats``, ``xla_flags`` (extra flags),
``name``, ``group``, ``quick``, ``env`` (extra environment variables, e.g.
``LD_PRELOAD``); ``dropout_rate`` overrides the model's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

_MARKER = "BENCHMARK_ROW "
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# jax 0.10 on a 2-core CPU with N forced devices can deadlock in all-reduce
# unless NPROC >= 2 * N (measured, see shared/design.md).
_NPROC_PER_DEVICE = 2


def child_env(devices: int, xla_flags: str = "",
              extra: dict[str, str] | None = None) -> dict[str, str]:
  """The child's environment: N forced CPU devices, NPROC, extra XLA flags and vars."""
  env = dict(os.environ)
  env.update(extra or {})
  # Drop any device count inherited from the parent (tests force 4).
  inherited = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                     env.get("XLA_FLAGS", "")).split()
  flags = inherited + xla_flags.split()
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = " ".join(flags)
  env["NPROC"] = str(max(int(env.get("NPROC", "0") or 0), _NPROC_PER_DEVICE * devices))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
  return env


def run(spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
  """Runs ``spec`` in a child process; returns its result row (or an error row)."""
  env = child_env(int(spec.get("devices", 1)), spec.get("xla_flags", ""), spec.get("env"))
  try:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.subproc", json.dumps(spec)],
                          cwd=_REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return _error_row(spec, f"timed out after {timeout_s:.0f} s")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_MARKER):
      return json.loads(line[len(_MARKER):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return _error_row(spec, f"exit {proc.returncode}: {' | '.join(tail)}")


def _error_row(spec: dict[str, Any], error: str) -> dict[str, Any]:
  return {"group": spec.get("group", "subprocess"), "name": spec.get("name", "?"),
          "params": dict(spec), "error": error}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs ``spec['task']`` ('train_step', the default, or 'eval_pass'); child only."""
  # Imported here: jax must not start before the environment is set.
  import jax

  row = _eval_pass(spec) if spec.get("task") == "eval_pass" else _train_step(spec)
  row["environment"] = {"xla_flags": os.environ.get("XLA_FLAGS", ""),
                        "nproc_env": os.environ.get("NPROC", ""),
                        "ld_preload": os.environ.get("LD_PRELOAD", ""),
                        "device_count": jax.device_count()}
  return row


def _eval_pass(spec: dict[str, Any]) -> dict[str, Any]:
  """One ``fast_eval`` pass (``spec['variant']``) over every ML-1M user."""
  from benchmarks import fast_eval, harness, inputs
  from deeprec_jax import evaluate

  batch_size = int(spec.get("batch", 256))
  setups, meta = fast_eval.eval_setups(batch_size)
  setup = setups[spec["variant"]]
  step, batches = setup["step"], setup["batches"]
  row = harness.measure_loop(
      spec.get("group", "eval"), spec.get("name", spec["variant"]),
      lambda: evaluate.evaluate(step, meta["params"], batches), items=inputs.ML1M_USERS,
      unit="users/s", repeats=int(spec.get("repeats", 3)), note=setup["note"],
      params={"model": "sasrec", "variant": spec["variant"], "batch": batch_size,
              "num_batches": len(batches), "env": spec.get("env") or {}})
  return row


def _train_step(spec: dict[str, Any]) -> dict[str, Any]:
  """Times the sharded SASRec train step."""
  import jax

  from benchmarks import harness, kernels
  from deeprec_jax import sharding

  devices = int(spec.get("devices", 1))
  if jax.device_count() < devices:
    raise RuntimeError(f"asked for {devices} devices, jax sees {jax.device_count()}.")
  mesh = sharding.make_mesh(devices)
  config = kernels.ml1m_config("sasrec")
  config.data.max_len = int(spec.get("max_len", config.data.max_len))
  config.model.dropout_rate = float(spec.get("dropout_rate", config.model.dropout_rate))
  batch = int(spec["per_device_batch"]) * devices
  kernel = kernels.train_step_kernel("sasrec", config=config, batch_size=batch,
                                     group=spec.get("group", "subprocess"),
                                     name=spec.get("name", f"sasrec_{devices}dev"))
  # As train.py jits the step: state replicated (a 'model' axis of size 1),
  # batch split over 'data', state donated.
  kernel.in_shardings = (sharding.replicated(mesh), sharding.batch_sharding(mesh))
  kernel.out_shardings = sharding.replicated(mesh)
  row = harness.measure(kernel, repeats=int(spec.get("repeats", 10)),
                        warmup=1 if spec.get("quick") else 2)
  row["params"].update(devices=devices, per_device_batch=int(spec["per_device_batch"]),
                       xla_flags=spec.get("xla_flags", ""), env=spec.get("env") or {})
  return row


if __name__ == "__main__":
  print(_MARKER + json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
