r"""The published ML-1M rows, reproduced side by side (full ranking, seen items excluded).

  python -m experiments.ablate \
      --config=experiments/configs/ablations/leaderboard.py:ml-1m \
      --workdir=runs/leaderboard_ml1m          # 3,416 items (SASRec layout)
  python -m experiments.ablate \
      --config=experiments/configs/ablations/leaderboard.py:ml-1m-chrono \
      --workdir=runs/leaderboard_ml1m_chrono   # 3,706 items (HSTU layout)

Each label carries the published NDCG@10 of its row, and its ``published``
text the value and source (a table column; ../shared/anchors.md lists the
settings). Every row validates every 2 epochs and stops
after 5 evaluations without a better validation NDCG@10 (10 epochs, the
SASRec+ code's patience; BERT4Rec: 10, its 20 epochs), as the papers
early-stop; the epoch budget is the row's ``train.num_epochs``. These
are hours of CPU per row: --config.overrides.train.num_epochs=1 is a smoke
test of the whole table. The HSTU rows need ``experiments/configs/hstu.py``.
"""

import ml_collections

from deeprec_jax.ablation import plan

_CONFIGS = "experiments/configs"


# Klenitskiy & Vasilev's SASRec settings (antklen/sasrec-bert4rec-recsys23, SASRec.yaml):
# d 64, dropout 0.1, weights ~ normal(0, 0.02), Adam 1e-3, batch 128, maxlen 200,
# at most 100 epochs, early stop after 10 epochs without a validation gain.
_SASREC_PLUS = {"model.dim": 64, "model.dropout_rate": 0.1, "model.init_std": 0.02,
                "train.num_epochs": 100}
# Early stop after 5 evaluations (10 epochs) without a validation gain, the
# SASRec+ code's patience.
_PATIENCE = {"train.patience": 5}
# Sources of the published values (NDCG@10; ../shared/anchors.md).
_KV = "Klenitskiy & Vasilev, RecSys 2023"
_ZHAI = "Zhai et al., ICML 2024"


def _rows_3416(dataset: str) -> tuple[dict, ...]:
  sasrec = f"{_CONFIGS}/sasrec.py:{dataset}"
  # Most informative rows first: a sweep interrupted part-way has them.
  return (
      # Klenitskiy & Vasilev, RecSys 2023: SASRec+ with full cross-entropy, d 64.
      {"label": "SASRec+, full CE, d 64 (0.1821)", "published": f"0.1821, {_KV}",
       "base": sasrec, "train.loss": "softmax", "seeds": (0, 1, 2),
       **_SASREC_PLUS, **_PATIENCE},
      # Same paper (and Kang & McAuley 2018's loss): BCE with 1 negative per position.
      {"label": "SASRec, BCE, 1 negative, d 64 (0.1341)", "published": f"0.1341, {_KV}",
       "base": sasrec, "train.loss": "bce",
       **_SASREC_PLUS, **_PATIENCE},
      # The same row as the SASRec+ code builds it: right padding, so positions
      # count from each sequence's oldest item, and nn.MultiheadAttention's
      # Xavier Q/K/V kernels, which its normal(0, 0.02) init leaves alone.
      {"label": "SASRec+, full CE, d 64, its positions and Q/K/V init (0.1821)",
       "published": f"0.1821, {_KV}",
       "base": sasrec, "train.loss": "softmax", "model.positions_from": "start",
       "model.qkv_init": "torch_mha", **_SASREC_PLUS, **_PATIENCE},
      # Klenitskiy & Vasilev 2023 (RNN.yaml): one GRU layer, d 64, full CE. Its
      # dropout 0.1 is torch.nn.GRU's, which acts only between layers: with
      # one layer, none (ours would also drop the embeddings).
      {"label": "GRU4Rec-style GRU", "base": f"{_CONFIGS}/rnn.py:{dataset}",
       "model.cell": "gru", "model.dropout_rate": 0.0, "train.loss": "softmax",
       "train.num_epochs": 100, **_PATIENCE},
      # Three seeds: about 8 minutes each.
      {"label": "Caser", "base": f"{_CONFIGS}/caser.py:{dataset}", "train.num_epochs": 10,
       "seeds": (0, 1, 2), **_PATIENCE},
      # Same paper: CE over 3,000 uniformly sampled negatives, one set per
      # sequence shared by its positions, as their code draws them.
      {"label": "SASRec+, CE over 3,000 negatives (0.1857)", "published": f"0.1857, {_KV}",
       "base": sasrec,
       "train.loss": "sampled_softmax", "train.num_negatives": 3000,
       "train.shared_negatives": True, **_SASREC_PLUS, **_PATIENCE},
      # Klenitskiy & Vasilev 2023 (BERT4Rec.yaml): Hugging Face's BertModel
      # (post-LN blocks), d 64, 2 heads, FFN 256, mask 0.2, at most 200 epochs,
      # and a patience of 20 epochs, not 10: BERT4Rec stays at the popularity
      # level for its first ~12 epochs here.
      {"label": "BERT4Rec (0.1537)", "published": f"0.1537, {_KV}",
       "base": f"{_CONFIGS}/bert4rec.py:{dataset}",
       "model.block": "post_ln", "model.ffn_dim": 256, "train.num_epochs": 200,
       "train.patience": 10},
      # Petrov & Macdonald, RecSys 2023 (gSASRec-pytorch, config_ml1m.py): gBCE
      # with 256 negatives per position, t = 0.75, d 128, 2 blocks, no dropout,
      # and an output item table of its own. Their budget (~86k steps) is far
      # beyond this one. With train.bce_log_k_offset (the default; their code
      # has none): without it the row sat at the popularity level
      # (docs/results.md, "Many-negative BCE").
      {"label": "gSASRec, gBCE 256 negatives (0.1726)",
       "published": "0.1726, Petrov & Macdonald, RecSys 2023", "base": sasrec, "train.loss": "gbce",
       "train.num_negatives": 256, "train.gbce_t": 0.75, "model.dim": 128,
       "model.dropout_rate": 0.0, "model.output_table": True, "train.num_epochs": 200,
       **_PATIENCE},
  )


