r"""A 2 x 2 SASRec grid on tiny synthetic data, for tests and a quick demo.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/tiny_grid.py \
      --workdir=/tmp/ablate_tiny --config.overrides.train.num_epochs=1

4 points x 2 seeds = 8 runs of a few seconds each.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The tiny grid (tiny.py's synthetic data; no dataset argument)."""
  config = ml_collections.ConfigDict()
  config.base = "experiments/configs/tiny.py:sasrec"  # experiment every point starts from
  # Fixed for every point, winning over point values (None = keep the base's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = 2  # tiny.py's budget; 1 for the fastest smoke test
  config.axes = (  # the grid, varied in this order: (dotted config key, values)
      ("model.attention", ("dot_product", "additive")),  # scaled dot-product vs additive
      ("model.num_blocks", (1, 2)),  # stacked self-attention blocks
  )
  config.points = ()  # explicit points instead of a grid (unused here)
  config.seeds = (0, 1)  # every point once per seed; tables give mean ± std
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "Tiny SASRec grid"  # table title
  config.caption.dataset = "tiny synthetic (tiny.py)"  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
