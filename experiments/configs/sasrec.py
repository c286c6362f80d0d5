"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention.

``--config=experiments/configs/sasrec.py:ml-1m`` is the paper's ML-1M setting
(maxlen 200, d = 50, 2 blocks, 1 head, dropout 0.2, lr 1e-3, batch 128, BCE
with 1 negative); add ``--config.train.num_epochs=200`` for the full run.
"""

import ml_collections

from experiments.configs import default


def model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = "sasrec"  # module in deeprec_jax/models/
  model.dim = 50  # embedding and hidden width
  model.num_blocks = 2  # causal self-attention blocks
  model.num_heads = 1  # attention heads (each additive head has its own b, v)
  model.dropout_rate = 0.2  # dropout on embeddings, attention and FFN
  model.attention = "dot_product"  # dot_product | additive
  model.positional = True  # learned positional embedding on/off
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  return model


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = model_config()
  return config
