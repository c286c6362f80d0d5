r"""A model of memory and step time against catalogue size, checked on benchmarks.catalogue.

  python -m benchmarks.catalogue_model   # the committed cpu-2core rows; Markdown to stdout

The model (docs/scaling.md explains each term). Per device, with ``R`` table
rows (``N + 1`` rounded up to 128), width ``d``, a ``data x model`` mesh of
``D`` devices, float32:

* table: ``T = 4 R d / model`` bytes; optimizer moments ``2 T`` (dense Adam,
  lazy Adam) or ``4 R / model`` (row-wise Adagrad); every other parameter is
  replicated, with its Adam moments: ``3 P_rest``.
* the train step's peak adds ``g_opt * T`` (the dense gradient and Adam's
  temporaries; ``g`` fitted) plus what does not depend on ``N``.
* the step time is ``t_opt + s_opt * D * T``: a part that depends on the
  batch only and one that streams the table. On forced CPU devices all ``D``
  devices share the host's cores and memory bandwidth, hence the ``D``.

The fit (least squares per optimizer) is printed beside each measurement,
then the projection to 1e8-1e9 items on an 8-GPU host and a TPU pod slice,
from the same counts with stated device figures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

_ROWS = flags.DEFINE_list("rows", ["benchmarks/results/cpu-2core/catalogue.json",
                                   "benchmarks/results/cpu-2core/catalogue_1e8.json"],
                          "JSON files of benchmarks.catalogue rows, fitted together.")

_MB = 2.0**20
_GB = 2.0**30
ROW_MULTIPLE = 128  # models/item_embedding.py
# Accelerators of the projection: HBM bytes, HBM bytes/s, collective bytes/s
# per device (NVLink / ICI, one direction), all public figures.
DEVICES = {
    "8x H100 80GB (one host)": dict(count=8, memory=80 * _GB, hbm=3.35e12, link=450e9),
    "TPU v5p-128 (64 chips)": dict(count=64, memory=95 * _GB, hbm=2.76e12, link=200e9),
    "TPU v5p-512 (256 chips)": dict(count=256, memory=95 * _GB, hbm=2.76e12, link=200e9),
}
# Bytes of table-sized traffic per dense Adam step, in units of T: the
# gradient written (zeros + scatter-add: 2), Adam reading g, m, v, p (4) and
# writing m, v, p (3).
DENSE_PASSES = 9
# Arrays of [U, d] a row-sparse step all-reduces over 'model': the rows for
# the forward pass (the update runs per shard, with no collective).
SPARSE_ALL_REDUCED = {"lazy_adam": 1, "rowwise_adagrad": 1}


def table_rows(num_items: int) -> int:
  return -(-(num_items + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


def table_bytes(num_items: int, dim: int, model: int) -> float:
  return 4.0 * table_rows(num_items) * dim / model


def moment_bytes(optimizer: str, num_items: int, dim: int, model: int) -> float:
  if optimizer == "rowwise_adagrad":
    return 4.0 * table_rows(num_items) / model
  return 2 * table_bytes(num_items, dim, model)


def _ring(n: int) -> float:
  """Bytes each device sends per byte all-reduced over ``n`` devices (ring algorithm)."""
  return 2 * (n - 1) / n


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """Least-squares ``y = a + b x``."""
  if len(x) < 2 or np.ptp(x) == 0:
    return float(np.mean(y)), 0.0
  b, a = np.polyfit(x, y, 1)
  return float(a), float(b)


def fit(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Per optimizer: rest-parameter bytes, peak-memory and time coefficients."""
  fits = {}
  for optimizer in sorted({r["item_optimizer"] for r in rows}):
    ok = [r for r in rows if r["item_optimizer"] == optimizer and "train_ms" in r]
    if not ok:
      continue
    table = np.array([table_bytes(r["num_items"], r["dim"], r["model"]) for r in ok])
    devices = np.array([r["data"] * r["model"] for r in ok])
    rest = np.median([r["params_mb"] * _MB - t for r, t in zip(ok, table, strict=True)])
    extra = np.array([(r["train_mb"] - r["state_mb"]) * _MB for r in ok])
    peak_a, peak_b = _fit(table, extra)
    seconds = np.array([r["train_ms"] for r in ok]) / 1e3
    # Dense also all-reduces the [rows / model, d] table gradient over 'data'.
    features = [np.ones_like(table), devices * table]
    if optimizer == "dense":
      features.append(devices * table * np.array([_ring(r["data"]) for r in ok]))
    coefficients = np.linalg.lstsq(np.stack(features, 1), seconds, rcond=None)[0]
    time_a, time_b, time_c = (list(coefficients) + [0.0])[:3]
    fits[optimizer] = dict(rest=rest, peak_a=peak_a, peak_b=peak_b, time_a=time_a,
                           time_b=time_b, time_c=time_c)
  return fits


