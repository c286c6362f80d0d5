"""Default experiment: SASRec on the embedded synthetic data.

Every other config starts from ``get_config()`` here and changes a few
fields, so that each key is documented in exactly one place.

Usage: ``--config=experiments/configs/default.py[:<dataset>]`` where
``<dataset>`` is one of ``synthetic`` (default), ``ml-100k``, ``ml-1m`` (3,416
items, SASRec layout), ``ml-1m-chrono`` (3,706 items), ``ml-1m-raw``,
``sasrec_text`` or ``csv``; see ``data_config``.
"""

import os

import ml_collections

# MovieLens is never committed: $DEEPREC_SHARED_DATA, else ../shared/data beside
# the checkout (found from this file, so that any working directory works).
SHARED_DATA = os.environ.get("DEEPREC_SHARED_DATA") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data"))
# Raw-data defaults per dataset; ``path`` may be a folder or the GroupLens zip.
DATASETS = {
    "synthetic": dict(name="synthetic", path=""),
    "ml-100k": dict(name="ml-100k", path=os.path.join(SHARED_DATA, "ml-100k")),
    "ml-1m": dict(name="sasrec_text",
                  path=os.path.join(SHARED_DATA, "ml-1m", "ml-1m_sasrec_order.txt")),
    # All 3,706 movies, chronological (the HSTU / generative-recommenders item set).
    "ml-1m-chrono": dict(name="sasrec_text",
                         path=os.path.join(SHARED_DATA, "ml-1m", "ml-1m_chrono_all.txt")),
    "ml-1m-raw": dict(name="ml-1m", path=os.path.join(SHARED_DATA, "ml-1m")),
    "sasrec_text": dict(name="sasrec_text", path=""),
    "csv": dict(name="csv", path=""),
}


