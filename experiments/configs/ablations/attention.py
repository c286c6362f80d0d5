r"""Ablation: SASRec attention (dot-product vs additive) x depth x positions.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/attention.py:ml-100k \
      --workdir=/tmp/ablate_attention

2 x 3 x 2 = 12 points x 3 seeds = 36 runs of about 1-2 minutes each on 2 CPU
cores (ml-100k: 943 users, 7 steps per epoch at batch 128, max_len 50).
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-100k") -> ml_collections.ConfigDict:
  """The ablation on ``dataset`` (synthetic | ml-100k | ml-1m)."""
  config = ml_collections.ConfigDict()
  config.base = f"experiments/configs/sasrec.py:{dataset}"  # experiment every point starts from
  # Fixed for every point, winning over point values (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 50  # ~350 steps: 1-2 min per run on 2 cores (to tune)
  config.overrides.train.eval_every_epochs = 5  # validation picks the reported checkpoint
  config.axes = (  # the grid, varied in this order: (dotted config key, values)
      ("model.attention", ("dot_product", "additive")),  # scaled dot-product vs additive
      ("model.num_blocks", (1, 2, 3)),  # stacked self-attention blocks
      ("model.positional", (True, False)),  # learned positional embedding on/off
  )
  config.points = ()  # explicit points instead of a grid (unused here)
  config.seeds = (0, 1, 2)  # every point once per seed; tables give mean ± std
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "SASRec: attention type, depth and positional embedding"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
