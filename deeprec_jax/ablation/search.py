"""Hyperparameter search: Optuna over a declared space, trials through the executors.

A search-space file (``experiments/configs/ablations/search_*.py``) names the
config keys to tune (``space``: ranges or choices), the validation metric to
maximize, fixed ``overrides`` and the ``final_seeds``. ``run_search``:

1. opens (or resumes) the Optuna study in ``storage`` (SQLite in the workdir
   by default; any SQLAlchemy URL);
2. finishes trials a killed search left running (same parameters, same
   directory, so training resumes from its checkpoint), then asks for new
   ones, ``concurrent`` at a time, and trains each in ``trials/trial_<n>``
   through an executor (local, submitit, Ray);
3. reports every validation evaluation of a running trial to the study and
   stops the trial when the pruner says so (``PruningTrain``);
4. tells the study the trial's best validation metric (never a test metric);
5. trains the best trial's config with every final seed, in
   ``final/best_trial_<n>`` (a later, better trial gets its own), and
   writes the only table with test metrics, its caption stating the budget.
"""

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from deeprec_jax import workdir as workdir_lib
from deeprec_jax.ablation import executors, plan, report, run

TRIALS_DIR = "trials"
FINAL_DIR = "final"
SEARCH_FILE = "search.md"


class Pruned(Exception):  # noqa: N818  (it is not an error: the pruner stopped the trial)
  """Raised inside a trial's training when the pruner stops it."""


@dataclasses.dataclass(frozen=True)
class Param:
  """One searched key: a float/int range or a list of choices."""
  key: str
  low: float | None = None
  high: float | None = None
  log: bool = False
  step: float | None = None
  choices: tuple[Any, ...] = ()

  def distribution(self) -> Any:
    import optuna  # noqa: PLC0415
    if self.choices:
      return optuna.distributions.CategoricalDistribution(self.choices)
    if isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(
        self.step, float):
      return optuna.distributions.IntDistribution(self.low, self.high, log=self.log,
                                                  step=int(self.step or 1))
    return optuna.distributions.FloatDistribution(float(self.low), float(self.high),
                                                  log=self.log, step=self.step)


def parse_space(space_config: ml_collections.ConfigDict) -> list[Param]:
  """The ``space`` pairs ``(dotted key, {low, high[, log, step]} | {choices})``."""
  params = []
  for pair in space_config.get("space") or ():
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"space: expected (dotted key, spec) pairs, got {pair!r}.")
    key, spec = pair[0], dict(pair[1])
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
      raise ValueError(f"space: {key!r} has unknown field(s) {unknown}.")
    if "choices" in spec:
      if not spec["choices"] or set(spec) != {"choices"}:
        raise ValueError(f"space: {key!r}: give a non-empty `choices` alone.")
      params.append(Param(key, choices=tuple(spec["choices"])))
    else:
      if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
        raise ValueError(f"space: {key!r} needs low < high, got {spec}.")
      params.append(Param(key, spec["low"], spec["high"], bool(spec.get("log", False)),
                          spec.get("step")))
  if not params:
    raise ValueError("space: name at least one key to search.")
  if len({p.key for p in params}) != len(params):
    raise ValueError("space: a key appears more than once.")
  return params


def storage_url(workdir: str, storage: str | None = None) -> str:
  return storage or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"


def open_storage(url: str) -> Any:
  """An Optuna RDB storage; SQLite waits on a busy database instead of failing."""
  import optuna  # noqa: PLC0415
  kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
  return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def make_pruner(spec: Mapping[str, Any] | None) -> Any:
  """``{'name': 'median'|'none', 'n_startup_trials', 'n_warmup_steps'}`` -> pruner."""
  import optuna  # noqa: PLC0415
  spec = dict(spec or {})
  name = spec.pop("name", "median")
  if name == "none":
    return optuna.pruners.NopPruner()
  if name != "median":
    raise ValueError(f"pruner: unknown name {name!r}; expected median or none.")
  return optuna.pruners.MedianPruner(**spec)


@contextlib.contextmanager
def on_valid_rows(callback: Any) -> Iterator[None]:
  """Calls ``callback(step, metrics)`` after each validation row a run writes.

  ``train.train_and_evaluate`` has no evaluation hook, so this wraps
  ``writers.MetricWriter.write`` for the block (this process only).
  """
  from deeprec_jax import writers  # noqa: PLC0415
  original = writers.MetricWriter.write

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    original(self, step, split, metrics)
    if split == "valid" and getattr(self, "_enabled", True):
      callback(step, metrics)

  writers.MetricWriter.write = write
  try:
    yield
  finally:
    writers.MetricWriter.write = original