def predict(row: dict[str, Any], f: dict[str, float]) -> dict[str, float]:
  optimizer, n, d, m = row["item_optimizer"], row["num_items"], row["dim"], row["model"]
  table = table_bytes(n, d, m)
  state = table + moment_bytes(optimizer, n, d, m) + 3 * f["rest"]
  return dict(state_mb=state / _MB,
              train_mb=(state + f["peak_a"] + f["peak_b"] * table) / _MB,
              train_ms=1e3 * (f["time_a"] + row["data"] * m * table
                              * (f["time_b"] + f["time_c"] * _ring(row["data"]))))


def _pct(measured: float, predicted: float) -> str:
  return f"{100 * (predicted - measured) / measured:+.0f} %"


def checked_table(rows: Sequence[dict[str, Any]], fits: dict[str, dict[str, float]]) -> str:
  lines = ["| items | mesh | item optimizer | state MB/dev measured / model | "
           "train-step MB/dev measured / model | step ms measured / model |",
           "|---:|:---:|:---|---:|---:|---:|"]
  for r in rows:
    f = fits.get(r["item_optimizer"])
    if f is None or "train_ms" not in r:
      lines.append(f"| {r['num_items']:,} | {r['data']}x{r['model']} | {r['item_optimizer']} "
                   f"| | | {r.get('note', 'not measured')} |")
      continue
    p = predict(r, f)
    lines.append(
        f"| {r['num_items']:,} | {r['data']}x{r['model']} | {r['item_optimizer']} | "
        f"{r['state_mb']:,.1f} / {p['state_mb']:,.1f} | "
        f"{r['train_mb']:,.1f} / {p['train_mb']:,.1f} ({_pct(r['train_mb'], p['train_mb'])}) | "
        f"{r['train_ms']:,.0f} / {p['train_ms']:,.0f} ({_pct(r['train_ms'], p['train_ms'])}) |")
  return "\n".join(lines)


def fit_table(fits: dict[str, dict[str, float]]) -> str:
  lines = ["| item optimizer | step peak minus state: MB + x T | step ms: fixed | "
           "+ ms per GB of D T | + ms per GB of D T ring(data) |",
           "|:---|---:|---:|---:|---:|"]
  for name, f in fits.items():
    lines.append(f"| {name} | {f['peak_a'] / _MB:,.1f} + {f['peak_b']:.2f} T | "
                 f"{1e3 * f['time_a']:,.0f} | {1e3 * f['time_b'] * _GB:,.1f} | "
                 f"{1e3 * f['time_c'] * _GB:,.1f} |")
  return "\n".join(lines)


def touched_slots(batch: int, max_len: int, negatives: int, num_items: int) -> int:
  """``U``: id slots of a step (inputs, targets, per-position negatives), at most ``R``."""
  return min(1 + batch * max_len * (2 + negatives), table_rows(num_items))


