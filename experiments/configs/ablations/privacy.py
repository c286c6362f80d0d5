r"""Ablation: user-level DP-SGD budget for SASRec with the full softmax.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/privacy.py:ml-100k \
      --workdir=/tmp/ablate_privacy

epsilon in {1, 2, 4, 8} (the noise multiplier calibrated to each for the
planned steps, delta 1e-6), epsilon = inf (clipping and Poisson sampling, no
noise) and the non-private run, one seed. ML-100K: 943 users, batch 128, 25
epochs = 175 steps, 6 runs of about 3 minutes each on 2 loaded CPU cores.
ML-1M (``:ml-1m``): 6,040 users, batch 512 (q = 0.085, large batches suit
DP-SGD), 10 epochs = 118 steps at learning rate 3e-3, about 10 minutes per
private run. docs/privacy.md holds the tables.
"""

import ml_collections

from deeprec_jax.ablation import plan

_PRIVATE = {"privacy.enabled": True, "privacy.noise_multiplier": 0.0}

# Per dataset: (batch_size, num_epochs, eval_every_epochs, learning_rate), fixed
# before any run (not tuned): the epsilon of each point is for these steps.
_BUDGETS = {"ml-1m": (512, 10, 2, 3e-3)}
_DEFAULT_BUDGET = (128, 25, 5, 1e-3)  # ML-100K and the synthetic default


def get_config(dataset: str = "ml-100k") -> ml_collections.ConfigDict:
  """The ablation on ``dataset`` (synthetic | ml-100k | ml-1m)."""
  config = ml_collections.ConfigDict()
  config.base = f"experiments/configs/sasrec.py:{dataset}"  # experiment every point starts from
  # Fixed for every point, winning over point values (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.loss = "softmax"  # full-softmax cross-entropy
  config.overrides.train.num_negatives = 1  # unused by the full softmax: keep it cheap
  batch_size, num_epochs, eval_every, learning_rate = _BUDGETS.get(dataset, _DEFAULT_BUDGET)
  config.overrides.train.batch_size = batch_size  # expected users per step (Poisson)
  config.overrides.train.num_epochs = num_epochs  # epsilon is for these steps
  config.overrides.train.eval_every_epochs = eval_every  # validation picks the checkpoint
  config.overrides.train.learning_rate = learning_rate  # Adam peak rate, fixed a priori
  config.overrides.privacy = ml_collections.ConfigDict()
  config.overrides.privacy.microbatch_size = 32  # 2.3x faster than 0 on CPU (docs/privacy.md)
  config.axes = ()  # no grid: the points below
  config.points = (  # explicit points: a label plus dotted config keys
      *({"label": f"epsilon={eps:g}", **_PRIVATE, "privacy.target_epsilon": eps}
        for eps in (1.0, 2.0, 4.0, 8.0)),
      # Same clipping and sampling, no noise: what the noise alone costs.
      {"label": "epsilon=inf (clip, no noise)", **_PRIVATE, "privacy.target_epsilon": 0.0},
      {"label": "non-private", "privacy.enabled": False},
  )
  config.seeds = (0,)  # one seed: the sweep has to fit in ~1 hour on 2 cores
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "SASRec (full softmax): user-level DP-SGD budget"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
