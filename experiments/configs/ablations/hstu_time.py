r"""Ablation: HSTU with and without its relative time bias.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/hstu_time.py:ml-100k \
      --workdir=runs/ablate_hstu_time --results_dir=results/ablations/hstu_time

The time bias needs real timestamps: ML-100K's (Unix seconds), or
``ml-1m-raw`` with GroupLens' ``ratings.dat``; the ML-1M text files have none.
2 points x 3 seeds = 6 runs of about 5 minutes each on 2 CPU cores.
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-100k") -> ml_collections.ConfigDict:
  """The ablation on ``dataset`` (ml-100k | ml-1m-raw | csv: sources with timestamps)."""
  if dataset in ("ml-1m", "ml-1m-chrono", "synthetic"):
    raise ValueError(f"hstu_time.py:{dataset}: this source has no timestamps; use ml-100k, "
                     "ml-1m-raw or csv.")
  config = ml_collections.ConfigDict()
  config.base = f"experiments/configs/hstu.py:{dataset}"  # experiment every point starts from
  # Fixed for every point, winning over point values (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 60  # budget; validation NDCG@10 peaks near epoch 50
  config.overrides.train.eval_every_epochs = 5  # validation picks the reported checkpoint
  config.overrides.train.patience = 4  # early stop after 20 epochs without a gain
  config.axes = (  # the grid: (dotted config key, values)
      ("model.time_buckets", (0, 128)),  # 0 = no time bias; 128 = the official buckets
  )
  config.points = ()  # explicit points instead of a grid (unused here)
  config.seeds = (0, 1, 2)  # every point once per seed; tables give mean ± std
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.budget_columns = True  # table also shows epochs, best epoch and training minutes
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "HSTU: relative time bias"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
