r"""A tiny search space for tests and a quick demo (tiny.py's SASRec).

  python -m experiments.search --config=experiments/configs/tiny.py:sasrec \
      --space=experiments/configs/ablations/search_tiny.py \
      --workdir=/tmp/search_tiny --trials=4

Each trial trains a few seconds; the best config is then trained with 3 seeds.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The space: learning rate (log range), depth (ints), attention (choices)."""
  config = ml_collections.ConfigDict()
  config.space = (  # (dotted config key, {low, high[, log, step]} or {choices})
      ("train.learning_rate", {"low": 1e-3, "high": 3e-2, "log": True}),
      ("model.num_blocks", {"low": 1, "high": 2}),  # ints: an int range
      ("model.attention", {"choices": ("dot_product", "additive")}),
  )
  config.metric = "ndcg@10"  # validation metric, maximized (test is never read)
  # Fixed for every trial and the final runs (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 2  # the per-trial budget
  config.overrides.train.eval_every_epochs = 1  # each evaluation can prune
  config.trial_seed = 0  # config.seed of every trial
  config.sampler_seed = 0  # TPE's seed
  config.startup_trials = 2  # random trials before TPE models the space
  config.pruner = ml_collections.ConfigDict()
  config.pruner.name = "median"  # median | none
  config.pruner.n_startup_trials = 2  # trials that are never pruned
  config.pruner.n_warmup_steps = 0  # steps before pruning starts
  config.final_seeds = (0, 1, 2)  # the best config is retrained with these
  config.final_metrics = ("hr@10", "ndcg@10", "mrr@10")  # final table columns (test split)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "Tiny SASRec search"  # table title
  config.caption.dataset = "tiny synthetic (tiny.py)"  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
