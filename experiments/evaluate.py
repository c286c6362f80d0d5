r"""Evaluates the best checkpoint of a finished (or running) experiment.

  python -m experiments.evaluate --workdir=/tmp/sasrec_ml1m --split=test

Prints the metrics and writes them to ``<workdir>/eval_<split>.json``.
"""

import json
import os

from absl import app, flags

from deeprec_jax import train, writers
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory written by experiments.train.",
                               required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["valid", "test"], "Which held-out item to rank.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  trainer, params, step = train.load_trained(_WORKDIR.value)
  metrics = {"step": step, "split": _SPLIT.value, **trainer.evaluate(params, _SPLIT.value)}
  metrics = writers.strict_json(metrics)  # strict JSON: a non-finite value becomes null
  with open(os.path.join(_WORKDIR.value, f"eval_{_SPLIT.value}.json"), "w",
            encoding="utf-8") as f:
    json.dump(metrics, f, indent=2, sort_keys=True, allow_nan=False)
  print(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False))


if __name__ == "__main__":
  cli.run(main)
