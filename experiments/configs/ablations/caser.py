r"""Ablation: Caser's horizontal and vertical convolutions, alone and together.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/caser.py:ml-100k \
      --workdir=/tmp/ablate_caser

3 points x 3 seeds = 9 runs. Caser trains on every window of L = 5 items
(~186 steps of 512 per epoch on ml-100k, ~0.2 s each on 2 busy CPU cores), so
its budget is counted in few epochs.
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-100k") -> ml_collections.ConfigDict:
  """The ablation on ``dataset`` (synthetic | ml-100k | ml-1m)."""
  config = ml_collections.ConfigDict()
  config.base = f"experiments/configs/caser.py:{dataset}"  # experiment every point starts from
  # Fixed for every point, winning over point values (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 4  # ~750 steps: 1-2 min per run on 2 cores (to tune)
  config.overrides.train.eval_every_epochs = 1  # validation picks the reported checkpoint
  config.axes = ()  # no grid: the points below
  config.points = (  # explicit points: a label plus dotted config keys
      {"label": "horizontal only", "model.num_vertical": 0},  # union-level patterns only
      {"label": "vertical only", "model.num_horizontal": 0},  # point-level weighted sums only
      {"label": "both", "model.num_horizontal": 16, "model.num_vertical": 4},  # the paper's Caser
  )
  config.seeds = (0, 1, 2)  # every point once per seed; tables give mean ± std
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "Caser: horizontal and vertical convolutions"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
