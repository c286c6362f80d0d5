"""Whole models against float64 NumPy references written from their equations.

Each reference below reimplements a model's eval-mode forward pass in NumPy
(float64) from the equations in its module docstring, reading the weights
from the Flax params by name, and never calls the JAX code. Parameters are
redrawn at random (biases, peepholes and layer-norm offsets non-zero), the
inputs are left-padded with rows of different lengths, and the model runs
jitted in float32. Two things are compared:

* the hidden states ``[B, L, D]`` (``[B, D]`` for Caser), and
* the scores ``hidden @ models.item_table(params, N).T``, the contract
  every loss and metric relies on.

The CTR model has no hidden states or item scores: its click logits are
compared, with the same tolerance.

Tolerance (``assert_close``): ``|model - reference| <= RTOL * |reference| +
ATOL * max|reference|`` element-wise, with RTOL = 1e-4 and ATOL = 1e-5. The
measured error is at most 6e-7 of the largest value (float32 eps is 1.2e-7, a
model is a few hundred roundings deep); a wrong equation (a missing
``sqrt(d)`` scale, a layer reading the wrong input) moves values by O(1).
"""

import functools

import jax
import numpy as np
import pytest
from test_image_cnn import _reference as image_tower_reference  # ItemImageCNN's, reused.
from test_rnn_caser_models import caser_reference  # Caser's float64 reference, reused.

from deeprec_jax import models
from deeprec_jax.models import bert4rec, caser, ctr, image_cnn, rnn, sasrec
from experiments.configs import tiny

RTOL, ATOL = 1e-4, 1e-5
NUM_ITEMS, NUM_USERS, DIM = 11, 5, 8


def assert_close(actual, expected, what: str) -> None:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = np.abs(expected).max()
  assert scale > 0, what
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale, err_msg=what)


