"""Ablation runs: trains the planned runs, resuming and recording failures.

Each run is ``workdir/runs/<slug>_seed<k>``. A run is finished once its
``final_metrics.json`` exists (``train.train_and_evaluate`` writes it last), so
rerunning a sweep trains only what is missing or failed. A failed run leaves
``error.txt`` (the traceback) and becomes a ``failed`` row; the others go on.
``run_ablation`` plans, trains what is missing and writes the report.
"""

import concurrent.futures
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from deeprec_jax import workdir as workdir_lib
from deeprec_jax.ablation import plan, report

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]

# ----------------------------------------------------------------------------
# Running.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains one run: ``train.train_and_evaluate``, or ``ctr.train_and_evaluate`` for 'ctr'."""
  # Imported here: planning and reporting need no JAX.
  if config.model.name == "ctr":
    from deeprec_jax import ctr  # pylint: disable=g-import-not-at-top
    return ctr.train_and_evaluate(config, workdir)
  from deeprec_jax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)


def run_point(config: ml_collections.ConfigDict, workdir: str, info: Mapping[str, Any],
              train_fn: TrainFn | None = None) -> dict[str, Any]:
  """Trains one run unless it finished before; records failures, never raises them.

  Args:
    config: the run's experiment config.
    workdir: its own directory.
    info: written to ``workdir/point.json`` (label, values, seed, ...) so that
      ``report.collect_results`` can rebuild the row from disk alone.
    train_fn: ``(config, workdir) -> metrics``; ``train.train_and_evaluate``
      by default.

  Returns:
    ``{'status': 'ok' | 'failed', 'skipped': bool, 'train_seconds', 'error'}``.
  """
  if plan.run_status(workdir) == "ok":
    status = plan.read_json(os.path.join(workdir, plan.STATUS_FILE))
    return {**status, "status": "ok", "skipped": True}
  if train_fn is None:
    train_fn = train_and_evaluate
  os.makedirs(workdir, exist_ok=True)
  # A retry of a failed run starts clean.
  for name in (plan.ERROR_FILE, plan.STATUS_FILE):
    if os.path.exists(os.path.join(workdir, name)):
      os.remove(os.path.join(workdir, name))
  _write_point(workdir, info, config)
  start = time.perf_counter()
  error = details = ""
  try:
    train_fn(config, workdir)
    if plan.run_status(workdir) != "ok":  # else it would be retrained on every rerun
      error = details = f"train_fn returned without writing {plan.FINAL_METRICS}"
  except Exception as e:  # noqa: BLE001  (one failed point must not stop the sweep)
    error, details = f"{type(e).__name__}: {e}".replace("\n", " "), traceback.format_exc()
  status = {"status": "failed" if error else "ok", "error": error,
            "train_seconds": time.perf_counter() - start}
  _record(workdir, status, details)
  return {**status, "skipped": False}


def _write_point(workdir: str, info: Mapping[str, Any], config: ml_collections.ConfigDict
                 ) -> None:
  """point.json: ``info`` and the full config, all ``report`` needs to rebuild the row."""
  plan.write_json(os.path.join(workdir, plan.POINT_FILE),
                  {**info, "config": plan.config_json(config)})


def _record(workdir: str, status: Mapping[str, Any], details: str = "") -> None:
  """Writes status.json, and error.txt (the traceback) for a failed run."""
  if status["status"] == "failed":
    with open(os.path.join(workdir, plan.ERROR_FILE), "w", encoding="utf-8") as f:
      f.write((details or status["error"]).rstrip("\n") + "\n")
  plan.write_json(os.path.join(workdir, plan.STATUS_FILE), status)


def _run_info(run: plan.Run) -> dict[str, Any]:
  point = run.point
  return {"index": point.index, "label": point.label, "seed": point.seed, "base": point.base,
          "values": _effective_values(run)}


def _effective_values(run: plan.Run) -> dict[str, Any]:
  """The varied keys' values as trained (overrides may have replaced a point's)."""
  values = {}
  for key in run.point.values:
    values[key] = run.point.base if key == "base" else plan.get_value(run.config, key)
  return values


def run_info(run: plan.Run) -> dict[str, Any]:
  """What ``run_point`` writes to point.json for ``run``."""
  return _run_info(run)


def log_run_result(run: plan.Run, i: int, total: int, result: Mapping[str, Any]) -> None:
  """One log line per run: skipped, ok or failed (with the error)."""
  what = ("finished before, skipped" if result.get("skipped") else
          f"{result['status']} in {result.get('train_seconds') or 0:.1f} s")
  if result["status"] == "failed":
    what += f": {result['error']}"
  logging.info("[%d/%d] %s seed %d: %s", i + 1, total, run.point.label, run.point.seed, what)


def record_crash(run: plan.Run, error: str) -> dict[str, Any]:
  """Records a run whose process (worker, job, task) died without recording itself.

  Args:
    run: the run.
    error: one line, e.g. 'SLURM job 123_4 failed: ...'.

  Returns:
    The ``run_point``-style result, status 'failed'.
  """
  result = {"status": "failed", "error": error.replace("\n", " "), "skipped": False}
  if plan.run_status(run.workdir) == "ok":  # it finished; only the process died after
    return {**plan.read_json(os.path.join(run.workdir, plan.STATUS_FILE)), "status": "ok",
            "skipped": False}
  os.makedirs(run.workdir, exist_ok=True)
  if not os.path.exists(os.path.join(run.workdir, plan.POINT_FILE)):
    _write_point(run.workdir, _run_info(run), run.config)
  _record(run.workdir, result)
  return result


