r"""'Our best' SASRec on ML-1M (3,416 items): a validation-only search around SASRec+.

  python -m experiments.search --config=experiments/configs/sasrec.py:ml-1m \
      --space=experiments/configs/ablations/search_ml1m_best.py \
      --workdir=runs/search_ml1m_best --trials=16

Every trial starts from the SASRec+ row of the leaderboard (full softmax
cross-entropy, weights ~ normal(0, 0.02)) and varies what the issue allows to
tune: width, depth, heads, dropout, learning rate, label smoothing, the
block arrangement, which end positions count from and the Q/K/V init.
Trials are ranked on validation NDCG@10 only; the best is retrained with 3
seeds and its test number reported once. Each trial is up
to 100 epochs (~40 min on 2 CPU cores), so the search spans sessions: a
rerun of the command resumes the study.
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-1m") -> ml_collections.ConfigDict:
  """The space, with the caption naming ``dataset``."""
  config = ml_collections.ConfigDict()
  config.space = (  # (dotted config key, {low, high[, log, step]} or {choices})
      ("model.dim", {"choices": (64, 128, 256)}),
      ("model.num_blocks", {"low": 2, "high": 3}),
      ("model.num_heads", {"choices": (1, 2)}),
      ("model.dropout_rate", {"low": 0.1, "high": 0.5}),
      ("model.block", {"choices": ("sasrec", "pre_ln")}),
      ("model.positions_from", {"choices": ("end", "start")}),
      ("model.qkv_init", {"choices": ("same", "torch_mha")}),
      ("train.learning_rate", {"low": 3e-4, "high": 3e-3, "log": True}),
      ("train.label_smoothing", {"low": 0.0, "high": 0.3}),
  )
  config.metric = "ndcg@10"  # validation metric, maximized (test is never read)
  config.overrides = ml_collections.ConfigDict()
  config.overrides.model = ml_collections.ConfigDict()
  config.overrides.model.init_std = 0.02  # SASRec+'s initialization
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.loss = "softmax"  # full cross-entropy, the strongest published loss
  config.overrides.train.num_epochs = 100  # the per-trial budget (SASRec+'s)
  config.overrides.train.eval_every_epochs = 4  # each evaluation can prune
  config.overrides.train.patience = 3  # early stop: 12 epochs without a validation gain
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
  config.caption.title = "Our best SASRec on ML-1M (searched on validation)"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