@dataclasses.dataclass
class PruningTrain:
  """A trial's train function: reports validation rows to the study, may prune.

  Picklable, so it runs inside the executor's process, job or task; it opens
  the study storage there (which must therefore be reachable from it).
  """
  storage: str
  study_name: str
  trial_id: int
  metric: str
  pruner: dict[str, Any]
  train_fn: run.TrainFn | None = None

  def __call__(self, config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    import optuna  # noqa: PLC0415
    train_fn = self.train_fn
    if train_fn is None:
      from deeprec_jax import train  # noqa: PLC0415
      train_fn = train.train_and_evaluate
    study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage),
                              pruner=make_pruner(self.pruner))
    trial = optuna.trial.Trial(study, self.trial_id)

    def report_step(step: int, metrics: Mapping[str, Any]) -> None:
      if self.metric not in metrics:
        return
      value = float(metrics[self.metric])
      trial.report(value, step)
      if trial.should_prune():
        raise Pruned(f"pruned at step {step} (valid {self.metric}={value:.4f})")

    with on_valid_rows(report_step):
      return train_fn(config, workdir)


@dataclasses.dataclass
class SearchOutcome:
  """What ``run_search`` did: the text printed and where the results are."""
  text: str
  best_params: dict[str, Any]
  best_value: float
  final_rows: list[dict[str, Any]]


def _trial_run(base: str, base_config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
               params: Mapping[str, Any], number: int, seed: int, workdir: str) -> plan.Run:
  values = dict(params)
  merged = {**overrides, **values}
  point = plan.Point(label=f"trial {number}", overrides=merged, seed=seed, base=base,
                     values=values, index=number)
  config = plan.apply_overrides(base_config, merged)
  config.seed = seed
  return plan.Run(point, config, os.path.join(workdir, TRIALS_DIR, f"trial_{number:04d}"))


def _objective(r: plan.Run, metric: str) -> float | None:
  final = plan.read_json(os.path.join(r.workdir, plan.FINAL_METRICS))
  value = final.get(f"valid/{metric}")
  return None if value is None else float(value)


def run_search(base: str, space_config: ml_collections.ConfigDict, workdir: str, trials: int,
               *, executor: Any = None, storage: str | None = None,
               study_name: str = "search", concurrent: int = 1,
               train_fn: run.TrainFn | None = None) -> SearchOutcome:
  """Runs (or resumes) the search up to ``trials`` trials, then trains the best.

  Args:
    base: the experiment config spec, ``path.py[:arg]``.
    space_config: see experiments/configs/ablations/search_tiny.py.
    workdir: the search directory (rerun with the same one to resume).
    trials: total trials of the study (finished, pruned and failed count).
    executor: see ``executors``; None trains in this process.
    storage: an SQLAlchemy URL; default ``sqlite:///<workdir>/study.db``.
    study_name: the study in ``storage``.
    concurrent: trials asked for and trained at once.
    train_fn: see ``run.run_point`` (tests); the default trains for real.

  Returns:
    The summary text, the best parameters and value, the final rows.
  """
  import optuna  # noqa: PLC0415
  params = parse_space(space_config)
  metric = space_config.metric
  overrides = plan.flatten(space_config.get("overrides") or {}, skip_none=True)
  both = sorted({p.key for p in params} & set(overrides))
  if both:
    raise ValueError(f"{both[0]!r} is both searched and fixed in `overrides`.")
  base_config = plan.load_config(base)
  plan.apply_overrides(base_config, overrides)  # unknown keys fail before any trial
  for p in params:
    plan.apply_overrides(base_config, {p.key: p.choices[0] if p.choices else p.low})
  executor = executor or executors.LocalExecutor(1)
  url = storage_url(workdir, storage)
  os.makedirs(workdir, exist_ok=True)
  distributions = {p.key: p.distribution() for p in params}
  pruner_spec = dict(space_config.get("pruner") or {})
  start = time.perf_counter()
  with workdir_lib.locked(workdir):  # one search per workdir at a time
    study = optuna.create_study(
        storage=open_storage(url), study_name=study_name, load_if_exists=True,
        direction="maximize", pruner=make_pruner(pruner_spec),
        sampler=optuna.samplers.TPESampler(seed=int(space_config.get("sampler_seed", 0)),
                                           n_startup_trials=int(
                                               space_config.get("startup_trials", 3))))
    seed = int(space_config.get("trial_seed", 0))
    while True:
      all_trials = study.get_trials(deepcopy=False)
      stale = [t for t in all_trials if t.state == optuna.trial.TrialState.RUNNING]
      missing = trials - len(all_trials)
      if not stale and missing <= 0:
        break
      # A killed search's trials first: their directories resume from checkpoints.
      batch = [(t.number, t._trial_id, t.params) for t in stale[:concurrent]]  # noqa: SLF001
      for _ in range(min(concurrent - len(batch), max(missing, 0))):
        t = study.ask(distributions)
        batch.append((t.number, t._trial_id, t.params))  # noqa: SLF001
      runs = [_trial_run(base, base_config, overrides, p, n, seed, workdir) for n, _, p in batch]
      for r in runs:
        plan._check_same_config(r)  # noqa: SLF001
      fns = [PruningTrain(url, study_name, tid, metric, pruner_spec, train_fn)
             for _, tid, _ in batch]
      results = executor.execute(runs, train_fns=fns)
      for (number, _, _), r, result in zip(batch, runs, results, strict=True):
        _tell(study, number, r, result, metric)
    text, best, value, rows = _finish(study, base, space_config, params, workdir, executor,
                                      train_fn, trials, url, time.perf_counter() - start)
  return SearchOutcome(text, best, value, rows)


