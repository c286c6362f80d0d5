r"""Trains a recommender and prints its final metrics.

  python -m experiments.train \
      --config=experiments/configs/sasrec.py:ml-1m --workdir=/tmp/sasrec_ml1m \
      --config.train.num_epochs=200

With no flags it trains the default model (SASRec) on the embedded synthetic
data. Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import json
import os

from absl import app, flags, logging

from deeprec_jax import sharding, train, writers
from experiments import cli

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
cli.define_config_file("config", os.path.join(_CONFIGS, "default.py"),
                       "Experiment config file[:dataset].")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 in a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id in a multi-process run.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  results = train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  logging.info("final metrics: %s", results)
  print(json.dumps(writers.strict_json(results), indent=2, sort_keys=True, allow_nan=False))


if __name__ == "__main__":
  cli.run(main)