def data_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  """The ``config.data`` block for one dataset."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r} in --config=...:<dataset>; expected one of "
                     f"{', '.join(DATASETS)}.")
  data = ml_collections.ConfigDict()
  data.name = DATASETS[dataset]["name"]  # synthetic | ml-100k | ml-1m | sasrec_text | csv
  data.path = DATASETS[dataset]["path"]  # raw file, folder or zip ('' for synthetic)
  data.data_dir = ""  # TFDS cache of prepared datasets; '' = ~/.cache/deeprec_jax/tfds
  data.max_len = 50  # model input length: most recent items kept per example
  data.rating_threshold = 0.0  # implicit feedback: keep ratings >= this (0 = keep all)
  data.min_user_interactions = 5  # k-core: users need at least this many items
  data.min_item_interactions = 0  # k-core: items need at least this many users
  data.max_history = 0  # keep only each user's most recent N items (0 = all)
  data.keep_short_users = False  # users with < 3 items train only (never evaluated), as in SASRec
  data.cold_start_fraction = 0.0  # items (by seed) withheld from training, seen only as targets
  # Item pictures (data/images.py; only read when model.item_encoder != 'id').
  data.images = ml_collections.ConfigDict()
  # synthetic | files | features (precomputed, projected by the model) | ''
  data.images.source = "synthetic" if dataset == "synthetic" else ""
  # files: folder of <item id>.png/.jpg..., or CSV manifest item_id,path;
  # features: .npz of features [M, F] and item_ids [M], or .npy of features.
  data.images.path = ""
  data.images.item_ids = ""  # features from an .npy: text file of its rows' item ids
  data.images.size = 32  # pictures are S x S RGB (resized when read from files)
  # Synthetic generator (only read when name == 'synthetic').
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.num_users = 2000  # users, each one Markov walk
  data.synthetic.num_items = 500  # catalogue size
  data.synthetic.num_clusters = 20  # latent item clusters the chain moves between
  data.synthetic.mean_length = 30  # average interactions per user
  data.synthetic.seed = 0  # generator seed (part of the cached dataset's identity)
  # Generic CSV/TSV logs (only read when name == 'csv').
  data.csv = ml_collections.ConfigDict()
  data.csv.delimiter = ","  # field separator, e.g. ',' or '\t'
  data.csv.user_column = "user_id"  # header name of the user column
  data.csv.item_column = "item_id"  # header name of the item column
  data.csv.time_column = "timestamp"  # header name of the timestamp column ('' = file order)
  data.csv.rating_column = ""  # header name of the rating column ('' = none)
  if dataset in ("ml-1m", "ml-1m-chrono", "sasrec_text"):
    data.min_user_interactions = 0  # SASRec-layout files are already filtered
    data.keep_short_users = True  # the SASRec code keeps them for training
  if dataset in ("ml-1m", "ml-1m-chrono"):
    data.max_len = 200  # SASRec paper setting for ML-1M
  return data


def model_config() -> ml_collections.ConfigDict:
  """The ``config.model`` block of the default model, SASRec (fields of sasrec.Model)."""
  model = ml_collections.ConfigDict()
  model.name = "sasrec"  # a key of deeprec_jax.models.MODELS
  model.dim = 50  # embedding and hidden width
  model.num_blocks = 2  # self-attention blocks
  model.num_heads = 1  # attention heads (each additive head has its own b, v)
  model.dropout_rate = 0.2  # dropout on embeddings, attention and FFN
  model.init_std = 0.0  # 0 = the model's initializer (SASRec: Xavier); > 0 = normal(0, init_std)
  model.ffn_dim = 0  # FFN inner width (0 = dim, as SASRec; BERT uses 4 * dim)
  model.l2_norm = False  # unit states and item vectors: cosine scores (generative-recommenders)
  model.output_table = False  # score against a separate output item table (gSASRec)
  model.block = "sasrec"  # sasrec (LN on the query, normalized residuals) | pre_ln | post_ln
  model.positions_from = "end"  # positional row 0 at: end (SASRec code) | start (SASRec+ code)
  model.qkv_init = "same"  # Q/K/V kernels: same as the others | torch_mha (SASRec+ code)
  model.attention = "dot_product"  # dot_product | additive
  model.attention_impl = "xla"  # xla | pallas (models/pallas_attention.py; no attention dropout)
  model.positional = True  # learned positional embedding on/off
  model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
  return model


def add_item_encoder(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the item-encoder fields (models/image_cnn.py; all but popularity) to ``model``."""
  model.item_encoder = "id"  # item vectors: id (table) | image (CNN of data.images) | id+image
  model.image_channels = (32, 64, 128)  # image tower: conv + ReLU + max-pool channels
  model.image_kernel = 3  # image tower: square conv kernel side
  model.image_pool = 2  # image tower: max-pool window (and stride)
  model.image_dense = 128  # image tower: hidden dense width before the dim-wide output
  model.id_dropout = 0.0  # id+image training: drop each id row with this probability per step
  return model


