"""Kernel builders: the functions the benchmarks time, with example arguments.

Each ``*_kernels(quick)`` returns a list of ``harness.Kernel`` for one group of
``--only``. Everything calls the library (``deeprec_jax``) as training and
evaluation do; only the inputs are synthetic (``benchmarks.inputs``).

Model settings are the ML-1M configs of ``experiments/configs`` (the SASRec
paper setting: 3,416 items, 6,040 users, maxlen 200, d = 50, 2 blocks, 1 head,
batch 128, dropout 0.2, Adam, BCE with 1 negative; the analogous
``<model>.get_config('ml-1m')`` for the others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import harness, inputs
from deeprec_jax import evaluate, losses, metrics, models, optimizers, train
from deeprec_jax.data import packing
from deeprec_jax.models import encoder, layers, popularity, rnn, validation
from experiments.configs import bert4rec as bert4rec_config
from experiments.configs import caser as caser_config
from experiments.configs import popularity as popularity_config
from experiments.configs import rnn as rnn_config
from experiments.configs import sasrec as sasrec_config

Kernel = harness.Kernel

TRAINABLE_MODELS = ("sasrec", "bert4rec", "rnn", "caser")
EVAL_MODELS = ("sasrec", "bert4rec", "rnn", "caser", "popularity")
_CONFIGS = {"sasrec": sasrec_config, "bert4rec": bert4rec_config, "rnn": rnn_config,
            "caser": caser_config, "popularity": popularity_config}

# The two attention widths: (name, dim, heads, causal).
ATTENTION_WIDTHS = (("sasrec", 50, 1, True), ("bert4rec", 64, 2, False))
ATTENTION_LENGTHS = (50, 200, 512)
ATTENTION_BATCH = 128
RNN_LENGTHS = (50, 200)
RNN_DIM, RNN_BATCH = 64, 128
CATALOGUES = (10_000, 100_000, 1_000_000)
SCORING_BATCH, SCORING_HISTORY, TOP_K = 256, 50, 10
EVAL_BATCH = 256
# Width of ``exclude`` in eval batches: ML-1M histories run to 2,314 items but
# most batches' longest history is under 1,024.
EVAL_EXCLUDE_WIDTH = 1024


def ml1m_config(model: str) -> ml_collections.ConfigDict:
  """``experiments/configs/<model>.py:ml-1m`` (Caser keeps its L = 5 window)."""
  return _CONFIGS[model].get_config("ml-1m")


def _rng(seed: int) -> jax.Array:
  return jax.random.PRNGKey(seed)


def _grad_of_sum(apply: Callable[..., jax.Array], argnums: tuple[int, ...]) -> Callable:
  """``(*args) -> (value, grads)`` of ``sum(apply(*args) * c)`` for a fixed random ``c``.

  A random cotangent (rather than ``sum(out)``) keeps XLA from simplifying the
  backward pass of a reduction.
  """

  def fn(*args):
    def objective(*a):
      out = apply(*a)
      cotangent = jax.random.normal(jax.random.PRNGKey(7), out.shape, jnp.float32)
      return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.value_and_grad(objective, argnums=argnums)(*args)

  return fn


# ----------------------------------------------------------------------------
# Self-attention.
# ----------------------------------------------------------------------------


def attention_kernel(kind: str, width: str, dim: int, heads: int, causal: bool, seq_len: int,
                     backward: bool, batch: int | None = None,
                     dropout_rate: float = 0.0) -> Kernel:
  """One attention layer (``layers.DotProductAttention`` or ``AdditiveAttention``).

  Self-attention over ``x [batch, seq_len, dim]`` with the model's mask
  (causal for SASRec, bidirectional for BERT4Rec; padding keys masked).
  Dropout is off unless asked: this times the attention math itself.
  """
  batch = batch or ATTENTION_BATCH
  module_cls = layers.DotProductAttention if kind == "dot_product" else layers.AdditiveAttention
  # causal=True: the query blocks SASRec runs (layers.query_blocks).
  module = module_cls(num_heads=heads, dropout_rate=dropout_rate, causal=causal)
  rng = np.random.default_rng(0)
  lengths = np.minimum(rng.integers(seq_len // 4, seq_len + 1, size=batch), seq_len)
  valid = np.arange(seq_len)[None, :] >= (seq_len - lengths)[:, None]
  x = rng.normal(size=(batch, seq_len, dim)).astype(np.float32) * valid[..., None]
  mask = layers.attention_mask(jnp.asarray(valid), causal=causal)
  params = module.init(_rng(0), x[:1], x[:1], mask[:1])
  train = dropout_rate > 0
  dropout_key = _rng(1)

  def apply(p, x, mask):
    return module.apply(p, x, x, mask, deterministic=not train, rngs={"dropout": dropout_key})

  fn = _grad_of_sum(apply, (0, 1)) if backward else apply
  mode = "fwd+bwd" if backward else "fwd"
  return Kernel("attention", f"{kind}_{width}_L{seq_len}_{mode}", fn, (params, x, mask),
                items=batch,
                params={"attention": kind, "width": width, "dim": dim, "heads": heads,
                        "causal": causal, "seq_len": seq_len, "batch": batch, "mode": mode,
                        "dropout_rate": dropout_rate})


def attention_kernels(quick: bool) -> list[Kernel]:
  lengths = ATTENTION_LENGTHS[:1] if quick else ATTENTION_LENGTHS
  return [attention_kernel(kind, width, dim, heads, causal, seq_len, backward)
          for width, dim, heads, causal in ATTENTION_WIDTHS
          for kind in validation.ATTENTION_KINDS
          for seq_len in lengths
          for backward in (False, True)]


# ----------------------------------------------------------------------------
# Recurrent scan.
# ----------------------------------------------------------------------------


class _ScannedLayer(nn.Module):
  """One recurrent layer exactly as ``rnn.Model`` scans it (``rnn.MaskedStep``)."""

  cell: str
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    scanned = nn.scan(rnn.MaskedStep, variable_broadcast="params", split_rngs={"params": False},
                      in_axes=1, out_axes=1)
    carry = rnn.make_cell(self.cell, self.features, jnp.float32, parent=None).initialize_carry(
        jax.random.PRNGKey(0), x[:, 0].shape)
    _, y = scanned(self.cell, self.features, jnp.float32, name="layer_0")(carry, (x, mask))
    return y


def rnn_kernels(quick: bool) -> list[Kernel]:
  lengths = RNN_LENGTHS[:1] if quick else RNN_LENGTHS
  kernels = []
  for cell in rnn.CELLS:
    for seq_len in lengths:
      module = _ScannedLayer(cell, RNN_DIM)
      rng = np.random.default_rng(0)
      x = rng.normal(size=(RNN_BATCH, seq_len, RNN_DIM)).astype(np.float32)
      mask = np.arange(seq_len)[None, :] >= rng.integers(0, seq_len // 2, size=(RNN_BATCH, 1))
      params = module.init(_rng(0), x[:1], mask[:1])
      apply = lambda p, x, mask, module=module: module.apply(p, x, mask)
      for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        fn = _grad_of_sum(apply, (0, 1)) if backward else apply
        # XLA costs the scan body once; the matmul FLOPs of all L steps are
        # 2 * B * L * (D + H) * gates * H forward, about 3x that with backward.
        gates = 3 if cell == "gru" else 4
        matmul_flops = 2 * RNN_BATCH * seq_len * 2 * RNN_DIM * gates * RNN_DIM
        kernels.append(Kernel(
            "rnn", f"{cell}_L{seq_len}_{mode}", fn, (params, x, mask), items=RNN_BATCH,
            params={"cell": cell, "dim": RNN_DIM, "seq_len": seq_len, "batch": RNN_BATCH,
                    "mode": mode,
                    "analytic_matmul_gflop": round((3 if backward else 1) * matmul_flops / 1e9,
                                                   3)},
            note="XLA's FLOPs: one scan step only"))
  return kernels


# ----------------------------------------------------------------------------
# Caser.
# ----------------------------------------------------------------------------


def caser_kernels(quick: bool) -> list[Kernel]:
  """The Caser model (embeddings, horizontal + vertical convolutions, FC) at ML-1M."""
  del quick  # One size: the paper's L = 5.
  config = ml1m_config("caser")
  model = models.create_model(config.model, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS, max_len=config.data.max_len)
  batch = inputs.window_batch(batch=config.train.batch_size, window=config.data.max_len,
                              num_targets=config.task.num_targets, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS)
  params = model.init(_rng(0), batch["item_seq"][:1], user=batch["user"][:1])
  apply = lambda p, seq, user: model.apply(p, seq, user=user)
  kernels = []
  for backward in (False, True):
    mode = "fwd+bwd" if backward else "fwd"
    fn = _grad_of_sum(apply, (0,)) if backward else apply
    kernels.append(Kernel(
        "caser", f"caser_L{config.data.max_len}_{mode}", fn,
        (params, batch["item_seq"], batch["user"]), items=config.train.batch_size,
        params={"window": config.data.max_len, "dim": config.model.dim,
                "num_horizontal": config.model.num_horizontal,
                "num_vertical": config.model.num_vertical, "batch": config.train.batch_size,
                "mode": mode}))
  return kernels


# ----------------------------------------------------------------------------
# Catalogue scoring + top-K.
# ----------------------------------------------------------------------------


def scoring_kernel(num_items: int, dim: int = 50, batch: int = SCORING_BATCH) -> Kernel:
  """Gather a history's embeddings, score the whole catalogue, take the top K.

  ``hidden = mean(E[history])`` stands in for a model; then
  ``scores = hidden @ E.T`` (float32) and ``metrics.top_k_items`` with the
  history excluded: the serving path of ``recommend``.
  """
  rng = np.random.default_rng(0)
  table = (rng.normal(size=(num_items + 1, dim)) * 0.1).astype(np.float32)
  history = rng.integers(1, num_items + 1, size=(batch, SCORING_HISTORY)).astype(np.int32)

  def fn(table, history):
    hidden = jnp.mean(jnp.take(table, history, axis=0), axis=1)  # [B, D]
    scores = jnp.einsum("bd,nd->bn", hidden, table)  # [B, N + 1]
    return metrics.top_k_items(scores, history, TOP_K)

  return Kernel("scoring", f"score_top{TOP_K}_N{num_items:.0e}".replace("+0", ""), fn,
                (table, history), items=batch, unit="users/s",
                params={"num_items": num_items, "dim": dim, "batch": batch,
                        "history": SCORING_HISTORY, "k": TOP_K})


def scoring_kernels(quick: bool) -> list[Kernel]:
  return [scoring_kernel(n) for n in (CATALOGUES[:1] if quick else CATALOGUES)]


# ----------------------------------------------------------------------------
# Train steps.
# ----------------------------------------------------------------------------


def train_batch(model_name: str, config: ml_collections.ConfigDict, batch_size: int,
                seed: int = 0, row_multiple: int = 8) -> dict[str, np.ndarray]:
  """A synthetic training batch of the model's task, packed as the Trainer packs it.

  With ``config.train.pack`` and a packable model (SASRec, BERT4Rec) the rows are packed
  (``packing.pack_batch``) into the fewest rows that hold them, rounded up to
  a multiple of ``row_multiple`` (the Trainer's multiple of 8).
  """
  batch = _unpacked_train_batch(model_name, config, batch_size, seed)
  if config.train.pack and models.spec(model_name).packs:
    needed = packing.pack_layout(np.count_nonzero(batch["item_seq"], axis=1),
                                 config.data.max_len)[2]
    batch = packing.pack_batch(batch, -(-needed // row_multiple) * row_multiple)
  return batch


def _unpacked_train_batch(model_name: str, config: ml_collections.ConfigDict, batch_size: int,
                          seed: int) -> dict[str, np.ndarray]:
  task = models.spec(model_name).task
  common = dict(num_items=inputs.ML1M_ITEMS, num_users=inputs.ML1M_USERS, seed=seed,
                num_negatives=config.train.num_negatives)
  if task == "window":
    return inputs.window_batch(batch=batch_size, window=config.data.max_len,
                               num_targets=config.task.num_targets, **common)
  if task == "masked":
    return inputs.masked_batch(batch=batch_size, max_len=config.data.max_len,
                               mask_prob=config.task.mask_prob, **common)
  return inputs.autoregressive_batch(batch=batch_size, max_len=config.data.max_len, **common)


def dropout_rng_impl() -> str | None:
  """The PRNG the library's train step draws dropout masks with (None: jax's default)."""
  return getattr(train, "DROPOUT_RNG_IMPL", None)


def train_rng(seed: int = 1, impl: str | None = None) -> jax.Array:
  """``state['rng']`` as ``Trainer.init_state`` stores it.

  Raw key data of ``train.DROPOUT_RNG_IMPL`` where the library has that
  constant (the step wraps it back), else a ``jax.random.PRNGKey``.
  """
  impl = impl or dropout_rng_impl()
  if dropout_rng_impl() is not None:
    return jax.random.key_data(jax.random.key(seed, impl=impl))
  return jax.random.key(seed, impl=impl) if impl else jax.random.PRNGKey(seed)


def init_state(model: nn.Module, tx: Any, batch: dict[str, np.ndarray],
               rng: jax.Array | None = None) -> dict[str, Any]:
  """Parameters, optimizer state, step and dropout key, as ``Trainer.init_state``."""
  params = model.init(_rng(0), jnp.asarray(batch["item_seq"][:1]),
                      user=jnp.asarray(batch["user"][:1]))["params"]
  rng = train_rng() if rng is None else rng
  return dict(params=params, opt_state=tx.init(params), step=jnp.int32(0), rng=rng)


def train_step_kernel(model_name: str, *, config: ml_collections.ConfigDict | None = None,
                      batch_size: int | None = None, rng: jax.Array | None = None,
                      name: str | None = None, group: str = "train_step",
                      donate: bool = True, note: str = "") -> Kernel:
  """``train.make_train_step`` of ``model_name`` at its ML-1M config (or ``config``)."""
  config = config or ml1m_config(model_name)
  batch_size = batch_size or config.train.batch_size
  model = models.create_model(config.model, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS, max_len=config.data.max_len)
  tx = optimizers.create_optimizer(config.train, total_steps=10_000)
  step = train.make_train_step(model, tx, loss=config.train.loss, num_items=inputs.ML1M_ITEMS)
  batch = train_batch(model_name, config, batch_size)
  state = init_state(model, tx, batch, rng)
  return Kernel(group, name or f"{model_name}_ml1m", step, (state, batch), items=batch_size,
                carry=True, donate_argnums=(0,) if donate else (),
                params={"model": model_name, "batch": batch_size, "max_len": config.data.max_len,
                        "dim": config.model.get("dim", 1), "loss": config.train.loss,
                        "num_negatives": config.train.num_negatives,
                        "dropout_rate": config.model.get("dropout_rate", 0.0),
                        "dtype": config.model.get("dtype", "float32"),
                        "optimizer": config.train.optimizer,
                        "dropout_rng": dropout_rng_impl() or jax.config.jax_default_prng_impl},
                note=note)


def _variant_config(model_name: str, **model_fields: Any) -> ml_collections.ConfigDict:
  config = ml1m_config(model_name)
  config.model.update(model_fields)
  return config


def train_step_kernels(quick: bool) -> list[Kernel]:
  """Every family's ML-1M step, plus additive SASRec and the RNN's other two cells."""
  del quick  # The paper configuration is the size; --quick only repeats less.
  kernels = [train_step_kernel(name) for name in TRAINABLE_MODELS]
  kernels.insert(1, train_step_kernel(
      "sasrec", config=_variant_config("sasrec", attention="additive"),
      name="sasrec_additive_ml1m", note="additive attention (d_att = d), else sasrec_ml1m"))
  for cell in ("lstm", "gru"):
    kernels.append(train_step_kernel(
        "rnn", config=_variant_config("rnn", cell=cell), name=f"rnn_{cell}_ml1m",
        note=f"cell={cell}, else rnn_ml1m (peephole LSTM)"))
  return kernels


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def _eval_setup(model_name: str, batch_size: int):
  config = ml1m_config(model_name)
  model = models.create_model(config.model, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS, max_len=config.data.max_len)
  batch = inputs.eval_batch(batch=batch_size, max_len=config.data.max_len,
                            num_items=inputs.ML1M_ITEMS, num_users=inputs.ML1M_USERS,
                            exclude_width=EVAL_EXCLUDE_WIDTH,
                            num_sampled_negatives=config.eval.num_sampled_negatives,
                            masked=models.spec(model_name).task == "masked")
  if model_name == "popularity":
    counts = np.random.default_rng(0).integers(0, 1000, size=inputs.ML1M_ITEMS + 1)
    params = popularity.fit_params(counts)
  else:
    params = model.init(_rng(0), jnp.asarray(batch["item_seq"][:1]),
                        user=jnp.asarray(batch["user"][:1]))["params"]
  step = evaluate.make_eval_step(model, inputs.ML1M_ITEMS, tuple(config.eval.ks),
                                 exclude_history=config.eval.exclude_history)
  return config, step, params, batch


def eval_kernel(model_name: str, batch_size: int = EVAL_BATCH) -> Kernel:
  """One full-ranking ``evaluate.make_eval_step`` batch (scores all 3,416 items)."""
  config, step, params, batch = _eval_setup(model_name, batch_size)
  return Kernel("eval", f"{model_name}_eval_step_B{batch_size}", step, (params, batch),
                items=batch_size, unit="users/s",
                params={"model": model_name, "batch": batch_size,
                        "max_len": config.data.max_len, "num_items": inputs.ML1M_ITEMS,
                        "exclude_width": EVAL_EXCLUDE_WIDTH,
                        "sampled_negatives": config.eval.num_sampled_negatives})


def eval_kernels(quick: bool) -> list[Kernel]:
  return [eval_kernel(name) for name in (("sasrec",) if quick else EVAL_MODELS)]


def full_eval_pass(model_name: str, batch_size: int = EVAL_BATCH,
                   num_users: int = inputs.ML1M_USERS) -> dict[str, Any]:
  """What ``evaluate.evaluate`` needs to rank every ML-1M user once.

  Returns a dict with the jitted step, params and the device-resident batches
  (the last one padded with ``weight = 0`` rows, as the pipeline does).
  """
  config, step, params, batch = _eval_setup(model_name, batch_size)
  num_batches = -(-num_users // batch_size)
  batches = []
  for b in range(num_batches):
    rows = dict(batch)
    real = min(batch_size, num_users - b * batch_size)
    rows["weight"] = (np.arange(batch_size) < real).astype(np.float32)
    batches.append(jax.device_put(rows))
  return {"config": config, "step": jax.jit(step), "params": jax.device_put(params),
          "batches": batches, "num_users": num_users}


# ----------------------------------------------------------------------------
# SASRec train-step breakdown.
# ----------------------------------------------------------------------------


def _sasrec_parts(dropout_rate: float | None = None, num_blocks: int | None = None):
  config = ml1m_config("sasrec")
  if dropout_rate is not None:
    config.model.dropout_rate = dropout_rate
  if num_blocks is not None:
    config.model.num_blocks = num_blocks
  model = models.create_model(config.model, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS, max_len=config.data.max_len)
  tx = optimizers.create_optimizer(config.train, total_steps=10_000)
  batch = train_batch("sasrec", config, config.train.batch_size)
  state = init_state(model, tx, batch)
  return config, model, tx, batch, state


def _objective(model: nn.Module, config: ml_collections.ConfigDict, train_mode: bool = True):
  loss_fn = losses.loss_fn(config.train.loss)

  def objective(params, batch, rng):
    hidden = model.apply({"params": params}, batch["item_seq"], user=batch["user"],
                         deterministic=not train_mode, rngs={"dropout": rng},
                         **packing.packing_kwargs(batch))
    return loss_fn(hidden, models.item_table(params, inputs.ML1M_ITEMS), batch["targets"],
                   batch["negatives"])

  return objective


def breakdown_kernels(quick: bool) -> list[Kernel]:
  """Where the SASRec ML-1M train step spends its time (see benchmarks/README.md).

  ``quick`` leaves out the pieces that the others bracket (forward only, the
  block-less model, the whole block).
  """
  config, model, tx, batch, state = _sasrec_parts()
  b, seq_len, dim = config.train.batch_size, config.data.max_len, config.model.dim
  rate = config.model.dropout_rate
  params, rng = state["params"], _rng(2)
  objective = _objective(model, config)
  kernels = [
      train_step_kernel("sasrec", group="breakdown", name="full_train_step",
                        note="everything: fwd + bwd + Adam, dropout on"),
  ]
  no_dropout = ml1m_config("sasrec")
  no_dropout.model.dropout_rate = 0.0
  kernels.append(train_step_kernel("sasrec", config=no_dropout, group="breakdown",
                                   name="train_step_no_dropout",
                                   note="same step with dropout_rate = 0"))
  kernels.append(Kernel("breakdown", "forward_only", objective, (params, batch, rng), items=b,
                        params={"model": "sasrec", "batch": b, "max_len": seq_len},
                        note="loss, dropout on, no gradient"))
  kernels.append(Kernel("breakdown", "forward_backward", jax.value_and_grad(objective),
                        (params, batch, rng), items=b,
                        params={"model": "sasrec", "batch": b, "max_len": seq_len},
                        note="loss and gradients, no optimizer"))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

  def optimizer_update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  kernels.append(Kernel("breakdown", "optimizer_update", optimizer_update,
                        (params, state["opt_state"], grads), items=b,
                        params={"num_params": int(sum(x.size for x in jax.tree.leaves(params)))},
                        note="Adam update + apply_updates alone"))

  # Embedding + positions + dropout + final LN + BCE: the model without blocks.
  _, model0, _, _, state0 = _sasrec_parts(num_blocks=0)
  kernels.append(Kernel("breakdown", "embed_score_loss_fwd_bwd",
                        jax.value_and_grad(_objective(model0, config)),
                        (state0["params"], batch, rng), items=b,
                        params={"model": "sasrec", "num_blocks": 0},
                        note="SASRec with 0 blocks: embeddings, final LN, BCE (fwd+bwd)"))
  # The loss alone, given hidden states: gathers + scatter-add into the table.
  # The pieces below run on the step's (packed) rows; throughput stays per sequence.
  rows = batch["item_seq"].shape[0]
  hidden = np.random.default_rng(0).normal(size=(rows, seq_len, dim)).astype(np.float32)
  table = models.item_table(params, inputs.ML1M_ITEMS)
  bce = lambda h, t, targets, negatives: losses.bce_sampled(h, t, targets, negatives)
  kernels.append(Kernel("breakdown", "bce_loss_fwd_bwd",
                        jax.value_and_grad(bce, argnums=(0, 1)),
                        (hidden, table, batch["targets"], batch["negatives"]), items=b,
                        params={"batch": b, "max_len": seq_len},
                        note="sampled BCE: gather pos/neg rows, scatter-add their gradient"))

  x = hidden * (batch["item_seq"] > 0)[..., None]
  valid = batch["item_seq"] > 0
  segment_ids = batch.get("segment_ids")
  mask = layers.attention_mask(jnp.asarray(valid), causal=True,
                               segment_ids=None if segment_ids is None else jnp.asarray(
                                   segment_ids))
  attention = layers.DotProductAttention(num_heads=1, dropout_rate=rate, causal=True)
  attention_params = attention.init(_rng(0), x[:1], x[:1], mask[:1])
  attend = lambda p, x, mask, rng: attention.apply(p, x, x, mask, deterministic=False,
                                                    rngs={"dropout": rng})
  kernels.append(Kernel("breakdown", "attention_fwd_bwd_per_block",
                        _grad_of_sum(attend, (0, 1)), (attention_params, x, mask, rng), items=b,
                        params={"batch": b, "max_len": seq_len, "dropout_rate": rate},
                        note="one block's attention (x2 per step), dropout on"))
  ffn = encoder.PointwiseFeedForward(dropout_rate=rate)
  ffn_params = ffn.init(_rng(0), x[:1])
  feed = lambda p, x, rng: ffn.apply(p, x, deterministic=False, rngs={"dropout": rng})
  kernels.append(Kernel("breakdown", "ffn_fwd_bwd_per_block", _grad_of_sum(feed, (0, 1)),
                        (ffn_params, x, rng), items=b,
                        params={"batch": b, "max_len": seq_len, "dropout_rate": rate},
                        note="one block's FFN (x2 per step), dropout on"))
  block = encoder.SelfAttentionBlock(dropout_rate=rate, causal=True,
                                    kernel_init=nn.initializers.xavier_uniform())
  block_params = block.init(_rng(0), x[:1], valid[:1])
  run_block = lambda p, x, valid, rng: block.apply(p, x, valid, deterministic=False,
                                                   segment_ids=segment_ids,
                                                   rngs={"dropout": rng})
  kernels.append(Kernel("breakdown", "block_fwd_bwd", _grad_of_sum(run_block, (0, 1)),
                        (block_params, x, valid, rng), items=b,
                        params={"batch": b, "max_len": seq_len, "dropout_rate": rate},
                        note="one whole block: LNs + attention + FFN + residuals (x2 per step)"))
  kernels.append(dropout_masks_kernel(rows, seq_len, dim, config.model.num_blocks, rate))
  if quick:
    skip = {"forward_only", "embed_score_loss_fwd_bwd", "block_fwd_bwd"}
    kernels = [k for k in kernels if k.name not in skip]
  return kernels


def dropout_shapes(batch: int, seq_len: int, dim: int, num_blocks: int) -> list[tuple[int, ...]]:
  """Shapes SASRec draws a dropout mask for in one training step.

  The attention weights come in causal query blocks (``layers.query_blocks``):
  block ``[a, b)`` draws ``[batch, 1, b - a, b]``.
  """
  shapes = [(batch, seq_len, dim)]  # embeddings
  blocks = layers.query_blocks(seq_len, seq_len, causal=True)
  for _ in range(num_blocks):
    shapes += [(batch, 1, stop - start, keys) for start, stop, keys in blocks]
    shapes += [(batch, seq_len, dim), (batch, seq_len, dim)]
  return shapes


def dropout_masks_kernel(batch: int, seq_len: int, dim: int, num_blocks: int, rate: float,
                         rng: jax.Array | None = None, name: str = "dropout_masks",
                         group: str = "breakdown") -> Kernel:
  """Draws all of one step's dropout masks as ``layers.Dropout`` does."""
  shapes = dropout_shapes(batch, seq_len, dim, num_blocks)
  rng = _rng(3) if rng is None else rng

  def fn(rng):
    keys = jax.random.split(rng, len(shapes))
    # Sum the kept counts so the masks are not dead code.
    return sum(jnp.sum(layers.dropout_keep_mask(k, s, 1.0 - rate)[0], dtype=jnp.int32)
               for k, s in zip(keys, shapes, strict=True))

  numbers = int(sum(np.prod(s) for s in shapes))
  return Kernel(group, name, fn, (rng,), items=batch,
                params={"random_numbers": numbers, "rate": rate},
                note=f"{numbers / 1e6:.1f}M 16-bit draws (embeddings, attention weights, FFN)")
