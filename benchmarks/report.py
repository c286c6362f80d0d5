"""results.json and results.md from the rows of one run."""

from __future__ import annotations

import json
import math
import os
from typing import Any

# Reference speeds of the SASRec ML-1M train step on a 2-core CPU (seq/s) and
# the evaluation budget, from the issue.
TARGETS = {
    "sasrec_train_seq_per_s_pytorch_reference": 340.0,
    "sasrec_train_seq_per_s_flax_straightforward": 300.0,
    "sasrec_train_seq_per_s_target": 510.0,
    "sasrec_train_seq_per_s_goal_2x": 1020.0,
    "full_eval_seconds_target": 2.0,
}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The headline figures against the targets (absent groups give None)."""

  def find(group: str, name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("group") == group and r.get("name") == name
                 and "median_s" in r), None)

  train = (find("train_step", "sasrec_ml1m") or find("breakdown", "full_train_step")
           or find("variants", "baseline"))
  fastest = max((r for r in rows if r.get("group") == "variants" and r.get("same_math")
                 and "median_s" in r), key=lambda r: r["throughput"], default=None)
  eval_pass = min((r for r in rows if r.get("group") == "eval"
                   and r.get("name", "").startswith("sasrec_full_ranking")),
                  key=lambda r: r["median_s"], default=None)
  out: dict[str, Any] = {"targets": TARGETS}
  if train:
    out["sasrec_train_seq_per_s"] = train["throughput"]
    out["sasrec_train_step_ms"] = 1e3 * train["median_s"]
    out["sasrec_train_meets_target"] = train["throughput"] >= TARGETS[
        "sasrec_train_seq_per_s_target"]
  if fastest:
    out["fastest_same_math_variant"] = fastest["name"]
    out["fastest_same_math_seq_per_s"] = fastest["throughput"]
  if eval_pass:
    out["sasrec_full_eval_seconds"] = eval_pass["median_s"]
    out["sasrec_full_eval_batch"] = eval_pass["params"].get("batch")
    out["sasrec_full_eval_meets_target"] = eval_pass["median_s"] <= TARGETS[
        "full_eval_seconds_target"]
  return out


def _json_safe(value: Any) -> Any:
  """NaN/inf become null: strict JSON has no spelling for them."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def write_json(path: str, results: dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_json_safe(results), f, indent=2, sort_keys=False, allow_nan=False)
    f.write("\n")


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return f"{value * scale:,.{digits}f}"


def _params(row: dict[str, Any]) -> str:
  skip = {"mode", "name", "group", "quick", "repeats"}
  return ", ".join(f"{k}={v}" for k, v in row.get("params", {}).items()
                   if k not in skip and v not in ("", None))


_COLUMNS = ("name", "median ms", "p10-p90 ms", "min ms", "CPU ms", "throughput", "compile s",
            "GFLOP", "GB", "GFLOP/s (% peak)", "GB/s (% peak)", "mem MB", "load")


def _row_cells(row: dict[str, Any]) -> list[str]:
  if "error" in row:
    return [row["name"], "error: " + row["error"]] + [""] * (len(_COLUMNS) - 2)
  flops = f"{_fmt(row['flops_per_s'], 1e-9)} ({_fmt(row['fraction_of_peak_flops'], 100, 0)}%)"
  bw = f"{_fmt(row['bytes_per_s'], 1e-9)} ({_fmt(row['fraction_of_peak_bandwidth'], 100, 0)}%)"
  return [
      row["name"],
      _fmt(row["median_s"], 1e3, 2),
      f"{_fmt(row['p10_s'], 1e3, 2)}-{_fmt(row['p90_s'], 1e3, 2)}",
      _fmt(row["min_s"], 1e3, 2),
      _fmt(row.get("cpu_s"), 1e3, 1),
      f"{_fmt(row['throughput'], 1, 0)} {row['throughput_unit']}",
      _fmt(row["compile_s"], 1, 2),
      _fmt(row["flops"], 1e-9, 2),
      _fmt(row["bytes_accessed"], 1e-9, 3),
      flops,
      bw,
      _fmt(row["peak_memory_bytes"], 2**-20, 0),
      _fmt(row.get("load_1m_before"), 1, 1),
  ]


def _extra(row: dict[str, Any]) -> list[str]:
  cells = []
  for key in ("speedup", "efficiency", "share_of_step"):
    if key in row:
      cells.append(f"{key}={row[key]:.2f}")
  if "same_math" in row:
    cells.append("same math" if row["same_math"] else "different math")
  if row.get("note"):
    cells.append(row["note"])
  faults = row.get("page_faults_per_call")
  if isinstance(faults, (int, float)) and math.isfinite(faults) and faults >= 1000:
    cells.append(f"{faults:,.0f} page faults/call")
  params = _params(row)
  if params:
    cells.append(params)
  return cells


