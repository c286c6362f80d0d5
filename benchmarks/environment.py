"""What the numbers depend on: device, software versions, flags, load, date, commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any

import flax
import jax
import jaxlib


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def load_average() -> list[float]:
  """1, 5 and 15 minute load averages (empty where the OS has none)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (AttributeError, OSError):
    return []


def _git_commit() -> str:
  try:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                         text=True, timeout=10, check=True)
    commit = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                           text=True, timeout=10, check=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return ""


def collect() -> dict[str, Any]:
  """What the numbers depend on: device, software versions, flags, load, date."""
  device = jax.devices()[0]
  return {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": jax.device_count(),
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_average": load_average(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "nproc_env": os.environ.get("NPROC", ""),
      "ld_preload": os.environ.get("LD_PRELOAD", ""),
      # Scheduling priority: `nice -n -20` makes a run on a shared machine
      # approximate an idle one (see benchmarks/README.md).
      "nice": os.nice(0),
      "prng_impl": jax.config.jax_default_prng_impl,
      "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir or "",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": _git_commit(),
      "hostname": platform.node(),
  }