def get_config(dataset: str = "synthetic") -> ml_collections.ConfigDict:
  """Returns the default config (SASRec) for ``dataset``."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # one seed for init, dropout, negatives and data order
  config.data = data_config(dataset)
  config.model = add_item_encoder(model_config())

  # Settings of the training task the model's spec names (models.MODELS).
  config.task = ml_collections.ConfigDict()
  config.task.mask_prob = 0.2  # masked task (BERT4Rec): fraction of items replaced by [mask]
  config.task.num_targets = 1  # window task (Caser): next items predicted per window

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # global batch (split across devices)
  config.train.pack = True  # pack several users into one row where the model allows (SASRec)
  config.train.num_epochs = 20  # epochs over the users (or windows)
  config.train.num_steps = 0  # if > 0, overrides num_epochs
  config.train.loss = "bce"  # bce | gbce | sampled_softmax | softmax
  config.train.num_negatives = 1  # sampled negatives per target (bce, gbce, sampled_softmax)
  # True: one set of num_negatives per sequence, shared by its positions (the
  # SASRec+ code's 3,000); rows are then never packed.
  config.train.shared_negatives = False
  # uniform | popularity (in proportion to training counts) | in_batch (from
  # the batch's own items); with either of the last two, sampled_softmax
  # subtracts log q (the item's training share) from every logit: logQ.
  config.train.negative_sampling = "uniform"
  config.train.temperature = 1.0  # logits are divided by it in the loss (1 = none)
  config.train.gbce_t = 0.75  # gbce: calibration t in [0, 1] (0 = plain bce)
  # bce/gbce: every logit minus log k, where k negatives put the best scores
  # (no-op at k = 1); False = the published code's form, slow to leave
  # popularity at large k (docs/results.md).
  config.train.bce_log_k_offset = True
  config.train.label_smoothing = 0.0  # softmax losses: e of the target on the rest, in [0, 1)
  config.train.optimizer = "adam"  # adam | adamw
  config.train.learning_rate = 1e-3  # peak learning rate
  config.train.adam_b2 = 0.999  # Adam's second-moment decay (generative-recommenders: 0.98)
  config.train.schedule = "constant"  # constant | cosine (after warmup)
  config.train.warmup_steps = 0  # linear warmup from 0
  config.train.grad_clip_norm = 0.0  # global-norm clipping (0 = off)
  config.train.weight_decay = 0.0  # decoupled (adamw) or L2 (adam) weight decay
  config.train.decay_embeddings = False  # apply weight decay to embeddings too
  # How the item table is updated: dense (the optimizer above, every row every
  # step) | lazy_adam | rowwise_adagrad (only the rows a batch touches;
  # deeprec_jax/row_sparse.py).
  config.train.item_optimizer = "dense"
  config.train.item_learning_rate = 0.0  # item table's peak rate, row-sparse only (0 = same)
  config.train.log_every_steps = 50  # training loss to metrics.jsonl and TensorBoard
  config.train.eval_every_epochs = 5  # validate and checkpoint every N epochs (and at the end)
  config.train.keep_checkpoints = 2  # latest checkpoints kept besides the best
  config.train.best_metric = "ndcg@10"  # validation metric for best checkpoint / early stop
  config.train.patience = 0  # stop after N evals without improvement (0 = never)
  config.train.divergence_factor = 100.0  # stop at a logged loss > this x earlier median (0 = off)
  config.train.num_devices = 0  # devices in the data-parallel mesh (0 = all)
  config.train.model_parallel = 1  # devices on the 'model' mesh axis (item-table rows split)

  # User-level DP-SGD (deeprec_jax/privacy.py, docs/privacy.md): one example = one user.
  config.privacy = ml_collections.ConfigDict()
  config.privacy.enabled = False  # DP-SGD on/off (rows unpacked; window models are refused)
  config.privacy.l2_clip_norm = 1.0  # C: each user's gradient clipped to this L2 norm
  config.privacy.noise_multiplier = 0.0  # sigma: noise std sigma * C (0 = calibrate to target)
  config.privacy.target_epsilon = 0.0  # epsilon budget: calibrates sigma, stops past it (0 = none)
  config.privacy.delta = 1e-6  # delta; must be well below 1/num_users (>= 1/num_users raises)
  config.privacy.accountant = "pld"  # pld | rdp (dp-accounting)
  config.privacy.sampling = "poisson"  # poisson | shuffle (fixed batches, accounted as Poisson)
  config.privacy.microbatch_size = 0  # per-example gradients this many at a time (0 = all)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256  # users per evaluation batch
  config.eval.ks = (1, 5, 10, 20)  # cut-offs for HR/NDCG/MRR@K
  config.eval.exclude_history = True  # never rank items the user already has
  config.eval.num_sampled_negatives = 100  # sampled metrics: negatives per user (0 = off)
  config.eval.sampling = "uniform"  # uniform | popularity negatives for sampled metrics
  config.eval.length_buckets = 4  # input lengths L, L/2, L/4, ... users are grouped by (1 = all L)
  if dataset == "synthetic":
    # The small synthetic set converges within the ~1 minute budget only at a
    # higher rate (NDCG@10 0.18 at 1e-3 vs 0.29 at 3e-3 after 300 steps).
    config.train.learning_rate = 3e-3
  return config
