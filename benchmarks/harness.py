"""Timing and cost analysis of one XLA-compiled function: the core of the benchmarks.

``measure(kernel, ...)`` compiles ``kernel.fn`` ahead of time with
``jax.jit(fn).lower(*args).compile()`` (so the compile seconds are separate
from the run), warms it up, then times repeated calls with
``jax.block_until_ready`` and reports:

* median, p10 and p90 seconds per call, and the throughput
  ``kernel.items / median`` (sequences or users per second);
* FLOPs and bytes accessed from XLA's cost analysis of the *optimized*
  executable, hence the achieved FLOP/s and bytes/s, and their fractions of the
  peaks measured in the same run by ``measure_peaks`` (a float32 matmul and a
  streaming array update on the same device);
* memory: ``argument + output + temp - alias`` bytes from
  ``compiled.memory_analysis()`` (what XLA allocates for one call; available on
  CPU), and on accelerators also the device's ``peak_bytes_in_use``;
* the process's CPU seconds per call (robust to other load on the machine),
  minor page faults per call, and the load average before and after.

Kernels that carry state (a train step returns the next state) set
``carry=True``: every call gets the previous call's first output back as its
first argument, so donated buffers are never reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import environment

# A call shorter than this is timed in a loop of back-to-back calls (dispatch
# is asynchronous), so the figure is throughput rather than Python overhead.
MIN_SAMPLE_SECONDS = 2e-3
MAX_INNER_CALLS = 1000

# Where ``measure`` writes a jax.profiler trace of each timed region (None: off).
_profile_dir: str | None = None


def set_profile_dir(path: str | None) -> None:
  """Traces every later timed region into ``path/<group>/<name>`` (None: stop tracing)."""
  global _profile_dir
  _profile_dir = path


def _profiled(group: str, name: str):
  """A trace of the enclosed region if profiling is on, else nothing."""
  if _profile_dir is None:
    return contextlib.nullcontext()
  safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
  return jax.profiler.trace(os.path.join(_profile_dir, group, safe))


@dataclasses.dataclass
class Kernel:
  """One function to benchmark, with example arguments.

  Attributes:
    group: benchmark family ('attention', 'train_step', ...); ``--only`` selects on it.
    name: unique, human-readable id within the run.
    fn: a pure function of ``args``; jitted by the harness.
    args: example arguments (arrays or pytrees of arrays), placed on the device.
    items: sequences (or users) processed per call, for the throughput.
    unit: throughput unit, e.g. 'seq/s' or 'users/s'.
    params: sizes and settings, copied into the result row.
    carry: ``fn(state, *rest) -> (state, out)``; feed the new state back.
    donate_argnums: passed to ``jax.jit`` (only sensible with ``carry``).
    note: a short free-text remark for the table.
    in_shardings: for multi-device kernels, ``jax.jit``'s ``in_shardings``
      (the arguments are placed with them); None = all on one device.
    out_shardings: ``jax.jit``'s ``out_shardings``, with ``in_shardings``.
  """

  group: str
  name: str
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  items: int
  unit: str = "seq/s"
  params: dict[str, Any] = dataclasses.field(default_factory=dict)
  carry: bool = False
  donate_argnums: tuple[int, ...] = ()
  note: str = ""
  in_shardings: Any = None
  out_shardings: Any = None


@dataclasses.dataclass(frozen=True)
class Peaks:
  """This device's measured peaks (best of the repeats)."""

  flops_per_s: float
  bytes_per_s: float


def percentile(values: Sequence[float], q: float) -> float:
  return float(np.percentile(np.asarray(values, np.float64), q))


def cost_analysis(compiled: Any) -> dict[str, float]:
  """FLOPs, transcendentals and bytes accessed of a compiled executable.

  ``Compiled.cost_analysis()`` returns a dict in jax 0.10 (a list with one dict
  per program in older versions; either may be absent on some backends, which
  then yields NaNs). The counts come from XLA's HloCostAnalysis of the
  optimized HLO: a ``while`` loop (``lax.scan``) is costed by its body once
  unless XLA knows the trip count, so recurrent kernels can be undercounted.
  """
  try:
    raw = compiled.cost_analysis()
  except NotImplementedError:
    raw = None
  if isinstance(raw, (list, tuple)):
    raw = raw[0] if raw else None
  raw = raw or {}
  get = lambda key: float(raw[key]) if key in raw else float("nan")
  return {"flops": get("flops"), "transcendentals": get("transcendentals"),
          "bytes_accessed": get("bytes accessed")}


