"""HSTU (Zhai et al., ICML 2024): pointwise-attention transduction units.

The published ML-1M settings (``facebookresearch/generative-recommenders``,
``configs/ml-1m/hstu-sampled-softmax-n128{,-large}-final.gin``) as variants:

* ``--config=experiments/configs/hstu.py:ml-1m``: base, 2 blocks, 1 head,
  d_qk = d_v = 50;
* ``--config=experiments/configs/hstu.py:ml-1m,large``: large, 8 blocks,
  2 heads, d_qk = d_v = 25; the same as the base config with
  ``--config.model.num_blocks=8 --config.model.num_heads=2`` (or, explicitly,
  ``--config.model.qk_dim=25 --config.model.v_dim=25`` too).

Both: d_model 50, maxlen 200, dropout 0.2, lr 1e-3, batch 128, sampled
softmax with 128 negatives over cosine scores (L2-normalized states and item
vectors) at temperature 0.05; the paper trains 101 epochs (add
``--config.train.num_epochs=101``). The paper's ML-1M has all 3,706 movies
(``ml-1m-chrono`` here, or ``ml-1m-raw`` with GroupLens' ``ratings.dat``);
``ml-1m`` is the 3,416-item SASRec-layout file. Neither text file holds
timestamps, so the time bias (``--config.model.time_buckets=128``, the
official value) needs a source that has them (``ml-1m-raw``, ``ml-100k``).
The argument after ``:`` is ``<dataset>[,<variant>]``; other keys are
documented in default.py.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import default

# Per-variant sizes; d_qk = d_v = dim // num_heads (50 and 25 at dim 50).
VARIANTS = {
    "base": dict(num_blocks=2, num_heads=1),
    "large": dict(num_blocks=8, num_heads=2),
}


def model_config(variant: str = "base") -> ml_collections.ConfigDict:
  """The ``config.model`` block of HSTU (fields of hstu.Model)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown HSTU variant {variant!r} in --config=...:<dataset>,<variant>; "
                     f"expected one of {', '.join(VARIANTS)}.")
  model = ml_collections.ConfigDict()
  model.name = "hstu"  # a key of deeprec_jax.models.MODELS
  model.dim = 50  # embedding and hidden width (d_model)
  model.num_blocks = VARIANTS[variant]["num_blocks"]  # HSTU layers
  model.num_heads = VARIANTS[variant]["num_heads"]  # attention heads
  model.qk_dim = config_dict.placeholder(int)  # query/key width per head (None = dim // heads)
  model.v_dim = config_dict.placeholder(int)  # value/U width per head (None = dim // heads)
  model.dropout_rate = 0.2  # dropout on input embeddings and each layer's output
  model.l2_norm = False  # unit output and item vectors, cosine scores (the official code)
  # Relative time bias over log-bucketed timestamp gaps (0 = none; the official
  # code 128, on data with real timestamps: ml-100k, ml-1m-raw, csv).
  model.time_buckets = 0
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  return model


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
  """Returns the HSTU config for ``arg = '<dataset>[,<variant>]'``."""
  dataset, _, variant = arg.partition(",")
  config = default.get_config(dataset)
  config.model = model_config(variant or "base")
  if dataset in ("ml-1m", "ml-1m-chrono", "ml-1m-raw"):
    config.data.max_len = 200  # the paper's maxlen on ML-1M
    config.train.learning_rate = 1e-3  # the paper's rate
  # The paper's loss: sampled softmax over 128 negatives.
  config.train.loss = "sampled_softmax"
  config.train.num_negatives = 128
  if dataset in ("ml-1m", "ml-1m-chrono", "ml-1m-raw"):
    # Its scores: cosines of L2-normalized states and item vectors, divided
    # by a temperature of 0.05.
    config.model.l2_norm = True
    config.train.temperature = 0.05
  return config
