"""Data-parallel weak scaling of the SASRec train step over 1, 2, 4, 8 devices.

Each device count runs in its own process (``benchmarks.subproc``) with that
many forced host devices (``--xla_force_host_platform_device_count``) and
``NPROC >= 2 * devices`` (the all-reduce deadlock guard). The per-device
batch is fixed (weak scaling), so with perfect scaling the step time stays
flat: ``efficiency = t_1 / t_N``, and ``speed-up = N * efficiency`` in
sequences per second.

On a 2-core CPU, forced devices share those 2 cores: efficiency can at best
be about ``min(N, cores) / N``. The figure is there to check that the sharded
step compiles, runs and does not serialize on its all-reduce; the same code
on a multi-chip accelerator gives the real scaling.
"""

from __future__ import annotations

from typing import Any

from benchmarks import subproc

DEVICE_COUNTS = (1, 2, 4, 8)
QUICK_DEVICE_COUNTS = (1, 2)
PER_DEVICE_BATCH = 16
QUICK_PER_DEVICE_BATCH = 8
QUICK_MAX_LEN = 50


def scaling_rows(quick: bool, repeats: int,
                 device_counts: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
  """One row per device count, with ``efficiency`` and ``speedup`` added."""
  counts = device_counts or (QUICK_DEVICE_COUNTS if quick else DEVICE_COUNTS)
  per_device = QUICK_PER_DEVICE_BATCH if quick else PER_DEVICE_BATCH
  rows = []
  for devices in counts:
    spec = {"devices": devices, "per_device_batch": per_device, "repeats": repeats,
            "group": "scaling", "name": f"sasrec_weak_{devices}dev", "quick": quick}
    if quick:
      spec["max_len"] = QUICK_MAX_LEN
    rows.append(subproc.run(spec))
  base = next((r for r in rows if r.get("params", {}).get("devices") == 1 and "error" not in r),
              None)
  for row in rows:
    if base is None or "error" in row:
      continue
    devices = row["params"]["devices"]
    row["efficiency"] = base["median_s"] / row["median_s"]
    row["speedup"] = devices * row["efficiency"]
  return rows