def memory_analysis(compiled: Any) -> dict[str, float]:
  """Bytes XLA allocates for one call: arguments, outputs, temporaries, aliased."""
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    stats = None
  if stats is None:
    nan = float("nan")
    return {"argument_bytes": nan, "output_bytes": nan, "temp_bytes": nan,
            "alias_bytes": nan, "peak_memory_bytes": nan}
  out = {"argument_bytes": float(stats.argument_size_in_bytes),
         "output_bytes": float(stats.output_size_in_bytes),
         "temp_bytes": float(stats.temp_size_in_bytes),
         "alias_bytes": float(stats.alias_size_in_bytes)}
  # Donated (aliased) outputs reuse argument buffers: count them once.
  out["peak_memory_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                              - out["alias_bytes"])
  return out


def device_peak_bytes(device: jax.Device) -> float:
  """``peak_bytes_in_use`` of the device (GPU/TPU); NaN where not reported (CPU)."""
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    stats = None
  if not stats or "peak_bytes_in_use" not in stats:
    return float("nan")
  return float(stats["peak_bytes_in_use"])


def _minor_faults() -> float:
  try:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
  except (AttributeError, OSError):
    return float("nan")


def _call(compiled: Any, kernel: Kernel, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
  """One call; returns the arguments for the next call and the output."""
  out = compiled(*args)
  if kernel.carry:
    state, result = out
    return (state,) + tuple(args[1:]), result
  return args, out


def _block(args: tuple[Any, ...], out: Any) -> None:
  jax.block_until_ready((args[0] if args else None, out))


def measure(kernel: Kernel, *, peaks: Peaks | None = None, repeats: int = 10,
            warmup: int = 2, device: jax.Device | None = None) -> dict[str, Any]:
  """Compiles, warms up and times ``kernel``; returns one result row (a flat dict).

  Args:
    kernel: what to run.
    peaks: the device's peaks, for the fraction-of-peak columns (NaN if None).
    repeats: timed samples (each one call, or a loop of calls if a call is
      shorter than ``MIN_SAMPLE_SECONDS``).
    warmup: untimed calls after compiling.
    device: where to put the arguments; default: the first device.

  Returns:
    The row: ``kernel.params`` plus timing, cost and memory figures (see the
    module docstring and benchmarks/README.md).
  """
  device = device or jax.devices()[0]
  # A fresh copy: donation deletes the buffers it is given, and the kernel's
  # own arguments must survive for a second measurement.
  jit_kwargs: dict[str, Any] = {"donate_argnums": kernel.donate_argnums}
  if kernel.in_shardings is not None:
    args = jax.device_put(kernel.args, kernel.in_shardings, may_alias=False)
    jit_kwargs.update(in_shardings=kernel.in_shardings, out_shardings=kernel.out_shardings)
  else:
    args = jax.device_put(kernel.args, device, may_alias=False)
  jax.block_until_ready(args)
  load_before = environment.load_average()

  start = time.perf_counter()
  lowered = jax.jit(kernel.fn, **jit_kwargs).lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  first_start = time.perf_counter()
  args, out = _call(compiled, kernel, args)
  _block(args, out)
  first_s = time.perf_counter() - first_start
  for _ in range(max(warmup - 1, 0)):
    args, out = _call(compiled, kernel, args)
  _block(args, out)

  inner = 1
  if first_s < MIN_SAMPLE_SECONDS:
    inner = int(min(MAX_INNER_CALLS, math.ceil(MIN_SAMPLE_SECONDS / max(first_s, 1e-7))))
  samples, cpu_samples = [], []
  faults_start = _minor_faults()
  with _profiled(kernel.group, kernel.name), jax.profiler.TraceAnnotation(kernel.name):
    for _ in range(repeats):
      cpu_start, start = time.process_time(), time.perf_counter()
      for _ in range(inner):
        args, out = _call(compiled, kernel, args)
      _block(args, out)
      samples.append((time.perf_counter() - start) / inner)
      cpu_samples.append((time.process_time() - cpu_start) / inner)
  faults = (_minor_faults() - faults_start) / (repeats * inner)
  load_after = environment.load_average()
  _check_finite(out, kernel.name)

  median = percentile(samples, 50)
  cost = cost_analysis(compiled)
  memory = memory_analysis(compiled)
  flops_per_s = cost["flops"] / median
  bytes_per_s = cost["bytes_accessed"] / median
  row: dict[str, Any] = {
      "group": kernel.group,
      "name": kernel.name,
      "params": dict(kernel.params),
      "lower_s": lower_s,
      "compile_s": compile_s,
      "median_s": median,
      "p10_s": percentile(samples, 10),
      "p90_s": percentile(samples, 90),
      "min_s": float(min(samples)),
      # CPU seconds of this process (all threads) per call: unlike wall time,
      # it barely moves when other processes compete for the cores.
      "cpu_s": percentile(cpu_samples, 50),
      # Fresh pages touched per call: buffers the allocator handed back to the
      # OS and got again (4 KiB each; expensive on VMs, see README).
      "page_faults_per_call": faults,
      "repeats": repeats,
      "calls_per_sample": inner,
      "items": kernel.items,
      "throughput": kernel.items / median,
      "throughput_unit": kernel.unit,
      **cost,
      "flops_per_s": flops_per_s,
      "bytes_per_s": bytes_per_s,
      "arithmetic_intensity": cost["flops"] / cost["bytes_accessed"]
                              if cost["bytes_accessed"] else float("nan"),
      "fraction_of_peak_flops": flops_per_s / peaks.flops_per_s if peaks else float("nan"),
      "fraction_of_peak_bandwidth": bytes_per_s / peaks.bytes_per_s if peaks else float("nan"),
      **memory,
      "device_peak_bytes_in_use": device_peak_bytes(device),
      # Other processes on the machine slow every sample: keep the 1-minute load.
      "load_1m_before": load_before[0] if load_before else float("nan"),
      "load_1m_after": load_after[0] if load_after else float("nan"),
      "note": kernel.note,
  }
  return row


def measure_loop(group: str, name: str, fn: Callable[[], Any], *, items: int, unit: str,
                 repeats: int, params: dict[str, Any] | None = None, note: str = "",
                 cost_per_call: dict[str, float] | None = None, calls: int = 1,
                 peaks: Peaks | None = None) -> dict[str, Any]:
  """Times a Python loop over compiled calls end to end (e.g. a whole evaluation pass).

  ``fn()`` must return what to block on. The first call (which compiles) is
  reported as ``compile_s``; ``cost_per_call`` (from ``measure`` of one
  call) times ``calls`` gives the FLOPs and bytes of the loop.
  """
  load_before = environment.load_average()
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first_s = time.perf_counter() - start
  samples, cpu_samples = [], []
  for _ in range(repeats):
    cpu_start, start = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn())
    samples.append(time.perf_counter() - start)
    cpu_samples.append(time.process_time() - cpu_start)
  load_after = environment.load_average()
  _check_finite(out, name)
  median = percentile(samples, 50)
  cost = {key: calls * float((cost_per_call or {}).get(key, float("nan")))
          for key in ("flops", "transcendentals", "bytes_accessed")}
  flops_per_s, bytes_per_s = cost["flops"] / median, cost["bytes_accessed"] / median
  nan = float("nan")
  return {
      "group": group, "name": name, "params": dict(params or {}), "lower_s": nan,
      "compile_s": first_s, "median_s": median, "p10_s": percentile(samples, 10),
      "p90_s": percentile(samples, 90), "min_s": float(min(samples)),
      "cpu_s": percentile(cpu_samples, 50), "page_faults_per_call": nan, "repeats": repeats,
      "calls_per_sample": calls, "items": items, "throughput": items / median,
      "throughput_unit": unit, **cost, "flops_per_s": flops_per_s, "bytes_per_s": bytes_per_s,
      "arithmetic_intensity": cost["flops"] / cost["bytes_accessed"]
                              if cost["bytes_accessed"] else nan,
      "fraction_of_peak_flops": flops_per_s / peaks.flops_per_s if peaks else nan,
      "fraction_of_peak_bandwidth": bytes_per_s / peaks.bytes_per_s if peaks else nan,
      "argument_bytes": nan, "output_bytes": nan, "temp_bytes": nan, "alias_bytes": nan,
      "peak_memory_bytes": nan, "device_peak_bytes_in_use": device_peak_bytes(jax.devices()[0]),
      "load_1m_before": load_before[0] if load_before else nan,
      "load_1m_after": load_after[0] if load_after else nan,
      "note": note,
  }


def attach_peaks(row: dict[str, Any], peaks: Peaks | None) -> dict[str, Any]:
  """Fills a row's fraction-of-peak columns (rows measured in another process)."""
  if peaks is not None and "flops_per_s" in row:
    nan = float("nan")
    flops, moved = row.get("flops_per_s"), row.get("bytes_per_s")
    row["fraction_of_peak_flops"] = flops / peaks.flops_per_s if flops is not None else nan
    row["fraction_of_peak_bandwidth"] = moved / peaks.bytes_per_s if moved is not None else nan
  return row


def _check_finite(out: Any, name: str) -> None:
  """A benchmark of a function that returns NaN measures nothing useful."""
  for leaf in jax.tree.leaves(out):
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
      raise FloatingPointError(f"benchmark {name!r} produced non-finite output.")


# ----------------------------------------------------------------------------
# Peaks.
# ----------------------------------------------------------------------------


def peak_kernels(quick: bool) -> list[Kernel]:
  """A large float32 matmul (FLOP/s) and a streaming ``x + 1`` (bytes/s)."""
  n = 1024 if quick else 2048
  elements = (16 if quick else 64) * 2**20
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  x = jnp.zeros((elements,), jnp.float32)
  return [
      Kernel("peaks", f"matmul_f32_{n}", lambda a, b: a @ b, (a, b), items=1, unit="calls/s",
             params={"n": n, "dtype": "float32"},
             note="peak FLOP/s: the best (min-time) sample"),
      # x + 1 in place (not a bare copy, which XLA may elide): read 4N bytes,
      # write 4N. Donated, so that no fresh output buffer is page-faulted in
      # each call (which on a VM costs more than the copy itself).
      Kernel("peaks", f"stream_f32_{elements // 2**20}M", lambda x: (x + 1.0, ()), (x,),
             items=1, unit="calls/s", carry=True, donate_argnums=(0,),
             params={"elements": elements, "dtype": "float32"},
             note="peak bytes/s: the best (min-time) sample, in place"),
  ]


def measure_peaks(quick: bool, repeats: int) -> tuple[Peaks, list[dict[str, Any]]]:
  """Measures this device's FLOP/s and memory bandwidth; returns them and their rows.

  The peak is the best sample (minimum time), since other load on the machine
  only ever slows a sample down. The FLOP and byte counts are the analytic ones
  (``2 n^3``; ``8 * elements``), which XLA's cost analysis reproduces.
  """
  matmul, stream = peak_kernels(quick)
  rows = [measure(matmul, repeats=repeats), measure(stream, repeats=repeats)]
  n = matmul.params["n"]
  flops = 2.0 * n**3
  moved = 8.0 * stream.params["elements"]
  peaks = Peaks(flops_per_s=flops / rows[0]["min_s"], bytes_per_s=moved / rows[1]["min_s"])
  for row in rows:
    row["fraction_of_peak_flops"] = row["flops_per_s"] / peaks.flops_per_s
    row["fraction_of_peak_bandwidth"] = row["bytes_per_s"] / peaks.bytes_per_s
  return peaks, rows
