"""Click-through model (models/ctr.py, deeprec_jax/ctr.py) on the synthetic items' pictures.

  python -m experiments.ctr --config=experiments/configs/ctr.py
"""

import ml_collections

from experiments.configs import default


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  config = default.get_config(dataset)
  config.model = ml_collections.ConfigDict()
  config.model.name = "ctr"  # deeprec_jax/models/ctr.py (trained by deeprec_jax/ctr.py)
  config.model.dim = 32  # item and user width
  config.model.use_id = False  # add the candidate's id embedding to its picture vector
  config.model.hidden = (64,)  # ReLU widths of the scoring MLP
  config.model.image_channels = (32, 64, 128)  # image tower: conv + ReLU + max-pool channels
  config.model.image_kernel = 3  # image tower: square conv kernel side
  config.model.image_pool = 2  # image tower: max-pool window (and stride)
  config.model.image_dense = 128  # image tower: hidden dense width
  config.data.max_len = 20  # most recent items read per history
  config.train.num_steps = 2000  # Adam steps on the training pairs
  config.train.batch_size = 256  # pairs per step
  config.train.num_negatives = 1  # sampled unseen items (label 0) per click
  config.train.learning_rate = 1e-3  # Adam's rate
  config.eval.num_negatives = 1  # sampled unseen items per held-out click
  return config
