"""BERT4Rec (Sun et al., CIKM 2019): bidirectional self-attention, cloze task."""

import ml_collections

from experiments.configs import default


def model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = "bert4rec"  # module in deeprec_jax/models/
  model.dim = 64  # embedding and hidden width
  model.num_blocks = 2  # bidirectional self-attention blocks
  model.num_heads = 2  # attention heads (each additive head has its own b, v)
  model.dropout_rate = 0.1  # dropout on embeddings, attention and FFN
  model.attention = "dot_product"  # dot_product | additive
  model.positional = True  # learned positional embedding on/off
  model.mask_prob = 0.2  # fraction of training items replaced by [mask]
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  return model


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = model_config()
  # The cloze task learns from ~mask_prob of positions per pass, so it needs
  # full softmax and more epochs than SASRec to converge.
  config.train.loss = "softmax"
  config.train.num_epochs = 40
  config.train.eval_every_epochs = 10
  return config
