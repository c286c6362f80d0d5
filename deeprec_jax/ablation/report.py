"""Ablation reports: finished runs -> results.csv, markdown and LaTeX tables, plots.

``collect_results`` reads every run's ``final_metrics.json`` and
``point.json`` (failed and unfinished runs become rows too), ``summarize``
aggregates the seeds of each point (mean and sample std), and
``write_report`` writes ``results.csv``, ``table.md``, ``table.tex`` and
``plots/*.png`` into the sweep's directory. Nothing here needs JAX.
"""
import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from deeprec_jax.ablation import plan


@dataclasses.dataclass
class Summary:
  """Aggregated seeds of one point: the table row.

  Attributes:
    label: the point's label.
    values: the point's varied keys -> values.
    num_runs: seeds planned.
    num_ok: seeds that finished.
    mean: metric -> mean over finished seeds (nan if none).
    std: metric -> sample std (ddof=1) over finished seeds (nan for < 2).
    count: metric -> number of finished seeds that report it.
    num_todo: seeds not run yet (a sweep still under way).
  """
  label: str
  values: dict[str, Any]
  num_runs: int
  num_ok: int
  mean: dict[str, float]
  std: dict[str, float]
  count: dict[str, int]
  num_todo: int = 0



def collect_results(workdir: str, split: str = "test",
                    run_dirs: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Reads every run back from disk into one flat row per run.

  Args:
    workdir: the sweep's directory.
    split: whose metrics go into the rows, 'test' or 'valid'.
    run_dirs: the runs to read, in this order; by default every directory
      under ``workdir/runs`` with a point.json, in ablation order.

  Returns:
    Rows ``{'label', <varied keys>, 'seed', 'status', 'split', <metrics>,
    'train_seconds', 'best_step', 'best_epoch', 'workdir', 'error'}``; status is 'ok',
    'failed' or 'todo' (not run yet).
  """
  if run_dirs is None:
    root = os.path.join(workdir, "runs")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    infos = [(os.path.join(root, n),
              plan.read_json(os.path.join(root, n, plan.POINT_FILE)))
             for n in names]
    infos = [(d, info) for d, info in infos if info]
    infos.sort(key=lambda item: (item[1].get("index", 0), item[1].get("seed", 0)))
    run_dirs = [d for d, _ in infos]
  prefix = f"{split}/"
  rows = []
  for run_dir in run_dirs:
    info = plan.read_json(os.path.join(run_dir, plan.POINT_FILE))
    status = plan.read_json(os.path.join(run_dir, plan.STATUS_FILE))
    final = plan.read_json(os.path.join(run_dir, plan.FINAL_METRICS))
    row = {"label": info.get("label", os.path.basename(run_dir))}
    row.update(info.get("values", {}))
    row.update(seed=info.get("seed"), status=plan.run_status(run_dir), split=split)
    row.update({k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)})
    # The training loop's time over all resumes when the run recorded it,
    # else this invocation's (status.json, written by the runner).
    seconds = plan.read_json(os.path.join(run_dir, plan.TRAIN_TIME_FILE)).get(
        "train_seconds", status.get("train_seconds"))
    row.update(train_seconds=seconds, best_step=final.get("best_step"),
               best_epoch=final.get("best_epoch"), workdir=run_dir,
               error=status.get("error", ""),
               epochs_run=_epochs_run(run_dir, final) if final else None,
               epoch_budget=info.get("config", {}).get("train", {}).get("num_epochs"))
    if row["status"] == "failed" and not row["error"]:
      with open(os.path.join(run_dir, plan.ERROR_FILE), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
      row["error"] = lines[-1] if lines else "failed"
    rows.append(row)
  return rows


def _metric_order(name: str) -> tuple:
  base, _, k = name.rpartition("@")
  return (base, int(k)) if k.isdigit() else (name, 0)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str, keys: Sequence[str] = (),
              metrics: Sequence[str] = ()) -> None:
  """results.csv: identity columns, ``metrics`` first, every other metric, bookkeeping.

  Args:
    rows: from ``collect_results``.
    path: the file to write.
    keys: the varied keys (columns after 'label').
    metrics: the reported metrics, put first among the metric columns.
  """
  head = ["label", *keys, "seed", "status", "split"]
  tail = ["train_seconds", "epochs_run", "epoch_budget", "best_step", "best_epoch", "workdir",
          "error"]
  others = sorted({k for row in rows for k in row if k not in head and k not in tail
                   and k not in metrics}, key=_metric_order)
  columns = [*head, *metrics, *others, *tail]
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _csv_value(row.get(k)) for k in columns})


def _csv_value(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return plan.format_value(value)
  return value


def read_csv(path: str) -> list[dict[str, str]]:
  """results.csv back as a list of rows of strings."""
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def _as_float(value: Any) -> float | None:
  if value is None or value == "":
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
              keys: Sequence[str] = ()) -> list[Summary]:
  """Groups rows by label (in first-seen order) and aggregates their seeds.

  Args:
    rows: from ``collect_results`` or ``read_csv``; only rows with status 'ok'
      count towards the statistics.
    metrics: the metric columns to aggregate.
    keys: varied keys copied from the point's first row into ``values``.

  Returns:
    One ``Summary`` per point: mean and sample std (ddof=1; nan for a single
    finished seed) of each metric.
  """
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault(str(row["label"]), []).append(row)
  summaries = []
  for label, group in groups.items():
    finished = [row for row in group if row.get("status") == "ok"]
    mean, std, count = {}, {}, {}
    for metric in metrics:
      values = [v for v in (_as_float(row.get(metric)) for row in finished) if v is not None]
      count[metric] = len(values)
      mean[metric] = float(np.mean(values)) if values else math.nan
      std[metric] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    summaries.append(Summary(label=label, values={k: group[0].get(k) for k in keys},
                             num_runs=len(group), num_ok=len(finished), mean=mean, std=std,
                             count=count,
                             num_todo=sum(row.get("status") == "todo" for row in group)))
  return summaries


# ----------------------------------------------------------------------------
# Tables.


def metric_title(metric: str) -> str:
  """'ndcg@10' -> 'NDCG@10', 'sampled_hr@10' -> 'sampled HR@10'."""
  name, at, k = metric.partition("@")
  if not at:
    return metric
  words = name.split("_")
  words[-1] = words[-1].upper()
  return " ".join(words) + at + k


def caption_text(ablation_config: ml_collections.ConfigDict, summaries: Sequence[Summary]
                 ) -> str:
  """The table caption: title, dataset, split, protocol, seeds, what bold means."""
  caption = ablation_config.get("caption") or {}
  seeds = list(ablation_config.seeds)
  parts = [caption.get("title", "")]
  parts.append(f"Dataset: {caption.get('dataset', 'unknown')}; {ablation_config.split} split; "
               f"protocol: {caption.get('protocol', 'full ranking, leave-one-out')}")
  # Seeds per point: the sweep's, or a point's own (plan.SEEDS_KEY).
  per_row = sorted({len(point.get(plan.SEEDS_KEY) or seeds)
                    for point in (ablation_config.get("points") or ())})
  if len(per_row) > 1:
    parts.append(f"Mean ± sample std (ddof=1) over each row's seeds ({per_row[0]} to "
                 f"{per_row[-1]}; results.csv has every run), no std for one seed")
  elif len(seeds) > 1:
    parts.append(f"Mean ± sample std (ddof=1) over {len(seeds)} seeds "
                 f"({', '.join(map(str, seeds))})")
  else:
    parts.append(f"One seed ({seeds[0]}): no std")
  parts.append("Best per column in bold")
  if any(0 < min(s.count.values(), default=0) < s.num_runs for s in summaries):
    parts.append("†: fewer seeds finished (see results.csv)")
  if any(s.num_ok == 0 and s.num_todo < s.num_runs for s in summaries):
    parts.append("'failed': no seed finished")
  if any(s.num_todo == s.num_runs for s in summaries):
    parts.append("'todo': not run yet")
  return ". ".join(p.rstrip(".") for p in parts if p) + "."


def _cells(summaries: Sequence[Summary], metrics: Sequence[str], pm: str
           ) -> list[list[tuple[str, bool]]]:
  """Per row and metric: (text, is_best). Best = highest mean at the shown precision."""
  best = {}
  for metric in metrics:
    shown = [round(s.mean[metric], 4) for s in summaries if s.count[metric]]
    best[metric] = max(shown) if shown else None
  table = []
  for s in summaries:
    row = []
    for metric in metrics:
      if not s.count[metric]:
        missing = ("todo" if s.num_todo == s.num_runs else "failed") if s.num_ok == 0 else "n/a"
        row.append((missing, False))
        continue
      text = f"{s.mean[metric]:.4f}"
      if not math.isnan(s.std[metric]):
        text += f" {pm} {s.std[metric]:.4f}"
      if s.count[metric] < s.num_runs:
        text += " †"
      row.append((text, round(s.mean[metric], 4) == best[metric]))
    table.append(row)
  return table


def published_column(rows: Sequence[Mapping[str, Any]],
                     summaries: Sequence[Summary]) -> dict[str, list[str]]:
  """``{'published': one text per summary}`` when any point has one, else {}."""
  text = {str(r["label"]): r.get("published") or "" for r in rows}
  cells = [text.get(s.label, "") or "-" for s in summaries]
  return {"published": cells} if any(text.values()) else {}


def _epochs_run(run_dir: str, final: Mapping[str, Any]) -> float | None:
  """Epochs trained: the last validation step of metrics.jsonl, in epochs (None if unknown).

  The steps per epoch come from ``final_metrics.json`` (``best_step /
  best_epoch``).
  """
  best_step, best_epoch = _as_float(final.get("best_step")), _as_float(final.get("best_epoch"))
  path = os.path.join(run_dir, "metrics.jsonl")
  if not best_step or not best_epoch or not os.path.exists(path):
    return None
  last = 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a crash: the others still count
        continue
      if record.get("split") == "valid":
        last = max(last, int(record.get("step", 0)))
  return last * best_epoch / best_step if last else None


def budget_columns(rows: Sequence[Mapping[str, Any]],
                   summaries: Sequence[Summary]) -> dict[str, list[str]]:
  """The 'epochs', 'best epoch' and 'train min' columns: means over a point's finished seeds.

  Epochs are those trained (until early stopping or the budget) of the
  budget (``train.num_epochs``); best epoch is the epoch of the checkpoint
  that was evaluated (early stopping on the validation metric); train minutes
  are wall time of the training loop, evaluations included, on whatever
  machine ran it.
  """
  columns = {"epochs": [], "best epoch": [], "train min": []}
  for summary in summaries:
    finished = [r for r in rows if str(r["label"]) == summary.label and r.get("status") == "ok"]
    run = [v for v in (_as_float(r.get("epochs_run")) for r in finished) if v is not None]
    budgets = {r.get("epoch_budget") for r in finished} - {None}
    text = f"{np.mean(run):.0f}" if run else "n/a"
    if run and len(budgets) == 1:
      text += f" of {int(budgets.pop())}"
    columns["epochs"].append(text)
    for title, key, scale, digits in (("best epoch", "best_epoch", 1.0, 1),
                                      ("train min", "train_seconds", 1 / 60, 0)):
      values = [v * scale for v in (_as_float(r.get(key)) for r in finished) if v is not None]
      columns[title].append(f"{np.mean(values):.{digits}f}" if values else "n/a")
  return columns


def _row_heads(summaries: Sequence[Summary], keys: Sequence[str]) -> tuple[list, list]:
  """Header and per-row identity cells: one column per axis, else the label."""
  if keys:
    short = plan.short_names(list(keys))
    return ([short[k] for k in keys],
            [[plan.format_value(s.values.get(k)) for k in keys] for s in summaries])
  return ["point"], [[s.label] for s in summaries]


def render_markdown(summaries: Sequence[Summary], metrics: Sequence[str], caption: str,
                    keys: Sequence[str] = (),
                    extra_columns: Mapping[str, Sequence[str]] | None = None) -> str:
  """A GitHub-markdown table, best per column in bold, caption below.

  Args:
    summaries: from ``summarize``.
    metrics: the metric columns, in order.
    caption: from ``caption_text``.
    keys: axis keys, one column each (grids); empty: a 'point' label column.
    extra_columns: title -> one text per row, appended after the metrics
      (``budget_columns``).

  Returns:
    The markdown text.
  """
  header, heads = _row_heads(summaries, keys)
  cells = _cells(summaries, metrics, "±")
  extra = dict(extra_columns or {})
  escape = lambda text: str(text).replace("|", "\\|")
  lines = ["| " + " | ".join([*map(escape, header), *map(metric_title, metrics), *extra])
           + " |", "|" + "---|" * len(header) + "---:|" * (len(metrics) + len(extra))]
  for i, (head, row) in enumerate(zip(heads, cells, strict=True)):
    shown = [f"**{text}**" if is_best else text for text, is_best in row]
    shown += [texts[i] for texts in extra.values()]
    lines.append("| " + " | ".join([*map(escape, head), *shown]) + " |")
  return "\n".join(lines) + f"\n\n{caption}\n"


def latex_escape(text: str) -> str:
  """Escapes LaTeX's special characters in plain text."""
  replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$"}
  return "".join(replacements.get(c, c) for c in str(text))


def render_latex(summaries: Sequence[Summary], metrics: Sequence[str], caption: str,
                 keys: Sequence[str] = (), label: str = "tab:ablation") -> str:
  """A booktabs ``table`` float, best per column in ``\\mathbf``.

  Args:
    summaries: from ``summarize``.
    metrics: the metric columns, in order.
    caption: from ``caption_text`` (plain text; escaped here).
    keys: axis keys, one column each (grids); empty: a 'point' label column.
    label: the ``\\label`` of the table.

  Returns:
    LaTeX source for ``\\input`` in a document that loads booktabs.
  """
  header, heads = _row_heads(summaries, keys)
  cells = _cells(summaries, metrics, r"\pm")
  lines = ["% Needs \\usepackage{booktabs}.", r"\begin{table}[t]", r"\centering",
           f"\\caption{{{latex_escape(caption)}}}", f"\\label{{{label}}}",
           f"\\begin{{tabular}}{{{'l' * len(header)}{'c' * len(metrics)}}}", r"\toprule",
           " & ".join([*map(latex_escape, header), *(latex_escape(metric_title(m))
                                                     for m in metrics)]) + r" \\",
           r"\midrule"]
  for head, row in zip(heads, cells, strict=True):
    shown = []
    for text, is_best in row:
      if text in ("failed", "n/a", "todo"):
        shown.append(text)
        continue
      dagger = r"^\dagger" if text.endswith(" †") else ""
      math_text = text.removesuffix(" †")
      math_text = f"\\mathbf{{{math_text}}}" if is_best else math_text
      shown.append(f"${math_text}{dagger}$")
    lines.append(" & ".join([*map(latex_escape, head), *shown]) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Plots.


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot(summaries: Sequence[Summary], metrics: Sequence[str], out_dir: str,
         keys: Sequence[str] = (), title: str = "") -> list[str]:
  """One PNG per metric: lines over a numeric axis, else grouped bars.

  The x axis is the first numeric axis with two or more values (one line per
  combination of the other axes, error bars = std); without one, grouped bars
  with the first axis (or the point labels) on x and one bar per combination
  of the other axes.

  Args:
    summaries: from ``summarize``; points where no seed finished are left out.
    metrics: one figure each.
    out_dir: created if missing.
    keys: the grid's axis keys; empty for explicit points.
    title: figure title prefix.

  Returns:
    The written paths.
  """
  import matplotlib  # Imported here: plotting is the only user and it is slow to import.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  shown = [s for s in summaries if s.num_ok]
  if not shown:
    return []
  keys = list(keys)
  short = plan.short_names(keys) if keys else {}
  numeric = [k for k in keys if all(_is_number(s.values.get(k)) for s in shown)
             and len({s.values.get(k) for s in shown}) > 1]
  x_key = numeric[0] if numeric else (keys[0] if keys else None)
  others = [k for k in keys if k != x_key]

  def x_of(s: Summary) -> Any:
    return s.values.get(x_key) if x_key else s.label

  def series_of(s: Summary) -> str:
    return plan.settings_text({k: s.values.get(k) for k in others}, short)

  series = list(dict.fromkeys(series_of(s) for s in shown))
  xs = list(dict.fromkeys(x_of(s) for s in shown))
  paths = []
  for metric in metrics:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(xs) * max(len(series), 1) ** 0.5 + 2),
                                    3.6))
    for j, name in enumerate(series):
      members = {x_of(s): s for s in shown if series_of(s) == name and s.count[metric]}
      mean = [members[x].mean[metric] if x in members else math.nan for x in xs]
      std = [members[x].std[metric] if x in members else math.nan for x in xs]
      # No error bars at all for single-seed points rather than zero-height ones.
      std = None if all(math.isnan(v) for v in std) else [
          0.0 if math.isnan(v) else v for v in std]
      if numeric:
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=name or None)
      else:
        width = 0.8 / len(series)
        positions = np.arange(len(xs)) + (j - (len(series) - 1) / 2) * width
        ax.bar(positions, mean, width, yerr=std, capsize=3, label=name or None)
    if numeric:
      ax.set_xticks(xs)
    else:
      ticks = [plan.format_value(x) for x in xs]
      long_ticks = any(len(t) > 10 for t in ticks)
      ax.set_xticks(np.arange(len(xs)), ticks, rotation=20 if long_ticks else 0,
                    ha="right" if long_ticks else "center")
    ax.set_xlabel(short.get(x_key, "point") if x_key else "point")
    with_std = any(s.count[metric] > 1 for s in shown)
    ax.set_ylabel(metric_title(metric) + (" (mean ± std over seeds)" if with_std else ""))
    ax.set_title(f"{title}: {metric_title(metric)}" if title else metric_title(metric))
    ax.grid(alpha=0.3)
    if any(series):
      ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{plan.slug(metric.replace('@', '_at_'))}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------
