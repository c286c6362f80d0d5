"""Where numbers go: metrics.jsonl, TensorBoard event files and the console.

Only process 0 writes; the others get a writer that drops everything, so the
training loop never has to ask which process it is on.
"""

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

import jax
import numpy as np
import tqdm


def strict_json(value: Any) -> Any:
  """``value`` with every non-finite float (e.g. an infinite epsilon) replaced by None.

  JSON has no Infinity or NaN: Python's ``json`` would write the bare tokens,
  which strict parsers (``jq``, JavaScript, ...) reject. Dicts, lists and
  tuples are converted recursively (tuples become lists). Write the result
  with ``allow_nan=False``.
  """
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).item()
  return value


class MetricWriter:
  """Appends one JSON object per line to ``workdir/metrics.jsonl`` and logs to TensorBoard.

  The lines are strict JSON: a non-finite value is written as null
  (``strict_json``); TensorBoard gets the value itself.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    try:
      import tensorboardX  # Optional at import time: plain jsonl still works without it.
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tensorboard = None

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """Records ``metrics`` of ``split`` (train, valid, test) at ``step``."""
    if not self._enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
    self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in record.items():
        if name not in ("step", "split") and isinstance(value, (int, float)):
          # TensorBoard tags may not contain "@": hr@10 becomes hr_at_10.
          tag = f"{split}/{name}".replace("@", "_at_")
          self._tensorboard.add_scalar(tag, value, int(step))
      self._tensorboard.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()


def progress(items: Iterable[Any], description: str, enabled: bool = True,
             stream: TextIO = sys.stderr) -> Iterable[Any]:
  """``items``, with a transient ``tqdm`` bar on a terminal (nothing when piped)."""
  if not (enabled and stream.isatty()):
    return items
  total = len(items) if hasattr(items, "__len__") else None
  return tqdm.tqdm(items, desc=description, total=total, file=stream, leave=False,
                   unit="batch", dynamic_ncols=True)


class ProgressBar:
  """Training progress: step, loss, steps/s, sequences/s, ETA (and DP epsilon).

  On a terminal a ``tqdm`` bar redraws in place; when the stream is piped or
  a file, one plain line is printed every ``line_every`` of the run (and at
  the end), so logs stay short. ``epsilon``, when set (a private run, at each
  evaluation), is shown too.
  """

  def __init__(self, total_steps: int, sequences_per_step: int, enabled: bool = True,
               stream: TextIO = sys.stderr, initial_step: int = 0, line_every: float = 0.1):
    self._total = max(total_steps, 1)
    self._sequences_per_step = sequences_per_step
    self._enabled = enabled
    self._stream = stream
    self._last_time = time.perf_counter()
    self._last_step = None
    self._start = (time.perf_counter(), initial_step)
    self._line_steps = max(1, int(self._total * line_every))
    self._next_line = initial_step + self._line_steps
    self._bar = None
    self.epsilon: float | None = None  # privacy: epsilon of the latest evaluation
    if enabled and stream.isatty():
      self._bar = tqdm.tqdm(total=self._total, initial=initial_step, file=stream, unit="step",
                            dynamic_ncols=True, leave=True)

  def update(self, step: int, loss: float) -> dict[str, float]:
    """Shows ``step``; returns the throughput since the last update."""
    now = time.perf_counter()
    rates = {}
    if self._last_step is not None and step > self._last_step:
      steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
      rates = {"steps_per_sec": steps_per_sec,
               "sequences_per_sec": steps_per_sec * self._sequences_per_step}
    self._last_time, self._last_step = now, step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      postfix = {"loss": f"{loss:.4f}"}
      if rates:
        postfix["seq/s"] = f"{rates['sequences_per_sec']:.0f}"
      if self.epsilon is not None:
        postfix["eps"] = f"{self.epsilon:.3g}"
      self._bar.set_postfix(postfix, refresh=True)
      if step >= self._total:
        self._bar.close()
    elif self._enabled and (step >= self._next_line or step >= self._total):
      self._next_line = step + self._line_steps
      self._stream.write(self._line(step, loss, rates, now) + "\n")
      self._stream.flush()
    return rates

  def _line(self, step: int, loss: float, rates: dict[str, float], now: float) -> str:
    text = f"step {step}/{self._total} ({100 * step / self._total:.0f}%) loss {loss:.4f}"
    if rates:
      text += (f" | {rates['steps_per_sec']:.1f} steps/s "
               f"{rates['sequences_per_sec']:.0f} seq/s")
    if self.epsilon is not None:
      text += f" | epsilon {self.epsilon:.3g}"
    start_time, start_step = self._start
    if step > start_step and step < self._total:
      eta = (self._total - step) * (now - start_time) / (step - start_step)
      text += f" | ETA {int(eta) // 60}:{int(eta) % 60:02d}"
    return text
