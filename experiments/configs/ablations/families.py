r"""Model families on ML-1M: popularity, Caser, RNN, SASRec (two attentions), BERT4Rec.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/families.py:ml-1m \
      --workdir=/tmp/ablate_families

6 points x 1 seed. Each family keeps its own training budget (the points'
train.num_epochs: the paper-scale runs take hours each on CPU);
--config.overrides.train.num_epochs=N gives every family the same N epochs
instead (N=1 for a smoke test of the whole table), and
--config.overrides.train.eval_every_epochs=E the same validation interval.
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-1m") -> ml_collections.ConfigDict:
  """The comparison on ``dataset`` (synthetic | ml-100k | ml-1m)."""
  configs = "experiments/configs"
  config = ml_collections.ConfigDict()
  config.base = f"{configs}/sasrec.py:{dataset}"  # for points that name no base of their own
  # Fixed for every point, winning over point values (None = keep the point's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  # None: each family's budget below (SASRec's 200 epochs = ~9.6k steps on ML-1M).
  config.overrides.train.num_epochs = ml_collections.config_dict.placeholder(int)
  # None: each family's own validation interval below.
  config.overrides.train.eval_every_epochs = ml_collections.config_dict.placeholder(int)
  config.axes = ()  # no grid: the points below
  config.points = (  # explicit points: a label, an optional base config and dotted keys
      # No training: ranks items by their count in the training parts.
      {"label": "Popularity", "base": f"{configs}/popularity.py:{dataset}"},
      # One example per window: ~1.9k steps of 512 per ML-1M epoch already.
      # On ML-1M a fixed one pass (train.num_steps wins over any num_epochs
      # override), chosen when the window pipeline built ~4k examples/s; it
      # now builds ~80k/s, but the cap stays so that results/ablations/families
      # reproduces from this file.
      {"label": "Caser", "base": f"{configs}/caser.py:{dataset}", "train.num_epochs": 10,
       "train.eval_every_epochs": 2, "train.num_steps": 1900 if dataset == "ml-1m" else 0},
      {"label": "RNN (peephole LSTM)", "base": f"{configs}/rnn.py:{dataset}",
       "model.cell": "peephole_lstm", "train.num_epochs": 200, "train.eval_every_epochs": 10},
      # SASRec's paper setting (maxlen 200, 2 blocks, BCE with 1 negative, 200 epochs).
      {"label": "SASRec (dot-product)", "base": f"{configs}/sasrec.py:{dataset}",
       "model.attention": "dot_product", "train.num_epochs": 200, "train.eval_every_epochs": 10},
      {"label": "SASRec (additive)", "base": f"{configs}/sasrec.py:{dataset}",
       "model.attention": "additive", "train.num_epochs": 200, "train.eval_every_epochs": 10},
      # The cloze task learns from ~20% of positions per pass: twice SASRec's epochs.
      {"label": "BERT4Rec", "base": f"{configs}/bert4rec.py:{dataset}",
       "train.num_epochs": 400, "train.eval_every_epochs": 20},
  )
  config.seeds = (0,)  # one seed: the families differ by far more than seed noise
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "Sequential recommender families"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
