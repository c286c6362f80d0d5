r"""Trains the click-through model and prints held-out logloss, AUC and accuracy.

  python -m experiments.ctr --config=experiments/configs/ctr.py \
      --config.data.cold_start_fraction=0.2 --config.train.num_steps=500
"""

import json
import os

from absl import app, flags

from deeprec_jax import ctr
from experiments import cli

_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
cli.define_config_file("config", os.path.join(_CONFIGS, "ctr.py"), "CTR config file[:dataset].")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  print(json.dumps(ctr.run(flags.FLAGS.config), indent=2, sort_keys=True))


if __name__ == "__main__":
  cli.run(main)
