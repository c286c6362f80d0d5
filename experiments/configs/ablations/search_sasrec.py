r"""SASRec search space on MovieLens (learning rate, dropout, depth, width).

  python -m experiments.search --config=experiments/configs/sasrec.py:ml-100k \
      --space=experiments/configs/ablations/search_sasrec.py \
      --workdir=/tmp/search_sasrec --trials=12

Each trial trains at most 30 epochs on ML-100K (~1 min on 2 CPU cores),
evaluating every 5 epochs so that the median pruner can stop bad trials.
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-100k") -> ml_collections.ConfigDict:
  """The space, with the caption naming ``dataset``."""
  config = ml_collections.ConfigDict()
  config.space = (  # (dotted config key, {low, high[, log, step]} or {choices})
      ("train.learning_rate", {"low": 3e-4, "high": 1e-2, "log": True}),
      ("model.dropout_rate", {"low": 0.0, "high": 0.5}),
      ("model.num_blocks", {"low": 1, "high": 3}),
      ("model.dim", {"choices": (32, 64)}),
  )
  config.metric = "ndcg@10"  # validation metric, maximized (test is never read)
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 30  # the per-trial budget
  config.overrides.train.eval_every_epochs = 5  # each evaluation can prune
  config.trial_seed = 0  # config.seed of every trial
  config.sampler_seed = 0  # TPE's seed
  config.startup_trials = 4  # random trials before TPE models the space
  config.pruner = ml_collections.ConfigDict()
  config.pruner.name = "median"  # median | none
  config.pruner.n_startup_trials = 3  # trials that are never pruned
  config.pruner.n_warmup_steps = 0  # steps before pruning starts
  config.final_seeds = (0, 1, 2)  # the best config is retrained with these
  config.final_metrics = ("hr@10", "ndcg@10", "mrr@10")  # final table columns (test split)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "SASRec search"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