def random_params(module, *args, seed: int, scale: float = 0.4, **kwargs):
  """Float32 params with ``module.init``'s structure, every entry drawn at random.

  Weights, biases, peepholes and layer-norm offsets are ``scale * N(0, 1)``;
  layer-norm scales are ``1 + scale * N(0, 1)``. The structure comes from
  ``jax.eval_shape`` (nothing compiled).
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
    return (base + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def left_padded(lengths, seq_len: int, seed: int, high: int = NUM_ITEMS + 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  seq = np.zeros((len(lengths), seq_len), np.int32)
  for row, n in enumerate(lengths):
    if n:
      seq[row, -n:] = rng.integers(1, high, n)
  return seq


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def forward_and_scores(model, params, item_seq, *, with_last_only=False, **kwargs):
  """The model and its scores against the shared item table, in one jitted program.

  Returns ``(hidden, scores)``, followed by the same for ``last_only=True`` if
  ``with_last_only``.
  """

  # Optimization level 0 about halves XLA's compile time; the values stay
  # float32 round-off apart.
  @jax.jit(compiler_options={"xla_backend_optimization_level": 0})
  def run(params, item_seq):
    outputs = []
    for last_only in (False, True) if with_last_only else (False,):
      hidden = model.apply({"params": params}, item_seq, last_only=last_only, **kwargs)
      outputs += [hidden, hidden @ models.item_table(params, NUM_ITEMS).T]
    return outputs

  return jax.device_get(run(params, item_seq))


def scores_of(hidden, params):
  """float64 ``hidden @ E[0..N].T`` from the raw table."""
  return hidden @ f64(params)["item_embed"]["embedding"][: NUM_ITEMS + 1].T


# --------------------------------------------------------------------------
# Stacked RNN: peephole LSTM, LSTM (flax OptimizedLSTMCell), GRU (flax GRUCell).
# --------------------------------------------------------------------------


def np_peephole_step(p, carry, x):
  """rnn.PeepholeLSTMCell: gate blocks (i, f, c, o) of the fused kernels, diagonal peepholes."""
  c, h = carry
  hidden = p["recurrent_kernel"].shape[0]
  pre = x @ p["input_kernel"] + h @ p["recurrent_kernel"] + p["bias"]
  block = {g: pre[:, k * hidden:(k + 1) * hidden] for k, g in enumerate(rnn.GATE_ORDER)}
  i = sigmoid(block["i"] + p["peephole_i"] * c)
  f = sigmoid(block["f"] + p["peephole_f"] * c)
  c = f * c + i * np.tanh(block["c"])
  o = sigmoid(block["o"] + p["peephole_o"] * c)  # the new cell state
  h = o * np.tanh(c)
  return (c, h), h


def np_lstm_step(p, carry, x):
  """flax OptimizedLSTMCell: input kernels i* (no bias), recurrent h* (with bias)."""
  c, h = carry
  gate = {g: x @ p[f"i{g}"]["kernel"] + h @ p[f"h{g}"]["kernel"] + p[f"h{g}"]["bias"]
          for g in "ifgo"}
  c = sigmoid(gate["f"]) * c + sigmoid(gate["i"]) * np.tanh(gate["g"])
  h = sigmoid(gate["o"]) * np.tanh(c)
  return (c, h), h


def np_gru_step(p, h, x):
  """flax GRUCell: r, z from biased input and unbiased recurrent kernels; hn has a bias."""
  dense = lambda name, v: v @ p[name]["kernel"] + p[name].get("bias", 0.0)
  r = sigmoid(dense("ir", x) + dense("hr", h))
  z = sigmoid(dense("iz", x) + dense("hz", h))
  n = np.tanh(dense("in", x) + r * dense("hn", h))
  h = (1.0 - z) * n + z * h
  return h, h


NP_CELLS = {"peephole_lstm": np_peephole_step, "lstm": np_lstm_step, "gru": np_gru_step}


def np_rnn(params, item_seq, cell: str, num_layers: int) -> np.ndarray:
  """rnn.Model in eval mode: layer k > 0 reads layer k - 1's outputs; padding holds the carry."""
  p = f64(params)
  batch, seq_len = item_seq.shape
  x = p["item_embed"]["embedding"][item_seq]
  real = item_seq > 0
  for layer in range(num_layers):
    cell_params = p[f"layer_{layer}"]["cell"]
    zeros = np.zeros((batch, DIM))
    carry = zeros if cell == "gru" else (zeros, zeros)
    outputs = np.zeros((batch, seq_len, DIM))
    for t in range(seq_len):
      new_carry, y = NP_CELLS[cell](cell_params, carry, x[:, t])
      keep = real[:, t, None]
      carry = jax.tree.map(lambda new, old, keep=keep: np.where(keep, new, old),
                           new_carry, carry)
      outputs[:, t] = np.where(keep, y, 0.0)
    x = outputs  # The next layer reads this layer's outputs.
  return x


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_stacked_rnn_matches_numpy(cell):
  model = rnn.Model(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=8, dim=DIM, cell=cell,
                    num_layers=2, dropout_rate=0.3)
  item_seq = left_padded([8, 5, 2, 1], 8, seed=1)
  params = random_params(model, item_seq, seed=2)
  hidden, scores = forward_and_scores(model, params, item_seq)
  expected = np_rnn(params, item_seq, cell, num_layers=2)
  assert_close(hidden, expected, f"{cell} hidden")
  assert_close(scores, scores_of(expected, params), f"{cell} scores")
  np.testing.assert_array_equal(hidden[item_seq == 0], 0.0)
  # The second layer matters: its reference differs from one layer's by O(1).
  one_layer = np_rnn(params, item_seq, cell, num_layers=1)
  assert np.abs(expected - one_layer).max() > 0.05 * np.abs(expected).max()


# --------------------------------------------------------------------------
# SASRec and BERT4Rec.
# --------------------------------------------------------------------------


def np_layer_norm(x, p, eps=1e-8):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):  # flax's nn.gelu default: the tanh approximation
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_relu(x):
  return np.maximum(x, 0.0)


