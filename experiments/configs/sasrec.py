"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention, the default model.

``--config=experiments/configs/sasrec.py:ml-1m`` is the paper's ML-1M setting
(maxlen 200, d = 50, 2 blocks, 1 head, dropout 0.2, lr 1e-3, batch 128, BCE
with 1 negative); add ``--config.train.num_epochs=200`` for the full run.
Every key is documented in default.py, which already holds these settings.
"""

import ml_collections

from experiments.configs import default


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  return default.get_config(dataset)
