"""BERT4Rec (Sun et al., CIKM 2019): bidirectional self-attention, cloze task."""

import ml_collections

from experiments.configs import default


def model_config() -> ml_collections.ConfigDict:
  """SASRec's fields (documented in default.py) with BERT4Rec's sizes."""
  model = default.model_config()
  model.name = "bert4rec"  # module in deeprec_jax/models/
  model.dim = 64  # BERT4Rec's width
  model.num_heads = 2  # BERT4Rec's heads
  model.dropout_rate = 0.1  # BERT4Rec's dropout
  return model


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = default.add_item_encoder(model_config())
  # The cloze task learns from ~task.mask_prob of positions per pass, so it needs
  # full softmax and more epochs than SASRec to converge.
  config.train.loss = "softmax"
  config.train.num_epochs = 40
  config.train.eval_every_epochs = 10
  return config
