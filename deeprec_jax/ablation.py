"""Paper-style ablations: sweeps of configs x seeds, then tables and plots.

An ablation config (``experiments/configs/ablations/*.py``) names a ``base``
experiment config, the keys to vary (a grid of ``axes`` or explicit
``points``), the ``seeds`` and the ``metrics`` to report. This module expands it
into runs, trains each run in its own sub-workdir and summarizes the results:

  runs = ablation.plan_runs(ablation_config, workdir)    # validates everything
  rows = ablation.execute(runs, parallel=2)               # skips finished runs
  ablation.write_report(ablation_config, workdir, rows)   # csv, md, tex, png

Each run is ``workdir/runs/<slug>_seed<k>``. A run is finished once its
``final_metrics.json`` exists (``train.train_and_evaluate`` writes it last), so
rerunning a sweep trains only what is missing or failed. A failed run leaves
``error.txt`` (the traceback) and becomes a ``failed`` row; the others go on.

Order of precedence for a run's config: the base file (the point's own
``base`` if it has one), then the point's values, then the ablation's
``overrides``, which therefore hold for every point: that is what lets
``--config.overrides.train.num_epochs=1`` shrink any sweep to a smoke test.
"""

import concurrent.futures
import copy
import csv
import dataclasses
import difflib
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from absl import logging

# Where relative base-config paths are looked up when the working directory
# is not the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL_METRICS = "final_metrics.json"  # written last by train.train_and_evaluate
POINT_FILE = "point.json"  # what this run is: label, varied values, seed, full config
STATUS_FILE = "status.json"  # ok | failed, train_seconds, one-line error
ERROR_FILE = "error.txt"  # traceback of a failed run
SPECIAL_KEYS = ("label", "base")  # point keys that are not config keys
DATASET_NAMES = {"synthetic": "synthetic (embedded)", "ml-100k": "MovieLens-100K",
                 "ml-1m": "MovieLens-1M", "ml-1m-raw": "MovieLens-1M (raw)"}

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


class Point(NamedTuple):
  """One ablation point for one seed.

  Attributes:
    label: readable name, unique among the points.
    overrides: dotted config key -> value applied to the base config (the
      point's values, then the ablation's overrides, which win).
    seed: applied to ``config.seed``.
    base: the base config spec, ``path.py[:arg]``.
    values: the point's own varied keys -> values (columns of results.csv).
    index: position of the point in the ablation (shared by its seeds).
  """
  label: str
  overrides: dict[str, Any]
  seed: int
  base: str
  values: dict[str, Any]
  index: int


