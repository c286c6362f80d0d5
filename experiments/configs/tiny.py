"""Tiny configs for tests: ``tiny.py:<model>`` trains in seconds on 2 cores."""

import ml_collections

from experiments.configs import bert4rec, caser, hstu, popularity, rnn, sasrec

_MODELS = {"sasrec": sasrec, "bert4rec": bert4rec, "rnn": rnn, "caser": caser,
           "popularity": popularity, "hstu": hstu}


def get_config(model: str = "sasrec") -> ml_collections.ConfigDict:
  if model not in _MODELS:
    raise ValueError(f"unknown model {model!r} in tiny.py:<model>; expected one of "
                     f"{', '.join(_MODELS)}.")
  config = _MODELS[model].get_config("synthetic")
  config.data.synthetic.num_users = 64  # a handful of users
  config.data.synthetic.num_items = 40  # a small catalogue
  config.data.synthetic.num_clusters = 4  # few latent clusters
  config.data.synthetic.mean_length = 12  # short sequences
  config.data.max_len = 10 if model != "caser" else 3  # short inputs
  if "dim" in config.model:
    config.model.dim = 8  # narrow layers
  if "num_blocks" in config.model:
    config.model.num_blocks = 1
    config.model.num_heads = 1
  if "num_horizontal" in config.model:
    config.model.num_horizontal = 2
    config.model.num_vertical = 2
    config.task.num_targets = 2
  config.train.batch_size = 16  # divisible by 1, 2 and 4 devices
  config.train.num_epochs = 2
  config.train.log_every_steps = 2
  config.train.eval_every_epochs = 1
  config.eval.batch_size = 32
  config.eval.num_sampled_negatives = 10
  return config
