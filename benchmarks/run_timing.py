r"""Seconds per train step and per epoch of finished runs, from their metrics.jsonl.

  python -m benchmarks.run_timing RUN_DIR [RUN_DIR ...] [--markdown] [--steps_per_epoch=N]

Each ``train`` row of ``metrics.jsonl`` carries ``steps_per_sec`` over the
steps since the row before it. The median over a run's rows is robust to the
few intervals that a paused or shared machine stretched (the mean is not).
Steps per epoch come from the rows' ``epoch`` field (for runs shorter than
an epoch, give ``--steps_per_epoch``). The first row (compile) is left out.
"""

import json
import os
import statistics
import sys
from typing import Any


def run_timing(run_dir: str, steps_per_epoch: int = 0) -> dict[str, Any]:
  """``{'run', 'steps', 'step_s', 'epoch_s', 'compile_s', 'rows'}`` of one run folder."""
  rows = []
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if row.get("split") == "train":
        rows.append(row)
  if not rows:
    raise ValueError(f"{run_dir}/metrics.jsonl has no train rows.")
  rates = [row["steps_per_sec"] for row in rows if row.get("steps_per_sec")]
  compile_s = next((row["compile_seconds"] for row in rows if "compile_seconds" in row), None)
  steps = max(row["step"] for row in rows)
  epochs = max(row.get("epoch", 0) for row in rows) + 1
  steps_per_epoch = steps_per_epoch or steps / epochs
  step_s = statistics.median(1.0 / r for r in rates) if rates else float("nan")
  return {"run": os.path.basename(os.path.normpath(run_dir)), "steps": steps,
          "step_s": step_s, "epoch_s": step_s * steps_per_epoch, "compile_s": compile_s,
          "rows": len(rates)}


def main(argv: list[str]) -> None:
  markdown = "--markdown" in argv
  steps_per_epoch = next((int(a.split("=", 1)[1]) for a in argv
                          if a.startswith("--steps_per_epoch=")), 0)
  results = [run_timing(path, steps_per_epoch) for path in argv if not path.startswith("--")]
  if markdown:
    print("| run | steps | s / step (median) | s / epoch | first step s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
      first = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
      print(f"| {r['run']} | {r['steps']} | {r['step_s']:.2f} | {r['epoch_s']:.1f} | {first} |")
  else:
    for r in results:
      print(json.dumps(r))


if __name__ == "__main__":
  main(sys.argv[1:])
