"""Where a compiled step spends its time, per model component, from a profiler trace.

``profile(compiled, args)`` runs a few calls of an already compiled function
under ``jax.profiler.trace``, reads the trace back (jaxlib's
``ProfileData``), and adds up the time of every executed HLO instruction.
Each instruction carries the JAX ``op_name`` it came from (e.g.
``jit(train_step)/jvp(Model)/block_0/attention/Dropout_0/...``), so the time
can be attributed to model components (attention, FFN, dropout RNG, layer
norm, embeddings, loss, optimizer) and to the forward or backward pass.

This breakdown comes from one real step, so unlike timing the pieces
separately it needs no subtraction and sees XLA's fusion across pieces. Times
are thread-busy milliseconds per call summed over XLA's worker threads (on 2
cores about twice the wall time when both are busy); other processes on the
machine stretch them, but the shares stay comparable.

The trace reader is jaxlib's (``jax._src.lib._profile_data``): not a public
API, so a failure here yields no rows rather than failing the run.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Any

import jax

# (category, pattern on the op_name), first match wins; order matters.
CATEGORIES = (
    ("dropout RNG", r"rng_bit_generator|threefry|philox|_bernoulli|_uniform|random_bits|rbg"),
    ("dropout apply", r"Dropout"),
    ("attention", r"attention"),
    ("FFN", r"ffn"),
    ("layer norm", r"ln_|LayerNorm|final_ln|embed_ln|head_ln"),
    ("embeddings", r"item_embed|pos_embed|user_embed|Embed"),
    ("optimizer", r"adam|optax|scale_by|update_moment|apply_updates|bias_correction"),
    ("loss", r"bce|softplus|logsumexp|_item_logits|loss|take_along_axis|_take"),
)
# Control-flow wrappers whose children are traced too: not counted twice.
_WRAPPERS = re.compile(r"^(call|while|conditional|async|ThunkExecutor|.*\$)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


def op_names(compiled: Any) -> dict[str, str]:
  """``{HLO instruction name: JAX op_name}`` for every instruction in the module."""
  names = {}
  for line in compiled.as_text().splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def categorize(op_name: str) -> tuple[str, str]:
  """``(component, pass)`` of one op_name; pass is 'forward', 'backward' or 'update'."""
  category = next((c for c, pattern in CATEGORIES if re.search(pattern, op_name)), "other")
  if "transpose(" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    phase = "update" if category == "optimizer" else "other"
  return category, phase


def _read_events(trace_dir: str) -> list[tuple[str, float]]:
  from jax._src.lib import _profile_data  # Private: see the module docstring.

  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  events = []
  for path in paths:
    data = _profile_data.ProfileData.from_file(path)
    for plane in data.planes:
      for line in plane.lines:
        if line.name == "python":
          continue
        events += [(event.name, event.duration_ns * 1e-9) for event in line.events]
  return events


def profile(compiled: Any, args: tuple[Any, ...], *, calls: int = 3, carry: bool = False,
            top: int = 12) -> dict[str, Any]:
  """Seconds per call by component and pass, plus the top instructions.

  Args:
    compiled: a ``jax.jit(...).lower(...).compile()`` executable.
    args: its arguments (already placed; with ``carry`` the first one is the
      state, fed back from each call's first output, so donated buffers are
      consumed: do not reuse ``args`` afterwards).
    calls: profiled calls.
    carry: see ``harness.Kernel.carry``.
    top: how many of the most expensive instructions to list.

  Returns:
    ``{'components': [{'component', 'pass', 'busy_s', 'share'}], 'top_ops':
    [{'op', 'op_name', 'busy_s'}], 'busy_s': total, 'cpu_s', 'coverage'}``,
    busy seconds per call summed over threads, the process CPU seconds per
    call and their ratio; empty lists if the trace could not be read.
  """
  names = op_names(compiled)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      out = None
      cpu_start = time.process_time()
      for _ in range(calls):
        out = compiled(*args)
        if carry:
          args = (out[0],) + tuple(args[1:])
      jax.block_until_ready(out)
      cpu_s = (time.process_time() - cpu_start) / calls
    try:
      events = _read_events(trace_dir)
    except Exception:  # noqa: BLE001  (private reader: any failure means no rows)
      events = []
  per_op: collections.Counter = collections.Counter()
  for name, seconds in events:
    if name in names and not _WRAPPERS.match(name):
      per_op[name] += seconds / calls
  per_component: collections.Counter = collections.Counter()
  for name, seconds in per_op.items():
    per_component[categorize(names[name])] += seconds
  total = sum(per_component.values())
  return {
      "busy_s": total,
      # Traced op time over process CPU time: ops that XLA runs without a
      # trace event (e.g. some kernels when YNNPACK fusions are off) are missing.
      "cpu_s": cpu_s,
      "coverage": total / cpu_s if cpu_s > 0 else float("nan"),
      "components": [{"component": c, "pass": p, "busy_s": s, "share": s / total}
                     for (c, p), s in per_component.most_common()],
      "top_ops": [{"op": name, "op_name": names[name], "busy_s": s}
                  for name, s in per_op.most_common(top)],
  }
