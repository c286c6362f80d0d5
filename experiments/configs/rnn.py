"""GRU4Rec-style RNN recommender with a peephole LSTM, LSTM or GRU cell."""

import ml_collections

from experiments.configs import default


def model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = "rnn"  # module in deeprec_jax/models/
  model.dim = 64  # embedding and hidden width
  model.cell = "peephole_lstm"  # peephole_lstm | lstm | gru
  model.num_layers = 1  # stacked recurrent layers
  model.dropout_rate = 0.2  # dropout on embeddings and between layers
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  return model


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = default.add_item_encoder(model_config())
  return config