def project(fits: dict[str, dict[str, float]], device: dict[str, float], num_items: int,
            dim: int, optimizer: str, slots: int) -> dict[str, Any] | None:
  """The smallest 'model' axis on which a step fits, and its per-device cost; None if none."""
  count = int(device["count"])
  for model in (2**i for i in range(8)):  # 'model' must divide ROW_MULTIPLE
    if model > count:
      break
    data = count // model
    table = table_bytes(num_items, dim, model)
    state = table + moment_bytes(optimizer, num_items, dim, model)
    extra = max(fits.get(optimizer, {}).get("peak_b", 0.0), 0.0) * table
    # The batch's looked-up rows and their gradient (both steps); the sparse
    # step also holds the touched rows' moments and updates.
    extra += (2 if optimizer == "dense" else 6) * 4.0 * slots * dim
    peak = state + extra
    if peak > 0.9 * device["memory"]:
      continue
    if optimizer == "dense":
      # Table-sized HBM passes, and the table gradient's all-reduce over 'data'.
      seconds = DENSE_PASSES * table / device["hbm"] + _ring(data) * table / device["link"]
    else:
      # The touched rows all-reduced over 'model' (masked gathers), their
      # gradient all-reduced over 'data'.
      rows = 4.0 * slots * dim
      seconds = (SPARSE_ALL_REDUCED[optimizer] * _ring(model) * rows
                 + _ring(data) * rows) / device["link"]
    return dict(mesh=f"{data}x{model}", state=state, peak=peak, ms=1e3 * seconds)
  return None


def projection_table(fits: dict[str, dict[str, float]], batch: int, max_len: int,
                     negatives: int) -> str:
  """Per device: the mesh that fits, memory and the table's share of step time."""
  lines = [f"Global batch {batch}, length {max_len}, {negatives} sampled negatives per "
           "position. For each case, the smallest 'model' axis (rows of the table split "
           "over it, replicated over 'data') on which the train step's peak fits in 90 % "
           "of device memory. 'table ms' is only the part of the step that depends on "
           f"the table: dense, {DENSE_PASSES} table-sized HBM passes plus the table "
           "gradient's all-reduce over 'data'; sparse, the all-reduces of the touched "
           "rows over 'model' and of their gradient over 'data', at the device's link "
           "bandwidth. The model's own compute comes on top and does not depend on N.",
           "",
           "| devices | items | d | item optimizer | U (touched rows) | mesh data x model | "
           "state GB/device | step peak GB/device | table ms/step |",
           "|:---|---:|---:|:---|---:|:---:|---:|---:|---:|"]
  for name, device in DEVICES.items():
    for n in (10**8, 10**9):
      for d in (64, 128):
        slots = touched_slots(batch, max_len, negatives, n)
        for optimizer in ("dense", "lazy_adam", "rowwise_adagrad"):
          cost = project(fits, device, n, d, optimizer, slots)
          head = f"| {name} | {n:.0e} | {d} | {optimizer} | {slots:,} |"
          if cost is None:
            lines.append(f"{head} none fits | | | |")
          else:
            lines.append(f"{head} {cost['mesh']} | {cost['state'] / _GB:,.1f} | "
                         f"{cost['peak'] / _GB:,.1f} | {cost['ms']:,.1f} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  rows = []
  for path in _ROWS.value:
    with open(path, encoding="utf-8") as f:
      rows += json.load(f)
  if not rows:
    raise app.UsageError(f"{_ROWS.value}: no rows")
  fits = fit(rows)
  print("### Fitted coefficients (T = table bytes per device)\n")
  print(fit_table(fits))
  print("\n### Measured against the model\n")
  print(checked_table(rows, fits))
  print("\n### Projection\n")
  print(projection_table(fits, batch=1024, max_len=200, negatives=0))
  print()
  print(projection_table(fits, batch=1024, max_len=200, negatives=128))


if __name__ == "__main__":
  app.run(main)
