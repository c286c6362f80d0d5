"""Saved run configs: a workdir's ``config.json``, read back in today's layout.

Every reader of a saved config goes through ``upgrade_config``, so keys that
moved or appeared since a run was written get their place and default here
and nowhere else.
"""

import json
import os

import ml_collections

# Keys added after the first runs were written, with the value that
# reproduces what those runs did.
_ADDED = {
    ("data", "keep_short_users"): False,
    ("train", "model_parallel"): 1,
    ("train", "num_devices"): 0,
    ("train", "pack"): False,
    ("train", "divergence_factor"): 0.0,
    ("train", "temperature"): 1.0,
    ("train", "gbce_t"): 0.75,
    ("train", "shared_negatives"): False,
    ("train", "label_smoothing"): 0.0,
    ("eval", "length_buckets"): 4,  # The metrics do not depend on it.
    # Runs before DP-SGD were not private; the other keys are read only when enabled.
    ("privacy", "enabled"): False,
    ("privacy", "l2_clip_norm"): 1.0,
    ("privacy", "noise_multiplier"): 0.0,
    ("privacy", "target_epsilon"): 0.0,
    ("privacy", "delta"): 1e-6,
    ("privacy", "accountant"): "pld",
    ("privacy", "sampling"): "poisson",
    ("privacy", "microbatch_size"): 0,
}
# Nested keys and model fields added since, with the value that reproduces
# older runs. They are not added to saved configs (each model has its own
# fields, and absent fields take these defaults anyway); ``config_changes``
# accepts their absence.
ADDED_KEYS = {
    "data.images.item_ids": "",
    "model.init_std": 0.0,
    "model.ffn_dim": 0,
    "model.l2_norm": False,
    "model.output_table": False,
    "model.block": "sasrec",
    "model.positions_from": "end",
    "model.qkv_init": "same",
    "train.bce_log_k_offset": False,
    "model.time_buckets": 0,
    "train.adam_b2": 0.999,
}
# Added keys that change nothing unless ``predicate(flat config)`` holds: a
# run saved without one resumes under any value when it does not.
_INERT_UNLESS = {
    "train.bce_log_k_offset": lambda flat: (flat.get("train.loss") in ("bce", "gbce")
                                            and flat.get("train.num_negatives", 1) > 1),
}
# Pipeline settings that were model fields: (old model key, task key, default).
_MOVED_TO_TASK = (("mask_prob", "mask_prob", 0.2), ("num_targets", "num_targets", 1))


def upgrade_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns a copy of a saved ``config`` in today's layout.

  ``model.mask_prob`` and ``model.num_targets`` move to ``config.task``;
  keys added since (``_ADDED``) get the value older runs used.
  """
  tree = config.to_dict()
  task = tree.setdefault("task", {})
  for old_key, key, default in _MOVED_TO_TASK:
    value = tree["model"].pop(old_key, default)
    task.setdefault(key, value)
  for (block, key), default in _ADDED.items():
    tree.setdefault(block, {}).setdefault(key, default)
  return ml_collections.ConfigDict(tree)


def config_changes(before: dict, now: dict) -> list[str]:
  """Dotted keys whose values differ between a saved and a current flat config.

  Both are ``{dotted key: leaf}``; ``before`` should be read in today's layout
  (``upgrade_config``) first. A key absent from ``before`` counts as unchanged
  when ``now`` holds the value that reproduces older runs (``ADDED_KEYS``),
  or any value that cannot change this run (``_INERT_UNLESS``).
  """
  missing = object()

  def added_unchanged(key: str) -> bool:
    inert = key in _INERT_UNLESS and not _INERT_UNLESS[key](now)
    return key not in before and key in ADDED_KEYS and (now[key] == ADDED_KEYS[key] or inert)

  return sorted(k for k in set(before) | set(now)
                if before.get(k, missing) != now.get(k, missing) and not added_unchanged(k))


def load(workdir: str) -> ml_collections.ConfigDict:
  """Reads ``workdir/config.json`` (written by ``train.train_and_evaluate``), upgraded."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by "
                            "experiments.train.")
  with open(path, encoding="utf-8") as f:
    try:
      tree = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not valid JSON ({error}).") from error
  return upgrade_config(ml_collections.ConfigDict(tree))