# The whole sweep.


def write_report(ablation_config: ml_collections.ConfigDict, workdir: str,
                 rows: Sequence[Mapping[str, Any]]) -> str:
  """Writes results.csv, table.md, table.tex and plots/*.png into ``workdir``.

  Args:
    ablation_config: the ablation the rows come from.
    workdir: the sweep's directory.
    rows: from ``collect_results``.

  Returns:
    The markdown table.
  """
  keys = plan.varied_keys(ablation_config)
  axis_keys = [k for k, _ in plan.axes_of(ablation_config)]
  metrics = list(ablation_config.metrics)
  write_csv(rows, os.path.join(workdir, "results.csv"), keys, metrics)
  summaries = summarize(rows, metrics, keys)
  caption = caption_text(ablation_config, summaries)
  extra = published_column(rows, summaries)
  if ablation_config.get("budget_columns"):
    extra.update(budget_columns(rows, summaries))
  markdown = render_markdown(summaries, metrics, caption, axis_keys, extra)
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(workdir, "table.tex"), "w", encoding="utf-8") as f:
    f.write(render_latex(summaries, metrics, caption, axis_keys))
  plot(summaries, metrics, os.path.join(workdir, "plots"), axis_keys,
       title=(ablation_config.get("caption") or {}).get("title", ""))
  return markdown
