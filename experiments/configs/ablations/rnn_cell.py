r"""Ablation: recurrent cell (peephole LSTM, LSTM, GRU) x stacked layers.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/rnn_cell.py:ml-100k \
      --workdir=/tmp/ablate_rnn_cell

3 x 2 = 6 points x 3 seeds = 18 runs of about 1-2 minutes each on 2 CPU cores.
"""

import ml_collections

from deeprec_jax.ablation import plan


def get_config(dataset: str = "ml-100k") -> ml_collections.ConfigDict:
  """The ablation on ``dataset`` (synthetic | ml-100k | ml-1m)."""
  config = ml_collections.ConfigDict()
  config.base = f"experiments/configs/rnn.py:{dataset}"  # experiment every point starts from
  # Fixed for every point, winning over point values (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 50  # ~350 steps: 1-2 min per run on 2 cores (to tune)
  config.overrides.train.eval_every_epochs = 5  # validation picks the reported checkpoint
  config.axes = (  # the grid, varied in this order: (dotted config key, values)
      ("model.cell", ("peephole_lstm", "lstm", "gru")),  # recurrent cell
      ("model.num_layers", (1, 2)),  # stacked recurrent layers
  )
  config.points = ()  # explicit points instead of a grid (unused here)
  config.seeds = (0, 1, 2)  # every point once per seed; tables give mean ± std
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "RNN: recurrent cell and depth"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