@dataclasses.dataclass(frozen=True)
class Run:
  """A point with its built config and sub-workdir."""
  point: Point
  config: ml_collections.ConfigDict
  workdir: str


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
  """
  label: str
  values: dict[str, Any]
  num_runs: int
  num_ok: int
  mean: dict[str, float]
  std: dict[str, float]
  count: dict[str, int]


# ----------------------------------------------------------------------------
# Configs.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py[:arg]`` the way ``--config=path.py:arg`` would.

  Args:
    spec: a config file, relative to the working directory or the repository
      root, optionally followed by ``:<arg>`` for its ``get_config(arg)``.

  Returns:
    A fresh (unlocked) ConfigDict.
  """
  path, _, arg = spec.partition(":")
  candidates = [path, os.path.join(REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(f"base config file {path!r} not found (looked in "
                            f"{os.getcwd()} and {REPO_ROOT}).")
  module_name = "_ablation_base_" + re.sub(r"\W", "_", os.path.abspath(found))
  module_spec = importlib.util.spec_from_file_location(module_name, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def flatten(tree: Any, prefix: str = "", skip_none: bool = False) -> dict[str, Any]:
  """Nested mappings/ConfigDicts -> {dotted key: leaf}; dotted keys pass through.

  Args:
    tree: a (possibly nested) mapping or ConfigDict.
    prefix: prepended to every key.
    skip_none: drop ``None`` leaves (unset placeholders in ``overrides``).

  Returns:
    The leaves keyed by their dotted paths, in iteration order.
  """
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      flat.update(flatten(value, name + ".", skip_none))
    elif value is not None or not skip_none:
      flat[name] = value
  return flat


def get_value(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
  """``config`` at dotted ``key``, or ``default`` if any part is missing."""
  node = config
  for part in key.split("."):
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
      return default
    node = node[part]
  return node


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Returns a copy of ``config`` with dotted ``overrides`` set.

  Args:
    config: the base experiment config (not modified).
    overrides: dotted key -> value; every key must already exist, so a typo
      fails here rather than training the base config under a wrong label.

  Returns:
    The new config.

  Raises:
    ValueError: naming the key, for unknown keys and mistyped values.
  """
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
      child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(child, ml_collections.ConfigDict):
        raise ValueError(f"unknown config key {key!r}: {'.'.join(parents[:depth + 1])!r} is "
                         f"not a section of the base config.{_did_you_mean(key, config)}")
      node = child
    if leaf not in node:
      raise ValueError(f"unknown config key {key!r}.{_did_you_mean(key, config)}")
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)  # JSON and CLI lists for tuple fields such as eval.ks
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"config key {key!r} cannot be set to {value!r}: {e}") from e
  return config


def _did_you_mean(key: str, config: ml_collections.ConfigDict) -> str:
  matches = difflib.get_close_matches(key, list(flatten(config)), n=3)
  return f" Did you mean {' or '.join(matches)}?" if matches else ""


def _short_names(keys: Sequence[str]) -> dict[str, str]:
  """Last dotted component, or the full key where two keys share it."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return ",".join(_format_value(v) for v in value)
  return str(value)


def axes_of(ablation_config: ml_collections.ConfigDict) -> list[tuple[str, list[Any]]]:
  """The grid axes as ``[(dotted key, values)]`` in the order written.

  ``axes`` may be a mapping or a sequence of ``(key, values)`` pairs; the
  config files use pairs because ConfigDict sorts its keys and rejects dots.
  """
  axes = ablation_config.get("axes") or ()
  pairs = list(axes.items()) if isinstance(axes, Mapping) else list(axes)
  result = []
  for pair in pairs:
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"axes: expected (dotted key, values) pairs, got {pair!r}.")
    key, values = pair
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise ValueError(f"axes: the values of {key!r} must be a list or tuple, got {values!r}.")
    values = list(values)
    if not values:
      raise ValueError(f"axes: {key!r} has no values.")
    result.append((key, values))
  keys = [k for k, _ in result]
  duplicates = sorted({k for k in keys if keys.count(k) > 1})
  if duplicates:
    raise ValueError(f"axes: {', '.join(duplicates)} appear more than once.")
  return result


def varied_keys(ablation_config: ml_collections.ConfigDict) -> list[str]:
  """The keys the ablation varies: the axes, or every key of the points."""
  axes = axes_of(ablation_config)
  if axes:
    return [k for k, _ in axes]
  keys = []
  for point in ablation_config.get("points") or ():
    keys.extend(k for k in point if k != "label" and k not in keys)
  return keys


def expand_points(ablation_config: ml_collections.ConfigDict) -> list[Point]:
  """Expands the grid (or explicit points) x seeds into runs, in order.

  Args:
    ablation_config: with ``base``, ``overrides``, ``axes`` or ``points``,
      and ``seeds`` (see experiments/configs/ablations/tiny_grid.py).

  Returns:
    One ``Point`` per point and seed, points outer, seeds inner.
  """
  axes = axes_of(ablation_config)
  points = list(ablation_config.get("points") or ())
  if bool(axes) == bool(points):
    raise ValueError("an ablation config needs exactly one of `axes` (a grid) or `points`.")
  seeds = list(ablation_config.seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}.")
  overrides = flatten(ablation_config.get("overrides") or {}, skip_none=True)
  collapsed = [k for k, _ in axes if k in overrides]
  if collapsed:
    raise ValueError(f"{collapsed[0]!r} is both an axis and fixed in `overrides`: the grid "
                     "would collapse. Remove it from one of them.")
  if axes:
    short = _short_names([k for k, _ in axes])
    specs = []
    for combo in itertools.product(*(values for _, values in axes)):
      values = {k: v for (k, _), v in zip(axes, combo, strict=True)}
      label = ", ".join(f"{short[k]}={_format_value(v)}" for k, v in values.items())
      specs.append((label, values))
  else:
    specs = []
    for point in points:
      values = {k: v for k, v in dict(point).items() if k != "label"}
      short = _short_names(list(values))
      label = point.get("label") or ", ".join(
          f"{short[k]}={_format_value(v)}" for k, v in values.items()) or "base"
      specs.append((label, values))
  labels = [label for label, _ in specs]
  duplicates = sorted({label for label in labels if labels.count(label) > 1})
  if duplicates:
    raise ValueError(f"points: duplicate labels {duplicates}; give each point a unique 'label'.")

  expanded = []
  for index, (label, values) in enumerate(specs):
    base = values.get("base", ablation_config.base)
    point_overrides = {k: v for k, v in values.items() if k not in SPECIAL_KEYS}
    shadowed = sorted(k for k in point_overrides if k in overrides)
    if shadowed:
      logging.warning("point %r: overrides %s replace its own values.", label, shadowed)
    merged = {**point_overrides, **overrides}
    for seed in seeds:
      expanded.append(Point(label=label, overrides=merged, seed=int(seed), base=base,
                            values=dict(values), index=index))
  return expanded


def slug(label: str) -> str:
  """A directory-safe name for ``label`` ('attention=additive, num_blocks=2' ->
  'attention=additive_num_blocks=2')."""
  return re.sub(r"[^A-Za-z0-9.=+-]+", "_", label).strip("_") or "point"


def build_config(point: Point, cache: dict[str, ml_collections.ConfigDict] | None = None
                 ) -> ml_collections.ConfigDict:
  """The experiment config of ``point``: base file, overrides, seed.

  Args:
    point: from ``expand_points``.
    cache: base spec -> loaded config, so each file is executed once.

  Returns:
    A new ConfigDict.
  """
  cache = {} if cache is None else cache
  if point.base not in cache:
    cache[point.base] = load_config(point.base)
  try:
    config = apply_overrides(cache[point.base], point.overrides)
  except ValueError as e:
    raise ValueError(f"point {point.label!r} (base {point.base}): {e}") from e
  config.seed = point.seed
  return config


def _check_metrics(config: ml_collections.ConfigDict, metrics: Sequence[str], label: str):
  """Fails early if a metric's cut-off is not evaluated (e.g. ndcg@50 with ks 1..20)."""
  ks = tuple(get_value(config, "eval.ks", ()))
  for metric in metrics:
    name, _, k = metric.rpartition("@")
    if not name or not k.isdigit():
      raise ValueError(f"metrics: {metric!r} is not of the form <name>@<K>, e.g. 'ndcg@10'.")
    if ks and int(k) not in ks:
      raise ValueError(f"metrics: {metric!r} needs {k} in eval.ks, but point {label!r} "
                       f"evaluates eval.ks={ks}.")


def _config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def plan_runs(ablation_config: ml_collections.ConfigDict, workdir: str) -> list[Run]:
  """Expands, builds and validates every run before anything trains.

  Args:
    ablation_config: the ablation (see ``expand_points``).
    workdir: the sweep's directory; runs go to ``workdir/runs/<slug>_seed<k>``.

  Returns:
    The runs, in order.

  Raises:
    ValueError: for unknown keys, bad values, metrics or split, and for a run
      directory that already holds a run of a different config.
  """
  if ablation_config.split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test', got {ablation_config.split!r}.")
  metrics = list(ablation_config.metrics)
  if not metrics:
    raise ValueError("metrics: name at least one, e.g. ('hr@10', 'ndcg@10').")
  cache, names, runs = {}, {}, []
  for point in expand_points(ablation_config):
    config = build_config(point, cache)
    _check_metrics(config, metrics, point.label)
    if point.index not in names:
      name = slug(point.label)
      # Two labels that sanitize alike ('a b' and 'a_b') get the point index too.
      names[point.index] = name if name not in names.values() else f"{name}_{point.index}"
    run_dir = os.path.join(workdir, "runs", f"{names[point.index]}_seed{point.seed}")
    runs.append(Run(point, config, run_dir))
  for run in runs:
    _check_same_config(run)
  return runs


def _check_same_config(run: Run) -> None:
  """Refuses to resume (or skip) a run directory trained with another config."""
  path = os.path.join(run.workdir, POINT_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    before = flatten(json.load(f).get("config", {}))
  now = flatten(_config_json(run.config))
  changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
  if changed:
    diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
    raise ValueError(f"{run.workdir} holds a run of a different config ({diffs}"
                     f"{', ...' if len(changed) > 5 else ''}). Use another --workdir or delete "
                     "that run directory.")


# ----------------------------------------------------------------------------
# Running.


def run_status(workdir: str) -> str:
  """'ok' (finished), 'failed' (error.txt, no metrics) or 'todo'."""
  if os.path.exists(os.path.join(workdir, FINAL_METRICS)):
    return "ok"
  if os.path.exists(os.path.join(workdir, ERROR_FILE)):
    return "failed"
  return "todo"


def run_point(config: ml_collections.ConfigDict, workdir: str, info: Mapping[str, Any],
              train_fn: TrainFn | None = None) -> dict[str, Any]:
  """Trains one run unless it finished before; records failures, never raises them.

  Args:
    config: the run's experiment config.
    workdir: its own directory.
    info: written to ``workdir/point.json`` (label, values, seed, ...) so that
      ``collect_results`` can rebuild the row from disk alone.
    train_fn: ``(config, workdir) -> metrics``; ``train.train_and_evaluate``
      by default.

  Returns:
    ``{'status': 'ok' | 'failed', 'skipped': bool, 'train_seconds', 'error'}``.
  """
  if run_status(workdir) == "ok":
    return {**_read_json(os.path.join(workdir, STATUS_FILE)), "status": "ok", "skipped": True}
  if train_fn is None:
    from deeprec_jax import train  # Imported here: planning and reporting need no JAX.
    train_fn = train.train_and_evaluate
  os.makedirs(workdir, exist_ok=True)
  for name in (ERROR_FILE, STATUS_FILE):  # a retry of a failed run starts clean
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  _write_json(os.path.join(workdir, POINT_FILE), {**info, "config": _config_json(config)})
  start = time.perf_counter()
  error = details = ""
  try:
    train_fn(config, workdir)
    if run_status(workdir) != "ok":  # else it would be retrained on every rerun
      error = details = f"train_fn returned without writing {FINAL_METRICS}"
  except Exception as e:  # noqa: BLE001  (one failed point must not stop the sweep)
    error, details = f"{type(e).__name__}: {e}".replace("\n", " "), traceback.format_exc()
  status = {"status": "failed" if error else "ok", "error": error,
            "train_seconds": time.perf_counter() - start}
  _record(workdir, status, details)
  return {**status, "skipped": False}


def _record(workdir: str, status: Mapping[str, Any], details: str = "") -> None:
  """Writes status.json, and error.txt (the traceback) for a failed run."""
  if status["status"] == "failed":
    with open(os.path.join(workdir, ERROR_FILE), "w", encoding="utf-8") as f:
      f.write((details or status["error"]).rstrip("\n") + "\n")
  _write_json(os.path.join(workdir, STATUS_FILE), status)


def _run_info(run: Run) -> dict[str, Any]:
  point = run.point
  return {"index": point.index, "label": point.label, "seed": point.seed, "base": point.base,
          "values": _effective_values(run)}


def _effective_values(run: Run) -> dict[str, Any]:
  """The varied keys' values as trained (overrides may have replaced a point's)."""
  values = {}
  for key in run.point.values:
    values[key] = run.point.base if key == "base" else get_value(run.config, key)
  return values


def execute(runs: Sequence[Run], parallel: int = 1, train_fn: TrainFn | None = None
            ) -> list[dict[str, Any]]:
  """Trains every unfinished run, in this process or in ``parallel`` subprocesses.

  Args:
    runs: from ``plan_runs``.
    parallel: runs trained at once; 1 trains in this process, more use a
      spawn-started process pool (JAX does not survive fork).
    train_fn: see ``run_point``; must be picklable when ``parallel > 1``.

  Returns:
    ``run_point``'s result per run, in order.
  """
  total = len(runs)
  results = [None] * total

  def report(i: int, result: dict[str, Any]) -> None:
    results[i] = result
    run = runs[i]
    what = ("finished before, skipped" if result.get("skipped") else
            f"{result['status']} in {result.get('train_seconds', 0):.1f} s")
    if result["status"] == "failed":
      what += f": {result['error']}"
    logging.info("[%d/%d] %s seed %d: %s", i + 1, total, run.point.label, run.point.seed, what)

  if parallel <= 1:
    for i, run in enumerate(runs):
      report(i, run_point(run.config, run.workdir, _run_info(run), train_fn))
    return results
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context) as pool:
    futures = {}
    for i, run in enumerate(runs):
      if run_status(run.workdir) == "ok":  # no process start for finished runs
        report(i, run_point(run.config, run.workdir, _run_info(run), train_fn))
      else:
        futures[pool.submit(run_point, run.config, run.workdir, _run_info(run), train_fn)] = i
    try:
      for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        try:
          result = future.result()
        except Exception as e:  # noqa: BLE001  (a worker that died, e.g. out of memory)
          result = {"status": "failed", "error": f"worker process failed: {type(e).__name__}: {e}",
                    "skipped": False}
          run = runs[i]
          os.makedirs(run.workdir, exist_ok=True)
          _write_json(os.path.join(run.workdir, POINT_FILE),
                      {**_run_info(run), "config": _config_json(run.config)})
          _record(run.workdir, result)
        report(i, result)
    except KeyboardInterrupt:
      pool.shutdown(wait=False, cancel_futures=True)  # do not start the queued runs
      raise
  return results


def describe_runs(runs: Sequence[Run]) -> str:
  """The dry-run listing: one line per point, then one per seed with its status."""
  num_points = len({run.point.index for run in runs})
  seeds = sorted({run.point.seed for run in runs})
  lines = [f"{len(runs)} runs: {num_points} points x {len(seeds)} seeds {seeds}"]
  previous = None
  for run in runs:
    point = run.point
    if point.index != previous:
      settings = ", ".join(f"{k}={_format_value(v)}" for k, v in point.overrides.items())
      lines.append(f"point {point.index}: {point.label}  [base {point.base}; {settings}]")
      previous = point.index
    lines.append(f"  {run_status(run.workdir):6} seed {point.seed}  {run.workdir}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Results.


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value: Mapping[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)  # never a half-written file after a kill


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
    'train_seconds', 'best_step', 'workdir', 'error'}``; status is 'ok',
    'failed' or 'todo' (not run yet).
  """
  if run_dirs is None:
    root = os.path.join(workdir, "runs")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    infos = [(os.path.join(root, n), _read_json(os.path.join(root, n, POINT_FILE)))
             for n in names]
    infos = [(d, info) for d, info in infos if info]
    infos.sort(key=lambda item: (item[1].get("index", 0), item[1].get("seed", 0)))
    run_dirs = [d for d, _ in infos]
  prefix = f"{split}/"
  rows = []
  for run_dir in run_dirs:
    info = _read_json(os.path.join(run_dir, POINT_FILE))
    status = _read_json(os.path.join(run_dir, STATUS_FILE))
    final = _read_json(os.path.join(run_dir, FINAL_METRICS))
    row = {"label": info.get("label", os.path.basename(run_dir))}
    row.update(info.get("values", {}))
    row.update(seed=info.get("seed"), status=run_status(run_dir), split=split)
    row.update({k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)})
    row.update(train_seconds=status.get("train_seconds"), best_step=final.get("best_step"),
               workdir=run_dir, error=status.get("error", ""))
    if row["status"] == "failed" and not row["error"]:
      with open(os.path.join(run_dir, ERROR_FILE), encoding="utf-8") as f:
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
  tail = ["train_seconds", "best_step", "workdir", "error"]
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
    return _format_value(value)
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
                             count=count))
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
  if len(seeds) > 1:
    parts.append(f"Mean ± sample std (ddof=1) over {len(seeds)} seeds "
                 f"({', '.join(map(str, seeds))})")
  else:
    parts.append(f"One seed ({seeds[0]}): no std")
  parts.append("Best per column in bold")
  if any(0 < min(s.count.values(), default=0) < s.num_runs for s in summaries):
    parts.append("†: fewer seeds finished (see results.csv)")
  if any(s.num_ok == 0 for s in summaries):
    parts.append("'failed': no seed finished")
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
        row.append(("failed" if s.num_ok == 0 else "n/a", False))
        continue
      text = f"{s.mean[metric]:.4f}"
      if not math.isnan(s.std[metric]):
        text += f" {pm} {s.std[metric]:.4f}"
      if s.count[metric] < s.num_runs:
        text += " †"
      row.append((text, round(s.mean[metric], 4) == best[metric]))
    table.append(row)
  return table


def _row_heads(summaries: Sequence[Summary], keys: Sequence[str]) -> tuple[list, list]:
  """Header and per-row identity cells: one column per axis, else the label."""
  if keys:
    short = _short_names(list(keys))
    return ([short[k] for k in keys],
            [[_format_value(s.values.get(k)) for k in keys] for s in summaries])
  return ["point"], [[s.label] for s in summaries]


def render_markdown(summaries: Sequence[Summary], metrics: Sequence[str], caption: str,
                    keys: Sequence[str] = ()) -> str:
  """A GitHub-markdown table, best per column in bold, caption below.

  Args:
    summaries: from ``summarize``.
    metrics: the metric columns, in order.
    caption: from ``caption_text``.
    keys: axis keys, one column each (grids); empty: a 'point' label column.

  Returns:
    The markdown text.
  """
  header, heads = _row_heads(summaries, keys)
  cells = _cells(summaries, metrics, "±")
  escape = lambda text: str(text).replace("|", "\\|")
  lines = ["| " + " | ".join([*map(escape, header), *map(metric_title, metrics)]) + " |",
           "|" + "---|" * len(header) + "---:|" * len(metrics)]
  for head, row in zip(heads, cells, strict=True):
    shown = [f"**{text}**" if is_best else text for text, is_best in row]
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
      if text in ("failed", "n/a"):
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
  short = _short_names(keys) if keys else {}
  numeric = [k for k in keys if all(_is_number(s.values.get(k)) for s in shown)
             and len({s.values.get(k) for s in shown}) > 1]
  x_key = numeric[0] if numeric else (keys[0] if keys else None)
  others = [k for k in keys if k != x_key]

  def x_of(s: Summary) -> Any:
    return s.values.get(x_key) if x_key else s.label

  def series_of(s: Summary) -> str:
    return ", ".join(f"{short[k]}={_format_value(s.values.get(k))}" for k in others)

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
      ax.set_xticks(np.arange(len(xs)), [_format_value(x) for x in xs],
                    rotation=20 if any(len(_format_value(x)) > 10 for x in xs) else 0,
                    ha="right" if any(len(_format_value(x)) > 10 for x in xs) else "center")
    ax.set_xlabel(short.get(x_key, "point") if x_key else "point")
    with_std = any(s.count[metric] > 1 for s in shown)
    ax.set_ylabel(metric_title(metric) + (" (mean ± std over seeds)" if with_std else ""))
    ax.set_title(f"{title}: {metric_title(metric)}" if title else metric_title(metric))
    ax.grid(alpha=0.3)
    if any(series):
      ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{slug(metric.replace('@', '_at_'))}.png")
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
  keys = varied_keys(ablation_config)
  axis_keys = [k for k, _ in axes_of(ablation_config)]
  metrics = list(ablation_config.metrics)
  write_csv(rows, os.path.join(workdir, "results.csv"), keys, metrics)
  summaries = summarize(rows, metrics, keys)
  caption = caption_text(ablation_config, summaries)
  markdown = render_markdown(summaries, metrics, caption, axis_keys)
  with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  with open(os.path.join(workdir, "table.tex"), "w", encoding="utf-8") as f:
    f.write(render_latex(summaries, metrics, caption, axis_keys))
  plot(summaries, metrics, os.path.join(workdir, "plots"), axis_keys,
       title=(ablation_config.get("caption") or {}).get("title", ""))
  return markdown


class Outcome(NamedTuple):
  """What ``run_ablation`` did: the text to show and the rows (none for a dry run)."""
  text: str
  rows: list[dict[str, Any]]


def use_compilation_cache(path: str) -> str:
  """JAX's persistent compilation cache for this process and its workers.

  All seeds of a point compile the same programs, so every seed after the
  first loads them instead (~10 s -> ~1 s per tiny run on 2 CPU cores). Call it
  before anything compiles: JAX decides once per process whether to use it.

  Args:
    path: the cache directory; an existing $JAX_COMPILATION_CACHE_DIR wins.

  Returns:
    The directory in use.
  """
  path = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", path)
  # Cache every program: on CPU even sub-second compiles add up over a sweep.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  import jax  # Imported here: planning, dry runs and reports need no JAX.
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  return path


def run_ablation(ablation_config: ml_collections.ConfigDict, workdir: str, *,
                 parallel: int = 1, dry_run: bool = False, compilation_cache: bool = False,
                 train_fn: TrainFn | None = None) -> Outcome:
  """Plans, trains what is missing, and writes the report.

  Args:
    ablation_config: see experiments/configs/ablations/.
    workdir: the sweep's directory (rerun with the same one to resume).
    parallel: runs trained at once (see ``execute``).
    dry_run: only list the runs and their workdirs.
    compilation_cache: use ``workdir/jax_cache`` (see ``use_compilation_cache``).
    train_fn: see ``run_point``.

  Returns:
    The dry-run listing, or the markdown table and the rows of results.csv.
  """
  runs = plan_runs(ablation_config, workdir)
  if dry_run:
    return Outcome(describe_runs(runs), [])
  os.makedirs(workdir, exist_ok=True)
  if compilation_cache:
    use_compilation_cache(os.path.join(workdir, "jax_cache"))
  execute(runs, parallel=parallel, train_fn=train_fn)
  rows = collect_results(workdir, ablation_config.split, [run.workdir for run in runs])
  return Outcome(write_report(ablation_config, workdir, rows), rows)
