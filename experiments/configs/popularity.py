"""Most-popular items: the ranking every model has to beat (no training)."""

import ml_collections

from experiments.configs import default


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = ml_collections.ConfigDict()
  config.model.name = "popularity"  # counts items in the training parts
  config.model.dtype = "float32"  # compute dtype (scores are float32 anyway)
  return config
