r"""Ablation: SASRec's training loss (BCE, sampled softmax, full softmax).

  python -m experiments.ablate \
      --config=experiments/configs/ablations/loss.py:ml-100k \
      --workdir=/tmp/ablate_loss

3 points x 3 seeds = 9 runs of about 1-2 minutes each on 2 CPU cores. Explicit
points because the number of sampled negatives goes with the loss.
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
  config.axes = ()  # no grid: the points below
  config.points = (  # explicit points: a label plus dotted config keys
      # SASRec's own loss: one sampled negative per position.
      {"label": "BCE, 1 negative", "train.loss": "bce", "train.num_negatives": 1},
      {"label": "sampled softmax, 100 negatives", "train.loss": "sampled_softmax",
       "train.num_negatives": 100},
      # Every item is a negative; the sampled ones are unused, so keep them cheap.
      {"label": "full softmax", "train.loss": "softmax", "train.num_negatives": 1},
  )
  config.seeds = (0, 1, 2)  # every point once per seed; tables give mean ± std
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "SASRec: training loss"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
