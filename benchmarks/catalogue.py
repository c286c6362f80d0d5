r"""Large catalogues: the item table split by rows over the 'model' mesh axis.

  python -m benchmarks.catalogue --out=benchmarks/results/catalogue.md

For each catalogue size (default 1e5, 1e6, 1e7 items), each mesh shape
``data x model`` over 8 forced CPU devices (default 8x1, 4x2, 2x4, 1x8) and
each way of updating the item table (``--item_optimizers``: dense Adam, lazy
Adam, row-wise Adagrad; ``deeprec_jax/row_sparse.py``),
a fresh process (XLA reads the device count once) builds SASRec with
``train.model_parallel = model``, creates the train state directly in its
shardings (the full table never exists on one device), and reports:

* parameter and train-state (parameters + Adam moments) bytes per device,
  from the arrays' own shards: the item table's share falls as 1 / model;
* the compiled train step's and evaluation step's per-device memory
  (``memory_analysis``: arguments + outputs + temporaries - aliased);
* median wall time of the train step (sampled softmax, as a catalogue this
  size needs: full-softmax logits would be ``[B * L, N]``) and of the
  full-ranking evaluation step (every item scored for each user).

Times on forced host devices share the machine's cores, so they show the
cost of the collectives and the per-device work, not a speed-up. A
configuration whose estimated host memory (per-device bytes x devices)
exceeds ``--max_host_gb`` is skipped and marked so, before anything big is
allocated.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deeprec_jax import evaluate, models, optimizers, sharding, train
from experiments.configs import default

_NUM_ITEMS = flags.DEFINE_list("num_items", ["100000", "1000000", "10000000"],
                               "Catalogue sizes.")
_MESHES = flags.DEFINE_list("meshes", ["8x1", "4x2", "2x4", "1x8"],
                            "Mesh shapes data x model; their products are the device count.")
_DIM = flags.DEFINE_integer("dim", 16, "Embedding width (small, so that 1e7 items fit).")
_BATCH = flags.DEFINE_integer("batch", 64, "Global train batch.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "Global eval batch (0 = --batch); its "
                                   "scores are [eval_batch, items / model] per device.")
_MAX_LEN = flags.DEFINE_integer("max_len", 20, "Input length.")
_NEGATIVES = flags.DEFINE_integer("num_negatives", 16, "Sampled negatives per target.")
_OPTIMIZERS = flags.DEFINE_list("item_optimizers", ["dense", "lazy_adam", "rowwise_adagrad"],
                                "train.item_optimizer values to compare (row_sparse.py).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per step (after one warm-up).")
_MAX_HOST_GB = flags.DEFINE_float("max_host_gb", 10.0,
                                  "Skip configurations estimated to need more host memory.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "Per-configuration time limit.")
_OUT = flags.DEFINE_string("out", "", "Markdown file for the table, and its rows as .json "
                           "beside it ('' = stdout only).")
_CHILD = flags.DEFINE_string("child", "", "Internal: one configuration as JSON.")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MARKER = "CATALOGUE_ROW "
_MB = 2.0**20


def _child_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{xla_flags.strip()} --xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  # jax 0.10 with forced host devices can deadlock in all-reduce unless NPROC
  # is at least twice the device count (shared/design.md).
  env["NPROC"] = str(max(2 * devices, int(env.get("NPROC", "0") or 0)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH", "")]))
  return env


def _per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of arrays or sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
  return total


def _compiled_bytes(compiled: Any) -> int:
  stats = compiled.memory_analysis()
  if stats is None:
    return -1
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _time(fn, repeats: int) -> float:
  """Median seconds of ``fn()`` (which blocks until its result is ready)."""
  fn()  # Warm-up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
  """Measures one (num_items, mesh) configuration in this process.

  The parent started it with the forced device count in ``XLA_FLAGS``.
  """
  num_items, data, model_axis = spec["num_items"], spec["data"], spec["model"]
  batch, max_len, dim = spec["batch"], spec["max_len"], spec["dim"]
  eval_batch = spec.get("eval_batch") or batch
  config = default.get_config()
  config.model.update(dim=dim, num_blocks=1, dropout_rate=0.0)
  config.train.update(loss="sampled_softmax", num_negatives=spec["num_negatives"],
                      model_parallel=model_axis, item_optimizer=spec["item_optimizer"])
  mesh = sharding.make_mesh(data * model_axis, model_axis)
  model = models.create_model(config.model, num_items=num_items, num_users=1, max_len=max_len)
  tx = optimizers.create_optimizer(config.train, total_steps=1000, mesh=mesh)

  def init_state():
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, max_len), jnp.int32))["params"]
    rng = jax.random.key_data(jax.random.key(1, impl=train.DROPOUT_RNG_IMPL))
    return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0), rng=rng)

  abstract = jax.eval_shape(init_state)
  shardings = sharding.param_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  row = dict(spec, params_mb=_per_device_bytes(abstract["params"]) / _MB,
             state_mb=_per_device_bytes(abstract) / _MB)

  rng = np.random.default_rng(0)
  items = lambda *shape: rng.integers(1, num_items + 1, size=shape).astype(np.int32)
  train_batch = sharding.to_global(dict(
      item_seq=items(batch, max_len), targets=items(batch, max_len),
      negatives=items(batch, max_len, spec["num_negatives"]),
      user=np.zeros((batch,), np.int32)), mesh)
  eval_inputs = sharding.to_global(dict(
      item_seq=items(eval_batch, max_len), target=items(eval_batch),
      exclude=items(eval_batch, 32), sampled_negatives=items(eval_batch, 100),
      user=np.zeros((eval_batch,), np.int32), weight=np.ones((eval_batch,), np.float32)), mesh)

  step = jax.jit(train.make_train_step(model, tx, loss="sampled_softmax", num_items=num_items),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  eval_fn = evaluate.make_eval_step(model, num_items, (10,))
  eval_step = jax.jit(eval_fn,
                      in_shardings=(shardings["params"], sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
  start = time.perf_counter()
  compiled_step = step.lower(abstract, train_batch).compile()
  compiled_eval = eval_step.lower(abstract["params"], eval_inputs).compile()
  row["compile_s"] = time.perf_counter() - start
  row["train_mb"] = _compiled_bytes(compiled_step) / _MB
  row["eval_mb"] = _compiled_bytes(compiled_eval) / _MB
  # The train step's arguments are the state; evaluation reads the state's
  # params while the optimizer moments stay allocated.
  per_device_mb = max(row["train_mb"], row["state_mb"] + row["eval_mb"] - row["params_mb"])
  host_gb = per_device_mb * data * model_axis / 1024
  row["host_gb_estimate"] = host_gb
  if host_gb > spec["max_host_gb"]:
    row["note"] = f"skipped: needs ~{host_gb:.1f} GB of host memory (> {spec['max_host_gb']})"
    return row

  state = jax.jit(init_state, out_shardings=shardings)()
  measured = _per_device_bytes(state["params"]) / _MB
  assert abs(measured - row["params_mb"]) < 1e-6, (measured, row["params_mb"])
  def train_once():
    nonlocal state
    state, metrics = compiled_step(state, train_batch)
    row["loss"] = float(metrics["loss"])  # Also waits for the step.

  row["train_ms"] = 1e3 * _time(train_once, spec["repeats"])
  if not np.isfinite(row["loss"]):
    row["note"] = f"non-finite loss {row['loss']}"
  # The last state is not donated until the next step: evaluate its params.
  row["eval_ms"] = 1e3 * _time(
      lambda: jax.block_until_ready(compiled_eval(state["params"], eval_inputs)), spec["repeats"])
  return row


def _run_spec(spec: dict[str, Any], timeout_s: int) -> dict[str, Any]:
  devices = spec["data"] * spec["model"]
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.catalogue", f"--child={json.dumps(spec)}"],
        cwd=_REPO, env=_child_env(devices), capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(spec, note=f"timed out after {timeout_s} s")
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_MARKER):
      return json.loads(line[len(_MARKER):])
  reason = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
  errors = [line for line in proc.stderr.splitlines() if "Error" in line] or [""]
  return dict(spec, note=f"failed: {reason} {errors[-1][:160]}")


def _cell(row: dict[str, Any], key: str, digits: int = 1) -> str:
  value = row.get(key)
  return "" if value is None else f"{value:,.{digits}f}"


def markdown(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
  """The results as a Markdown table, with the settings above it."""
  lines = [
      "## Item table split over the 'model' mesh axis",
      "",
      f"SASRec (1 block, d={settings['dim']}), batch {settings['batch']}, "
      f"length {settings['max_len']}, sampled softmax with {settings['num_negatives']} "
      "negatives, Adam for every parameter but the item table, which the "
      "optimizer column updates (dense Adam, or row-sparse: row_sparse.py); "
      "evaluation scores every item (batch "
      f"{settings['eval_batch'] or settings['batch']}); {settings['devices']} forced CPU "
      "devices sharing "
      f"{os.cpu_count()} cores. Per-device MB from the arrays' shards (params; "
      "params + optimizer moments) and from XLA's memory analysis of each compiled step.",
      "",
      "| items | mesh data x model | item optimizer | params MB/device | state MB/device | "
      "train step MB/device | eval step MB/device | train step ms | eval step ms | note |",
      "|---:|:---:|:---|---:|---:|---:|---:|---:|---:|:---|",
  ]
  for row in rows:
    lines.append(
        f"| {row['num_items']:,} | {row['data']}x{row['model']} | "
        f"{row.get('item_optimizer', 'dense')} | {_cell(row, 'params_mb')} | "
        f"{_cell(row, 'state_mb')} | {_cell(row, 'train_mb')} | {_cell(row, 'eval_mb')} | "
        f"{_cell(row, 'train_ms', 0)} | {_cell(row, 'eval_ms', 0)} | {row.get('note', '')} |")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CHILD.value:
    print(_MARKER + json.dumps(run_child(json.loads(_CHILD.value))), flush=True)
    return
  meshes = [tuple(int(n) for n in shape.split("x")) for shape in _MESHES.value]
  devices = {data * model for data, model in meshes}
  if len(devices) != 1:
    raise app.UsageError(f"--meshes must all have the same device count, got {_MESHES.value}")
  settings = dict(dim=_DIM.value, batch=_BATCH.value, eval_batch=_EVAL_BATCH.value,
                  max_len=_MAX_LEN.value,
                  num_negatives=_NEGATIVES.value, devices=devices.pop())
  rows = []
  for num_items in (int(float(n)) for n in _NUM_ITEMS.value):
    for data, model in meshes:
      for item_optimizer in _OPTIMIZERS.value:
        spec = dict(settings, num_items=num_items, data=data, model=model,
                    item_optimizer=item_optimizer, repeats=_REPEATS.value,
                    max_host_gb=_MAX_HOST_GB.value)
        del spec["devices"]
        row = _run_spec(spec, _TIMEOUT.value)
        print(json.dumps(row), flush=True)
        rows.append(row)
  table = markdown(rows, settings)
  print(table)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(table)
    # The rows themselves, for benchmarks.catalogue_model.
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
