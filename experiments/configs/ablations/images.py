r"""Ablation: item encoders (id | image | id+image) on warm and cold targets, with CTR.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/images.py \
      --workdir=/tmp/ablate_images

The embedded synthetic default with its procedural pictures (2,000 users, 500
items in 20 clusters, 32 x 32 RGB; every picture drawn from its cluster's
shape and colour plus per-item noise), 20 % of the items withheld from
training (``data.cold_start_fraction``): they appear only as validation and
test targets, so their id rows never train. Points: SASRec and the RNN
(peephole LSTM) with each item encoder, the CTR model (picture + history,
ranked over every item) and popularity, the floor an id model falls to on
cold targets. 10 points x 3 seeds; each image run trains the founding tower
(conv 32/64/128) on the pictures its batches name, several minutes on 2 CPU
cores (``--config.seeds='(0,)'`` for one seed; a rerun skips finished runs).
Read the ``test/cold/*`` and ``test/warm/*`` columns of results.csv.
"""

import ml_collections

from deeprec_jax.ablation import plan

_CONFIGS = "experiments/configs"
_ENCODERS = ("id", "image", "id+image")


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  """The ablation on ``dataset`` (only ``synthetic`` has pictures without a folder)."""
  config = ml_collections.ConfigDict()
  config.base = f"{_CONFIGS}/sasrec.py:{dataset}"  # for points that name no base
  # Fixed for every point, winning over point values.
  config.overrides = ml_collections.ConfigDict()
  config.overrides.data = ml_collections.ConfigDict()
  config.overrides.data.cold_start_fraction = 0.2  # items withheld from training
  config.overrides.train = ml_collections.ConfigDict()
  # None: each point's own budget (--config.overrides.train.num_steps=2 for a smoke test).
  config.overrides.train.num_steps = ml_collections.config_dict.placeholder(int)
  config.axes = ()  # no grid: the points below
  config.points = (
      {"label": "Popularity", "base": f"{_CONFIGS}/popularity.py:{dataset}"},
      *({"label": f"SASRec ({encoder})", "base": f"{_CONFIGS}/sasrec.py:{dataset}",
         "model.item_encoder": encoder} for encoder in _ENCODERS),
      *({"label": f"RNN ({encoder})", "base": f"{_CONFIGS}/rnn.py:{dataset}",
         "model.item_encoder": encoder} for encoder in _ENCODERS),
      # id+image where each step drops half of the id rows (model.id_dropout), so that the
      # pictures must carry items alone too; added after the first seed's id+image runs
      # left cold targets at 0 (the table reports both).
      *({"label": f"{name} (id+image, id dropout 0.5)", "base": f"{_CONFIGS}/{base}.py:{dataset}",
         "model.item_encoder": "id+image", "model.id_dropout": 0.5}
        for name, base in (("SASRec", "sasrec"), ("RNN", "rnn"))),
      # Picture + mean of the history's id vectors -> click logit; ranked over every item.
      # 600 Adam steps of 256 pairs (the tower runs on every pair's picture): ~7 min here.
      {"label": "CTR (image)", "base": f"{_CONFIGS}/ctr.py:{dataset}", "train.num_steps": 600},
  )
  config.seeds = (0, 1, 2)  # three seeds: mean +- std per point
  # Table columns (K must be in eval.ks); every run also has test/cold/* and test/warm/*.
  config.metrics = ("cold/ndcg@10", "cold/hr@10", "warm/ndcg@10", "warm/hr@10", "ndcg@10")
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "Item encoders on warm and cold targets"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = ("full ranking, history excluded, leave-one-out; 20% of items "
                             "withheld from training (cold)")  # evaluation protocol
  return config