def np_softmax_where(logits, allowed):
  """Softmax over allowed keys; a row with none allowed is all zeros."""
  filled = np.where(allowed, logits, -np.inf)
  top = filled.max(-1, keepdims=True)
  e = np.where(allowed, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / np.where(total > 0, total, 1.0)


def np_attention(q_in, kv_in, allowed, p, kind: str, num_heads: int):
  """Dot product: softmax(Q_h K_h^T / sqrt(d_h)) V_h, concatenated, then W_o.

  Additive: per head, softmax_j(tanh(W_q q_i + W_k k_j + b) . v) V_j (no output projection).
  """
  batch, seq_len, dim = q_in.shape
  head = dim // num_heads
  if kind == "dot_product":
    q = q_in @ p["query"]["kernel"] + p["query"]["bias"]
    k = kv_in @ p["key"]["kernel"]  # no key bias
    v = kv_in @ p["value"]["kernel"] + p["value"]["bias"]
    out = np.zeros((batch, seq_len, dim))
    for h in range(num_heads):
      cols = slice(h * head, (h + 1) * head)
      logits = np.einsum("bqd,bkd->bqk", q[..., cols], k[..., cols]) / np.sqrt(head)
      out[..., cols] = np_softmax_where(logits, allowed) @ v[..., cols]
    return out @ p["out"]["kernel"] + p["out"]["bias"]
  wq, wk, b, vec = p["query"]["kernel"], p["key"]["kernel"], p["bias"], p["v"]
  values = kv_in @ p["value"]["kernel"] + p["value"]["bias"]
  att = wq.shape[1] // num_heads
  out = np.zeros((batch, seq_len, dim))
  for h in range(num_heads):
    a_cols, v_cols = slice(h * att, (h + 1) * att), slice(h * head, (h + 1) * head)
    hidden = np.tanh((q_in @ wq[:, a_cols])[:, :, None] + (kv_in @ wk[:, a_cols])[:, None]
                     + b[a_cols])  # [B, q, k, att]
    out[..., v_cols] = np_softmax_where(hidden @ vec[a_cols], allowed) @ values[..., v_cols]
  return out


def np_block(x, valid, p, kind, num_heads, causal, activation, arrangement="sasrec"):
  """encoder.SelfAttentionBlock.

  'sasrec': q = LN1(x); h = q + Att(q, x); f = LN2(h); (f + FFN(f)) * valid.
  'pre_ln': n = LN1(x); h = x + Att(n, n); (h + FFN(LN2(h))) * valid.
  'post_ln': h = LN1(x + Att(x, x)); LN2(h + FFN(h)) * valid.
  """
  seq_len = x.shape[1]
  allowed = np.repeat(valid[:, None, :], seq_len, axis=1)
  if causal:
    allowed = allowed & np.tril(np.ones((seq_len, seq_len), bool))
  ffn = p["ffn"]
  np_ffn = lambda v: (activation(v @ ffn["dense_in"]["kernel"] + ffn["dense_in"]["bias"])
                      @ ffn["dense_out"]["kernel"] + ffn["dense_out"]["bias"])
  if arrangement == "post_ln":
    h = np_layer_norm(x + np_attention(x, x, allowed, p["attention"], kind, num_heads),
                      p["ln_attention"])
    return np_layer_norm(h + np_ffn(h), p["ln_ffn"]) * valid[..., None]
  q = np_layer_norm(x, p["ln_attention"])
  if arrangement == "pre_ln":
    h = x + np_attention(q, q, allowed, p["attention"], kind, num_heads)
  else:
    h = q + np_attention(q, x, allowed, p["attention"], kind, num_heads)
  f = np_layer_norm(h, p["ln_ffn"])
  ffn = p["ffn"]
  inner = activation(f @ ffn["dense_in"]["kernel"] + ffn["dense_in"]["bias"])
  residual = h if arrangement == "pre_ln" else f
  out = residual + inner @ ffn["dense_out"]["kernel"] + ffn["dense_out"]["bias"]
  return out * valid[..., None]


def np_positions(params, item_seq, max_len, positions_from):
  """``P[-L:]`` ('end'), or row ``j`` at a sequence's ``j``-th real item ('start')."""
  table = f64(params)["pos_embed"]["embedding"]
  seq_len = item_seq.shape[1]
  if positions_from == "end":
    return table[max_len - seq_len:][None]
  out = np.zeros(item_seq.shape + (table.shape[1],))
  for b, row in enumerate(item_seq):
    first = seq_len - np.count_nonzero(row)  # left-padded
    out[b, first:] = table[:seq_len - first]
  return out


def np_sasrec(params, item_seq, *, kind, num_heads, num_blocks, max_len, arrangement="sasrec",
              positions_from="end"):
  """x = (E[s] * sqrt(d) + P[-L:]) * valid; causal ReLU blocks; LN; * valid."""
  p = f64(params)
  valid = item_seq != 0
  x = p["item_embed"]["embedding"][item_seq] * np.sqrt(DIM)
  x = (x + np_positions(params, item_seq, max_len, positions_from)) * valid[..., None]
  for i in range(num_blocks):
    x = np_block(x, valid, p[f"block_{i}"], kind, num_heads, causal=True, activation=np_relu,
                 arrangement=arrangement)
  return np_layer_norm(x, p["final_ln"]) * valid[..., None]


def np_bert4rec(params, item_seq, *, kind, num_heads, num_blocks, max_len, positions_from="end",
                arrangement="sasrec"):
  """x = LN(E[s] + P[-L:]) * valid; bidirectional GELU blocks; LN; LN(GELU(W x + b)) * valid."""
  p = f64(params)
  valid = item_seq != 0
  x = p["item_embed"]["embedding"][item_seq] + np_positions(params, item_seq, max_len,
                                                            positions_from)
  x = np_layer_norm(x, p["embed_ln"]) * valid[..., None]
  for i in range(num_blocks):
    x = np_block(x, valid, p[f"block_{i}"], kind, num_heads, causal=False, activation=np_gelu,
                 arrangement=arrangement)
  x = np_layer_norm(x, p["final_ln"])
  x = x @ p["head"]["kernel"] + p["head"]["bias"]
  return np_layer_norm(np_gelu(x), p["head_ln"]) * valid[..., None]


ATTENTION_MODELS = {"sasrec": (sasrec.Model, np_sasrec), "bert4rec": (bert4rec.Model, np_bert4rec)}


@pytest.mark.parametrize("attention", ["dot_product", "additive"])
@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_attention_model_matches_numpy(name, attention):
  module, reference = ATTENTION_MODELS[name]
  max_len, seq_len = 9, 7  # Shorter than max_len: positions are right-aligned rows.
  model = module(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=max_len, dim=DIM,
                 num_blocks=2, num_heads=2, dropout_rate=0.3, attention=attention)
  item_seq = left_padded([7, 4, 1], seq_len, seed=3)
  if name == "bert4rec":
    item_seq[:2, -1] = NUM_ITEMS + 1  # The mask token at the evaluated slot.
  params = random_params(model, item_seq, seed=4)
  hidden, scores, last, last_scores = forward_and_scores(model, params, item_seq,
                                                         with_last_only=True)
  expected = reference(params, item_seq, kind=attention, num_heads=2, num_blocks=2,
                       max_len=max_len)
  assert_close(hidden, expected, f"{name} {attention} hidden")
  assert_close(scores, scores_of(expected, params), f"{name} {attention} scores")
  np.testing.assert_array_equal(hidden[item_seq == 0], 0.0)
  # The last-position path (evaluation) computes only the last row.
  assert_close(last, expected[:, -1:], f"{name} {attention} last_only")
  assert_close(last_scores, scores_of(expected[:, -1:], params), f"{name} last_only scores")


@pytest.mark.parametrize("name, arrangement, ffn_factor", [
    ("sasrec", "pre_ln", 3), ("bert4rec", "post_ln", 4)])
def test_block_arrangement_matches_numpy(name, arrangement, ffn_factor):
  """model.block: 'pre_ln' (normalized keys/values, raw residuals) and 'post_ln'
  (BERT's: layer-normed residual sums), with a wider FFN."""
  max_len, seq_len = 9, 7
  module, reference = ATTENTION_MODELS[name]
  model = module(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=max_len, dim=DIM,
                 num_blocks=2, num_heads=2, dropout_rate=0.3, block=arrangement,
                 ffn_dim=ffn_factor * DIM)
  item_seq = left_padded([7, 4, 1], seq_len, seed=5)
  if name == "bert4rec":
    item_seq[:2, -1] = NUM_ITEMS + 1  # The mask token at the evaluated slot.
  params = random_params(model, item_seq, seed=6)
  assert params["block_1"]["ffn"]["dense_in"]["kernel"].shape == (DIM, ffn_factor * DIM)
  hidden, _, last, _ = forward_and_scores(model, params, item_seq, with_last_only=True)
  run = lambda block: reference(params, item_seq, kind="dot_product", num_heads=2,
                                num_blocks=2, max_len=max_len, arrangement=block)
  expected = run(arrangement)
  assert_close(hidden, expected, f"{arrangement} {name} hidden")
  assert_close(last, expected[:, -1:], f"{arrangement} {name} last_only")
  np.testing.assert_array_equal(hidden[item_seq == 0], 0.0)
  # The arrangement matters: the others give other states from the same params.
  for other in {"sasrec", "pre_ln", "post_ln"} - {arrangement}:
    assert np.abs(run(other) - expected).max() > 1e-2, other


def _one_block_states(name, seed, **fields):
  """``(model, params, hidden, reference hidden)`` of a 1-block, 2-head model with ``fields``."""
  module, reference = ATTENTION_MODELS[name]
  model = module(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=9, dim=DIM, num_blocks=1,
                 num_heads=2, **fields)
  item_seq = left_padded([7, 4, 1], 7, seed=seed)
  if name == "bert4rec":
    item_seq[:2, -1] = NUM_ITEMS + 1  # The mask token at the evaluated slot.
  params = random_params(model, item_seq, seed=seed + 1)
  hidden = np.asarray(model.apply({"params": params}, item_seq))
  expected = reference(params, item_seq, kind="dot_product", num_heads=2, num_blocks=1,
                       max_len=9)
  return model, params, hidden, expected


@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_l2_norm_states_and_item_vectors_are_unit(name):
  """model.l2_norm: the reference's states and the table rows, each divided by its norm."""
  model, params, hidden, expected = _one_block_states(name, 8, l2_norm=True)
  norms = np.linalg.norm(expected, axis=-1, keepdims=True)
  expected = np.where(norms > 0, expected / np.maximum(norms, 1e-12), 0.0)
  assert_close(hidden, expected, f"{name} l2_norm hidden")
  vectors = np.asarray(models.item_vectors(model, params, NUM_ITEMS))
  table = f64(params)["item_embed"]["embedding"][:NUM_ITEMS + 1]
  np.testing.assert_allclose(vectors, table / np.linalg.norm(table, axis=-1, keepdims=True),
                             rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_output_table_scores_against_its_own_rows(name):
  """model.output_table: the same states, scored against a second table (gSASRec)."""
  model, params, hidden, expected = _one_block_states(name, 10, output_table=True)
  assert params["output_embed"]["embedding"].shape[1] == DIM
  assert_close(hidden, expected, f"{name} output_table hidden")
  vectors = np.asarray(models.item_vectors(model, params, NUM_ITEMS))
  np.testing.assert_array_equal(vectors, params["output_embed"]["embedding"][:NUM_ITEMS + 1])
  assert not np.allclose(vectors, models.item_table(params, NUM_ITEMS))
  with pytest.raises(ValueError, match="model.output_table"):
    ATTENTION_MODELS[name][0](num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=9,
                              output_table=True, item_encoder="image")


def test_sasrec_init_std_draws_normal_weights():
  """model.init_std > 0: kernels and embeddings ~ normal(0, init_std); 0 = Xavier uniform."""
  item_seq = left_padded([7, 4, 1], 7, seed=5)
  stds = {}
  for init_std in (0.0, 0.02):
    model = sasrec.Model(num_items=400, num_users=NUM_USERS, max_len=9, dim=32, num_blocks=1,
                         init_std=init_std)
    params = model.init(jax.random.key(0), item_seq)["params"]
    stds[init_std] = float(np.std(params["item_embed"]["embedding"][1:401]))  # rows 1..N
  # Xavier uniform over a [401, 32] table: sqrt(2 / (401 + 32)) ~ 0.068.
  np.testing.assert_allclose(stds[0.02], 0.02, rtol=0.05)
  np.testing.assert_allclose(stds[0.0], np.sqrt(2 / 433), rtol=0.05)
  with pytest.raises(ValueError, match="model.init_std"):
    sasrec.Model(num_items=10, num_users=1, max_len=4, init_std=-1.0)


# --------------------------------------------------------------------------
# Caser, built from the tiny test config, against test_rnn_caser_models' reference.
# --------------------------------------------------------------------------


def test_caser_from_config_matches_numpy_scores():
  config = tiny.get_config("caser")
  max_len = config.data.max_len
  model = models.create_model(config.model, num_items=NUM_ITEMS, num_users=NUM_USERS,
                              max_len=max_len)
  assert isinstance(model, caser.Model)
  item_seq = left_padded([max_len, 2, 1, max_len], max_len, seed=5)
  user = np.array([0, 4, 2, 0], np.int32)
  params = random_params(model, item_seq, seed=6, user=user)
  hidden, scores = forward_and_scores(model, params, item_seq, user=user)
  expected = caser_reference(params, item_seq, user, act_conv=config.model.activation_conv,
                             act_fc=config.model.activation_fc)
  assert_close(hidden, expected, "caser hidden")
  assert_close(scores, scores_of(expected, params), "caser scores")



# --------------------------------------------------------------------------
# The CTR model: mean of the recent items, image tower (+ id), MLP -> logit.
# --------------------------------------------------------------------------


def np_ctr(params, history, candidate, images, *, max_len, use_id, num_blocks, pool):
  """ctr.Model: u = masked mean of E[h] over the last max_len; c = CNN(img) (+ E[cand]).

  logit = MLP([u, c, u * c]) with ReLU hidden layers; a row without items has u = 0.
  """
  p = f64(params)
  table = p["item_embed"]["embedding"]
  recent = history[:, -max_len:]
  real = (recent > 0)[..., None]
  user = (table[recent] * real).sum(1) / np.maximum(real.sum(1), 1)
  item = image_tower_reference(params[image_cnn.IMAGE_TOWER], images, num_blocks, pool)
  if use_id:
    item = item + table[candidate]
  x = np.concatenate([user, item, user * item], axis=-1)
  layer = 0
  while f"mlp_{layer}" in p:
    x = np_relu(x @ p[f"mlp_{layer}"]["kernel"] + p[f"mlp_{layer}"]["bias"])
    layer += 1
  return (x @ p["logit"]["kernel"] + p["logit"]["bias"])[:, 0]


def test_ctr_model_matches_numpy():
  max_len = 5
  # Rows longer than max_len (older items must be ignored), shorter, one item, none.
  history = left_padded([7, 7, 3, 1, 0], 7, seed=7)
  candidate = np.array([3, 11, 1, 5, 8], np.int32)
  images = np.random.default_rng(8).integers(0, 256, (5, 10, 10, 3), dtype=np.uint8)
  kwargs = dict(num_items=NUM_ITEMS, num_users=0, max_len=max_len, dim=DIM, hidden=(12, 6),
                image_channels=(3, 4), image_kernel=3, image_pool=2, image_dense=6)
  with_id, without_id = ctr.Model(use_id=True, **kwargs), ctr.Model(use_id=False, **kwargs)
  params = random_params(with_id, history, candidate, images, seed=9)
  assert sorted(params) == ["item_embed", image_cnn.IMAGE_TOWER, "logit", "mlp_0", "mlp_1"]

  @jax.jit(compiler_options={"xla_backend_optimization_level": 0})
  def run(params):
    return [m.apply({"params": params}, history, candidate, images)
            for m in (with_id, without_id)]

  got_id, got_no_id = jax.device_get(run(params))
  assert got_id.shape == (5,) and got_id.dtype == np.float32
  reference = functools.partial(np_ctr, params, history, candidate, images, max_len=max_len,
                                num_blocks=2, pool=2)
  expected_id, expected_no_id = reference(use_id=True), reference(use_id=False)
  assert_close(got_id, expected_id, "ctr logits, use_id")
  assert_close(got_no_id, expected_no_id, "ctr logits, picture only")
  # The reference is sensitive to what the model must get right: the id term,
  # and the items older than max_len (rows 0 and 1) left out of the mean.
  assert np.abs(expected_id - expected_no_id).min() > 1e-3
  all_items = np_ctr(params, history, candidate, images, max_len=7, use_id=True,
                     num_blocks=2, pool=2)
  assert np.abs(all_items - expected_id)[:2].min() > 1e-3


@pytest.mark.parametrize("name", sorted(ATTENTION_MODELS))
def test_positions_from_start_match_numpy(name):
  """model.positions_from='start': each sequence's oldest item gets positional row 0."""
  max_len, seq_len = 9, 7
  module, reference = ATTENTION_MODELS[name]
  model = module(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=max_len, dim=DIM,
                 num_blocks=1, num_heads=2, positions_from="start")
  item_seq = left_padded([7, 4, 1], seq_len, seed=11)
  if name == "bert4rec":
    item_seq[:2, -1] = NUM_ITEMS + 1
  params = random_params(model, item_seq, seed=12)
  hidden, _, last, _ = forward_and_scores(model, params, item_seq, with_last_only=True)
  expected = reference(params, item_seq, kind="dot_product", num_heads=2, num_blocks=1,
                       max_len=max_len, positions_from="start")
  assert_close(hidden, expected, f"{name} positions from start")
  assert_close(last, expected[:, -1:], f"{name} positions from start, last_only")
  right_aligned = reference(params, item_seq, kind="dot_product", num_heads=2, num_blocks=1,
                            max_len=max_len)
  assert not np.allclose(hidden, right_aligned, atol=1e-3)  # the option changes the rows


def test_qkv_init_torch_mha_scale():
  """model.qkv_init='torch_mha': Q/K/V uniform with variance 1 / (2d); the rest init_std."""
  dim = 128
  model = sasrec.Model(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=9, dim=dim,
                       num_blocks=1, init_std=0.02, qkv_init="torch_mha")
  params = jax.jit(model.init)(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
  attention = params["block_0"]["attention"]
  bound = np.sqrt(6.0 / (4 * dim))  # torch's xavier_uniform_ on the [3d, d] in-projection
  for name in ("query", "key", "value"):
    kernel = np.asarray(attention[name]["kernel"])
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.03)
  np.testing.assert_allclose(np.asarray(attention["out"]["kernel"]).std(), 0.02, rtol=0.03)
  same = sasrec.Model(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=9, dim=dim,
                      num_blocks=1, init_std=0.02)
  query = jax.jit(same.init)(jax.random.key(0), np.ones((1, 4), np.int32))["params"]["block_0"][
      "attention"]["query"]["kernel"]
  np.testing.assert_allclose(np.asarray(query).std(), 0.02, rtol=0.03)
  with pytest.raises(ValueError, match="model.qkv_init"):
    sasrec.Model(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=9, qkv_init="xavier")
  with pytest.raises(ValueError, match="model.positions_from"):
    sasrec.Model(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=9, positions_from="left")