def _rows_3706(dataset: str) -> tuple[dict, ...]:
  hstu = f"{_CONFIGS}/hstu.py:{dataset}"
  return (
      # generative-recommenders: SASRec, 128 sampled-softmax negatives over
      # cosine scores, temperature 0.05.
      {"label": "SASRec, 128 negatives, tau 0.05 (0.1603)",
       "published": "0.1603, generative-recommenders README",
       "base": f"{_CONFIGS}/sasrec.py:{dataset}", "train.loss": "sampled_softmax",
       "train.num_negatives": 128, "train.temperature": 0.05, "model.l2_norm": True,
       "train.num_epochs": 101, **_PATIENCE},
      # Zhai et al., ICML 2024: HSTU (2 blocks, 1 head, d_qk = d_v = 50).
      {"label": "HSTU (0.1720)", "published": f"0.1720, {_ZHAI}", "base": hstu,
       "train.num_epochs": 101, **_PATIENCE},
      # HSTU-large: 8 blocks, 2 heads, d_qk = d_v = 25.
      {"label": "HSTU-large (0.1893)", "published": f"0.1893, {_ZHAI}", "base": hstu,
       "model.num_blocks": 8, "model.num_heads": 2, "model.qk_dim": 25, "model.v_dim": 25,
       "train.num_epochs": 101, **_PATIENCE},
  )


def get_config(dataset: str = "ml-1m") -> ml_collections.ConfigDict:
  """The leaderboard on ``dataset``: ml-1m (3,416 items) or ml-1m-chrono (3,706)."""
  if dataset not in ("ml-1m", "ml-1m-chrono"):
    raise ValueError(f"leaderboard.py:{dataset}: expected ml-1m or ml-1m-chrono, the layouts "
                     "of the published rows.")
  config = ml_collections.ConfigDict()
  config.base = f"{_CONFIGS}/sasrec.py:{dataset}"  # for points that name no base of their own
  # Fixed for every point, winning over point values (None = keep the point's).
  config.overrides = ml_collections.ConfigDict()
  config.overrides.train = ml_collections.ConfigDict()
  config.overrides.train.num_epochs = ml_collections.config_dict.placeholder(int)  # row budgets
  config.overrides.train.eval_every_epochs = 2  # validation interval of every row
  config.axes = ()  # no grid: the published rows below
  config.points = _rows_3416(dataset) if dataset == "ml-1m" else _rows_3706(dataset)
  config.seeds = (0,)  # one seed per row at these budgets; a row's "seeds" where time allows
  config.metrics = ("hr@10", "ndcg@10", "mrr@10")  # table columns; K must be in eval.ks
  config.split = "test"  # reported split (valid picks the best checkpoint)
  config.budget_columns = True  # table also shows each row's best epoch and training minutes
  config.caption = ml_collections.ConfigDict()
  config.caption.title = "Published ML-1M rows, reproduced"  # table title
  config.caption.dataset = plan.DATASET_NAMES.get(dataset, dataset)  # named in the caption
  config.caption.protocol = "full ranking, history excluded, leave-one-out"  # evaluation protocol
  return config
