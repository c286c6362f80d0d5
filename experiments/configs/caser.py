"""Caser (Tang & Wang, WSDM 2018): convolutions over the last L item embeddings."""

import ml_collections

from experiments.configs import default


def model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = "caser"  # module in deeprec_jax/models/
  model.dim = 50  # embedding width d
  model.num_horizontal = 16  # horizontal filters per height h = 1..L (0 = none)
  model.num_vertical = 4  # vertical filters (0 = none)
  model.dropout_rate = 0.5  # dropout before the fully-connected layer
  model.activation_conv = "relu"  # activation of the horizontal convolutions
  model.activation_fc = "relu"  # activation of the fully-connected layer
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  return model


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = default.add_item_encoder(model_config())
  config.data.max_len = 5  # L: the window of most recent items
  config.task.num_targets = 3  # T: next items predicted from each window
  config.train.num_negatives = 3  # Caser samples 3 negatives per target
  config.train.batch_size = 512  # one example per window: many more examples than users
  config.train.num_epochs = 10
  config.train.eval_every_epochs = 2
  return config
