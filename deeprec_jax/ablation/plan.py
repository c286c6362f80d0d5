"""Ablation plans: an ablation config expanded into runs, each with its config.

``plan_runs`` expands an ablation config into one ``Run`` per point and seed,
with its built config and its sub-workdir ``workdir/runs/<slug>_seed<k>``, and
checks everything that can be checked before anything trains. The run
directory's file names and JSON helpers here serve ``run`` and ``report`` too.

Order of precedence for a run's config: the base file (the point's own
``base`` if it has one), then the point's values, then the ablation's
``overrides``, which therefore hold for every point: that is what lets
``--config.overrides.train.num_epochs=1`` shrink any sweep to a smoke test.
An explicit point's keys are config values, plus ``label``, ``base``,
``published`` (a table column) and ``seeds`` (its own, instead of the sweep's).
"""
import copy
import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from deeprec_jax import run_config

# Where relative base-config paths are looked up when the working directory
# is not the repository root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINAL_METRICS = "final_metrics.json"  # written last by train.train_and_evaluate
TRAIN_TIME_FILE = "train_time.json"  # train.py: the training loop's seconds over all resumes
# Config keys an unfinished run may resume with another value: they decide
# only when it stops, not what the steps so far computed.
RESUMABLE_KEYS = ("train.patience",)
POINT_FILE = "point.json"  # what this run is: label, varied values, seed, full config
STATUS_FILE = "status.json"  # ok | failed, train_seconds, one-line error
ERROR_FILE = "error.txt"  # traceback of a failed run
SPECIAL_KEYS = ("label", "base")  # point keys that are not config keys
# A point's text for the table only (e.g. the published value and its source).
PUBLISHED_KEY = "published"
# A point's own seeds, instead of the sweep's (e.g. 3 seeds for its cheap rows).
SEEDS_KEY = "seeds"
_NOT_VALUES = ("label", PUBLISHED_KEY, SEEDS_KEY)  # point keys that are neither config nor columns
DATASET_NAMES = {"synthetic": "synthetic (embedded)", "ml-100k": "MovieLens-100K",
                 "ml-1m": "MovieLens-1M (3,416 items)", "ml-1m-raw": "MovieLens-1M (raw)",
                 "ml-1m-chrono": "MovieLens-1M (3,706 items)"}



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
    published: the point's ``published`` text ('' = none): a table column
      beside the measured ones, never part of the run's config.
  """
  label: str
  overrides: dict[str, Any]
  seed: int
  base: str
  values: dict[str, Any]
  index: int
  published: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
  """A point with its built config and sub-workdir."""
  point: Point
  config: ml_collections.ConfigDict
  workdir: str



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


def short_names(keys: Sequence[str]) -> dict[str, str]:
  """Last dotted component, or the full key where two keys share it."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return ",".join(format_value(v) for v in value)
  return str(value)


def settings_text(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str:
  """'key=value, ...' in the order of ``values``; ``names`` renames keys (e.g. short_names)."""
  names = names or {}
  return ", ".join(f"{names.get(k, k)}={format_value(v)}" for k, v in values.items())


def _repeated(items: Sequence[Any]) -> list[Any]:
  return sorted({item for item in items if items.count(item) > 1})


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
  duplicates = _repeated([k for k, _ in result])
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
    keys.extend(k for k in point if k not in _NOT_VALUES and k not in keys)
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
  seeds = _check_seeds(ablation_config.seeds, "seeds")
  overrides = flatten(ablation_config.get("overrides") or {}, skip_none=True)
  collapsed = [k for k, _ in axes if k in overrides]
  if collapsed:
    raise ValueError(f"{collapsed[0]!r} is both an axis and fixed in `overrides`: the grid "
                     "would collapse. Remove it from one of them.")
  if axes:
    short = short_names([k for k, _ in axes])
    specs = []
    for combo in itertools.product(*(values for _, values in axes)):
      values = {k: v for (k, _), v in zip(axes, combo, strict=True)}
      specs.append((settings_text(values, short), values, "", seeds))
  else:
    specs = []
    for point in points:
      values = {k: v for k, v in dict(point).items() if k not in _NOT_VALUES}
      label = point.get("label") or settings_text(values, short_names(list(values))) or "base"
      point_seeds = (_check_seeds(point[SEEDS_KEY], f"point {label!r}: seeds")
                     if point.get(SEEDS_KEY) is not None else seeds)
      specs.append((label, values, str(point.get(PUBLISHED_KEY, "")), point_seeds))
  duplicates = _repeated([label for label, *_ in specs])
  if duplicates:
    raise ValueError(f"points: duplicate labels {duplicates}; give each point a unique 'label'.")

  expanded = []
  for index, (label, values, published, point_seeds) in enumerate(specs):
    base = values.get("base", ablation_config.base)
    point_overrides = {k: v for k, v in values.items() if k not in SPECIAL_KEYS}
    shadowed = sorted(k for k in point_overrides if k in overrides)
    if shadowed:
      logging.warning("point %r: overrides %s replace its own values.", label, shadowed)
    merged = {**point_overrides, **overrides}
    for seed in point_seeds:
      expanded.append(Point(label=label, overrides=merged, seed=int(seed), base=base,
                            values=dict(values), index=index, published=published))
  return expanded


def _check_seeds(seeds: Any, what: str) -> list[int]:
  """``seeds`` as a list of distinct ints, else a ValueError naming ``what``."""
  seeds = list(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"{what} must be a non-empty list of distinct ints, got {seeds!r}.")
  return seeds


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


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
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
  """Refuses to resume (or skip) a run directory trained with another config.

  An unfinished run may resume with a changed ``RESUMABLE_KEYS`` value; a
  finished one may not, since its result belongs to the old value.
  """
  path = os.path.join(run.workdir, POINT_FILE)
  if not os.path.exists(path):
    return
  saved = read_json(path).get("config", {})
  if "model" in saved:  # today's layout: moved and added keys in place
    saved = run_config.upgrade_config(ml_collections.ConfigDict(saved)).to_dict()
  before = flatten(saved)
  now = flatten(config_json(run.config))
  changed = run_config.config_changes(before, now)
  if run_status(run.workdir) != "ok":
    changed = [key for key in changed if key not in RESUMABLE_KEYS]
  if changed:
    diffs = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
    raise ValueError(f"{run.workdir} holds a run of a different config ({diffs}"
                     f"{', ...' if len(changed) > 5 else ''}). Use another --workdir or delete "
                     "that run directory.")


def read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json(path: str, value: Mapping[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)  # never a half-written file after a kill


def run_status(workdir: str) -> str:
  """'ok' (finished), 'failed' (error.txt, no metrics) or 'todo'."""
  if os.path.exists(os.path.join(workdir, FINAL_METRICS)):
    return "ok"
  if os.path.exists(os.path.join(workdir, ERROR_FILE)):
    return "failed"
  return "todo"