def execute(runs: Sequence[plan.Run], parallel: int = 1, train_fn: TrainFn | None = None,
            train_fns: Sequence[TrainFn | None] | None = None) -> list[dict[str, Any]]:
  """Trains every unfinished run, in this process or in ``parallel`` subprocesses.

  Args:
    runs: from ``plan.plan_runs``.
    parallel: runs trained at once; 1 trains in this process, more use a
      spawn-started process pool (JAX does not survive fork).
    train_fn: see ``run_point``; must be picklable when ``parallel > 1``.
    train_fns: one train function per run instead (a search's trials).

  Returns:
    ``run_point``'s result per run, in order.
  """
  total = len(runs)
  results = [None] * total
  fns = list(train_fns) if train_fns is not None else [train_fn] * total

  def log_result(i: int, result: dict[str, Any]) -> None:
    results[i] = result
    log_run_result(runs[i], i, total, result)

  if parallel <= 1:
    for i, run in enumerate(runs):
      log_result(i, run_point(run.config, run.workdir, _run_info(run), fns[i]))
    return results
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=context) as pool:
    futures = {}
    for i, run in enumerate(runs):
      if plan.run_status(run.workdir) == "ok":  # no process start for finished runs
        log_result(i, run_point(run.config, run.workdir, _run_info(run), fns[i]))
      else:
        futures[pool.submit(run_point, run.config, run.workdir, _run_info(run), fns[i])] = i
    try:
      for future in concurrent.futures.as_completed(futures):
        i = futures[future]
        try:
          result = future.result()
        except Exception as e:  # noqa: BLE001  (a worker that died, e.g. out of memory)
          result = record_crash(runs[i], f"worker process failed: {type(e).__name__}: {e}")
        log_result(i, result)
    except KeyboardInterrupt:
      pool.shutdown(wait=False, cancel_futures=True)  # do not start the queued runs
      raise
  return results


def describe_runs(runs: Sequence[plan.Run]) -> str:
  """The dry-run listing: one line per point, then one per seed with its status."""
  num_points = len({run.point.index for run in runs})
  seeds = sorted({run.point.seed for run in runs})
  lines = [f"{len(runs)} runs: {num_points} points x {len(seeds)} seeds {seeds}"]
  previous = None
  for run in runs:
    point = run.point
    if point.index != previous:
      settings = plan.settings_text(point.overrides)
      lines.append(f"point {point.index}: {point.label}  [base {point.base}; {settings}]")
      previous = point.index
    lines.append(f"  {plan.run_status(run.workdir):6} seed {point.seed}  {run.workdir}")
  return "\n".join(lines)


class Outcome(NamedTuple):
  """What ``run_ablation`` did: the text to show and the rows (none for a dry run)."""
  text: str
  rows: list[dict[str, Any]]


def use_compilation_cache(path: str) -> str:
  """JAX's persistent compilation cache for this process and its workers.

  All seeds of a point compile the same programs, so every seed after the
  first loads them instead of compiling again. Call it
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
                 parallel: int = 1, dry_run: bool = False, report_only: bool = False,
                 compilation_cache: bool = False, train_fn: TrainFn | None = None,
                 executor: Any = None) -> Outcome:
  """Plans, trains what is missing, and writes the report.

  Args:
    ablation_config: see experiments/configs/ablations/.
    workdir: the sweep's directory (rerun with the same one to resume).
    parallel: runs trained at once (see ``execute``).
    dry_run: only list the runs and their workdirs.
    report_only: train nothing; write the report of the runs finished so far
      (the others are 'todo' rows), e.g. while the sweep runs elsewhere.
    compilation_cache: use ``workdir/jax_cache`` (see ``use_compilation_cache``).
    train_fn: see ``run_point``.
    executor: an ``executors.Executor`` (submitit, Ray); None trains here or
      in ``parallel`` local processes.

  Returns:
    The dry-run listing, or the markdown table and the rows of results.csv.

  Raises:
    workdir.WorkdirLockedError: another process is training this sweep.
  """
  runs = plan.plan_runs(ablation_config, workdir)
  if dry_run:
    return Outcome(describe_runs(runs), [])
  os.makedirs(workdir, exist_ok=True)
  if compilation_cache:
    use_compilation_cache(os.path.join(workdir, "jax_cache"))
  if not report_only:
    # One sweep process per workdir: a second one would start the next
    # unfinished row beside the first's (each run only locks its own dir).
    with workdir_lib.locked(workdir):
      if executor is None:
        execute(runs, parallel=parallel, train_fn=train_fn)
      else:
        executor.execute(runs, train_fn=train_fn)
  rows = report.collect_results(workdir, ablation_config.split, [run.workdir for run in runs])
  for row, planned in zip(rows, runs, strict=True):
    row["published"] = planned.point.published
    if row["status"] == "todo":  # no point.json yet: the plan names the point
      row.update(label=planned.point.label, seed=planned.point.seed, **planned.point.values)
  return Outcome(report.write_report(ablation_config, workdir, rows), rows)