def _tell(study: Any, number: int, r: plan.Run, result: Mapping[str, Any], metric: str) -> None:
  from optuna.trial import TrialState  # noqa: PLC0415
  value = _objective(r, metric) if result.get("status") == "ok" else None
  error = str(result.get("error", ""))
  if value is not None:
    study.tell(number, value)
    logging.info("trial %d: valid %s=%.4f", number, metric, value)
  elif error.startswith("Pruned"):
    study.tell(number, state=TrialState.PRUNED)
    logging.info("trial %d: %s", number, error)
  else:
    study.tell(number, state=TrialState.FAIL)
    logging.warning("trial %d failed: %s", number, error or f"no valid/{metric}")


def trial_rows(study: Any, params: Sequence[Param], metric: str) -> list[dict[str, Any]]:
  """One row per trial: number, state, parameters, objective (valid only)."""
  rows = []
  for t in study.get_trials(deepcopy=False):
    row = {"trial": t.number, "state": t.state.name.lower()}
    row.update({p.key: t.params.get(p.key) for p in params})
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    row[f"valid {metric}"] = t.value if t.value is not None else last
    rows.append(row)
  return rows


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  if not rows:
    return ""
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for row in rows:
    cells = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
             for v in row.values()]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _finish(study: Any, base: str, space_config: ml_collections.ConfigDict,
            params: Sequence[Param], workdir: str, executor: Any, train_fn: run.TrainFn | None,
            trials: int, url: str, seconds: float) -> tuple[str, dict[str, Any], float, list]:
  """Trains the best trial's config with the final seeds; writes search.md."""
  from optuna.trial import TrialState  # noqa: PLC0415
  metric = space_config.metric
  states = [t.state for t in study.get_trials(deepcopy=False)]
  counts = {s.name.lower(): states.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                       TrialState.FAIL)}
  if not counts["complete"]:
    raise ValueError(f"no trial of the study finished ({counts}); see {workdir}/{TRIALS_DIR}.")
  best = study.best_trial
  overrides = plan.flatten(space_config.get("overrides") or {}, skip_none=True)
  epochs = overrides.get("train.num_epochs", plan.get_value(plan.load_config(base),
                                                             "train.num_epochs"))
  budget = (f"search budget: {len(states)} trials of at most {epochs} epochs "
            f"({counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} "
            f"failed), TPE sampler, {space_config.get('pruner', {}).get('name', 'median')} "
            f"pruner, objective valid {metric}; best trial {best.number} "
            f"(valid {metric}={best.value:.4f})")
  caption = dict(space_config.get("caption") or {})
  final = ml_collections.ConfigDict({
      "base": base, "overrides": space_config.get("overrides") or {}, "axes": (),
      "points": ({"label": f"best (trial {best.number})", **best.params},),
      "seeds": tuple(space_config.final_seeds), "metrics": tuple(space_config.final_metrics),
      "split": "test",
      "caption": {"title": f"{caption.get('title', 'Search')}; {budget}",
                  "dataset": caption.get("dataset", base),
                  "protocol": caption.get("protocol", "full ranking, leave-one-out")}})
  final_dir = os.path.join(workdir, FINAL_DIR, f"best_trial_{best.number:04d}")
  outcome = run.run_ablation(final, final_dir, executor=executor, train_fn=train_fn)
  rows = trial_rows(study, params, metric)
  report.write_csv(rows, os.path.join(workdir, "trials.csv"))
  text = "\n\n".join([
      f"# Search over {', '.join(p.key for p in params)} ({base})",
      f"Study {study.study_name!r} in {url}; {budget}. Trials trained by this invocation "
      f"took {seconds:.0f} s of wall time.",
      "## Trials (validation only)", _markdown(rows),
      f"## Best config, {len(final.seeds)} seeds, test split ({final_dir})", outcome.text])
  with open(os.path.join(workdir, SEARCH_FILE), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(final_dir, SEARCH_FILE), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return text, dict(best.params), float(best.value), outcome.rows