def markdown(results: dict[str, Any]) -> str:
  env = results["environment"]
  peaks = results.get("peaks") or {}
  lines = [
      "# Benchmark results",
      "",
      f"- device: {env['device_kind']} ({env['platform']}), {env['device_count']} device(s); "
      f"CPU: {env['cpu_model']}, {env['cpu_count']} cores",
      f"- load average (1/5/15 min) at start: {env['load_average_start']}, at end: "
      f"{env.get('load_average_end')}",
      f"- jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, python "
      f"{env['python']}; XLA_FLAGS='{env['xla_flags']}'"
      + (f"; LD_PRELOAD={env['ld_preload']}" if env.get("ld_preload") else "")
      + (f"; nice {env['nice']}" if env.get("nice") else ""),
      f"- {env['date']}, commit {env['git_commit'] or 'unknown'}, mode "
      f"{'quick' if results['quick'] else 'full'}, repeats {results['repeats']}",
      f"- measured peaks: {_fmt(peaks.get('flops_per_s'), 1e-9)} GFLOP/s (float32 matmul), "
      f"{_fmt(peaks.get('bytes_per_s'), 1e-9)} GB/s (streaming x + 1)",
      "",
  ]
  summ = results.get("summary", {})
  if "sasrec_train_seq_per_s" in summ:
    t = summ["targets"]
    lines.append(f"**SASRec ML-1M train step**: {summ['sasrec_train_seq_per_s']:.0f} seq/s "
                 f"({summ['sasrec_train_step_ms']:.0f} ms/step); target >= "
                 f"{t['sasrec_train_seq_per_s_target']:.0f} seq/s, PyTorch reference "
                 f"{t['sasrec_train_seq_per_s_pytorch_reference']:.0f}.")
  if "fastest_same_math_variant" in summ:
    lines.append(f"Fastest same-math variant: `{summ['fastest_same_math_variant']}` at "
                 f"{summ['fastest_same_math_seq_per_s']:.0f} seq/s.")
  if "sasrec_full_eval_seconds" in summ:
    lines.append(f"**Full-ranking evaluation** of 6,040 users x 3,416 items: "
                 f"{summ['sasrec_full_eval_seconds']:.2f} s (batch "
                 f"{summ['sasrec_full_eval_batch']}); target <= 2 s.")
  lines.append("")
  groups: list[str] = []
  for row in results["rows"]:
    if row["group"] not in groups:
      groups.append(row["group"])
  for group in groups:
    lines += [f"## {group}", "", "| " + " | ".join(_COLUMNS) + " | notes |",
              "|" + "---|" * (len(_COLUMNS) + 1)]
    for row in results["rows"]:
      if row["group"] == group:
        cells = _row_cells(row) + ["; ".join(_extra(row))]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    for row in results["rows"]:
      if row["group"] == group and row.get("profile"):
        lines += _profile_table(row["name"], row["profile"])
  return "\n".join(lines)


def _profile_table(name: str, profile: dict[str, Any]) -> list[str]:
  """Per-component busy time of one profiled step (see benchmarks/opprofile.py)."""
  if not profile.get("components"):
    return [f"(no per-op profile of {name}: the trace could not be read)", ""]
  lines = [f"### Per-op profile of `{name}`", "",
           f"{profile['busy_s'] * 1e3:,.0f} thread-busy ms per call in traced ops, "
           f"{profile.get('coverage', float('nan')) * 100:.0f}% of the process CPU time.", "",
           "| component | pass | busy ms | share |", "|---|---|---|---|"]
  for c in profile["components"]:
    if c["share"] >= 0.005:
      lines.append(f"| {c['component']} | {c['pass']} | {c['busy_s'] * 1e3:,.1f} | "
                   f"{c['share'] * 100:.1f}% |")
  lines += ["", "| top HLO ops | busy ms | from |", "|---|---|---|"]
  for op in profile["top_ops"]:
    lines.append(f"| {op['op']} | {op['busy_s'] * 1e3:,.1f} | `{op['op_name'][-90:]}` |")
  return lines + [""]


def write(out_dir: str, results: dict[str, Any]) -> tuple[str, str]:
  """Writes ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "results.json")
  md_path = os.path.join(out_dir, "results.md")
  write_json(json_path, results)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown(results) + "\n")
  return json_path, md_path
