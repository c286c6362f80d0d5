"""Tests of the attention layers, SASRec and BERT4Rec.

The layer tests compare against float64 NumPy implementations written here
from the equations (not from the JAX code), on random parameters with the
structure of the initialized ones, so that every weight, bias, scale and offset
matters. Tolerance: relative error ``max|jax - ref| / max|ref| < 1e-5`` in
float32 (float32 eps is 1.2e-7; a block is a few dozen roundings deep and
measures about 2e-7).

Everything runs eagerly on tiny dimensions except two jitted gradients, so the
file needs about 20 s of CPU time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax import models
from deeprec_jax.data import packing
from deeprec_jax.models import bert4rec, encoder, item_embedding, layers, sasrec, validation
from experiments.configs import default as default_config

NUM_ITEMS = 13
DIM = 8
RTOL = 1e-5

MODELS = {"sasrec": sasrec, "bert4rec": bert4rec}
ATTENTIONS = ("dot_product", "additive")


# ----------------------------------------------------------------------------
# Helpers and float64 NumPy references.
# ----------------------------------------------------------------------------


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _random_params(module, *args, seed=0, scale=0.3):
  """Random float32 parameters with the structure ``module.init(key, *args)`` would give.

  Every weight, bias and layer-norm offset is ``scale * N(0, 1)`` and every
  layer-norm scale ``1 + scale * N(0, 1)``, so that all of them matter (the
  initializers' zero biases would test nothing). The structure comes from
  ``jax.eval_shape``, which skips compiling the initializers.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return (base + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(out - ref)) / np.max(np.abs(ref))


def _left_padded(lengths, seq_len, seed=0, low=1, high=NUM_ITEMS + 1):
  """int32[len(lengths), seq_len]: random items, left-padded with 0."""
  rng = np.random.default_rng(seed)
  seq = np.zeros((len(lengths), seq_len), np.int32)
  for row, n in enumerate(lengths):
    if n:
      seq[row, -n:] = rng.integers(low, high, n)
  return seq


def np_mask(valid, causal):
  """bool[batch, L, L]: key j is real (and j <= i if causal)."""
  seq_len = valid.shape[1]
  mask = np.repeat(valid[:, None, :], seq_len, axis=1)
  if causal:
    mask &= np.tril(np.ones((seq_len, seq_len), bool))[None]
  return mask


def np_masked_softmax(logits, mask):
  """Softmax over allowed keys; rows with no allowed key are all zeros."""
  filled = np.where(mask, logits, -np.inf)
  row_max = filled.max(axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(mask, np.exp(logits - row_max), 0.0)
  total = e.sum(axis=-1, keepdims=True)
  return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


def np_layer_norm(x, p, eps=1e-8):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_dot_product_attention(xq, xkv, mask, p, num_heads):
  """Per head h: softmax(Q_h K_h^T / sqrt(d_h)) V_h; heads concatenated, then W_o."""
  dense = lambda x, name: x @ p[name]["kernel"] + p[name].get("bias", 0.0)
  q, k, v = dense(xq, "query"), dense(xkv, "key"), dense(xkv, "value")
  head_dim = q.shape[-1] // num_heads
  heads = []
  for h in range(num_heads):
    cols = slice(h * head_dim, (h + 1) * head_dim)
    logits = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / np.sqrt(head_dim)
    heads.append(np_masked_softmax(logits, mask) @ v[..., cols])
  return dense(np.concatenate(heads, -1), "out")


def np_additive_attention(xq, xkv, mask, p, num_heads):
  """a_ij = tanh(W_q Q_i + W_k K_j + b) . v; e = masked softmax_j; out_i = sum_j e_ij V_j."""
  w_q, w_k, b, v = p["query"]["kernel"], p["key"]["kernel"], p["bias"], p["v"]
  values = xkv @ p["value"]["kernel"] + p["value"]["bias"]
  batch, q_len, dim = xq.shape
  k_len = xkv.shape[1]
  hid = w_q.shape[1] // num_heads  # attention-hidden units per head
  hd = dim // num_heads  # value features per head
  out = np.zeros((batch, q_len, dim))
  for bi in range(batch):
    for h in range(num_heads):
      att = slice(h * hid, (h + 1) * hid)
      val = slice(h * hd, (h + 1) * hd)
      a = np.zeros((q_len, k_len))
      for i in range(q_len):
        for j in range(k_len):
          a[i, j] = np.tanh(xq[bi, i] @ w_q[:, att] + xkv[bi, j] @ w_k[:, att] + b[att]) @ v[att]
      e = np_masked_softmax(a, mask[bi])
      out[bi, :, val] = e @ values[bi][:, val]
  return out


def np_block(x, valid, p, attention, num_heads, causal, activation):
  """SASRec block: q = LN1(x); h = q + Att(q, x); f = LN2(h); y = (f + FFN(f)) * valid."""
  mask = np_mask(valid, causal)
  attend = np_dot_product_attention if attention == "dot_product" else np_additive_attention
  q = np_layer_norm(x, p["ln_attention"])
  h = q + attend(q, x, mask, p["attention"], num_heads)
  f = np_layer_norm(h, p["ln_ffn"])
  ffn = p["ffn"]
  inner = activation(f @ ffn["dense_in"]["kernel"] + ffn["dense_in"]["bias"])
  y = f + inner @ ffn["dense_out"]["kernel"] + ffn["dense_out"]["bias"]
  return y * valid[..., None]


def _attention_inputs(seed=0):
  """Queries/keys [3, 6, DIM] and valid [3, 6] with 0, 2 and all-but-1 padded slots."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, 6, DIM)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], bool)
  return x, valid


def _model(name, attention="dot_product", **kwargs):
  fields = dict(num_items=NUM_ITEMS, num_users=5, max_len=10, dim=DIM, num_blocks=2,
                num_heads=2, attention=attention)
  fields.update(kwargs)
  return MODELS[name].Model(**fields)


def _init(model, seed=0):
  return _random_params(model, jnp.ones((1, 6), jnp.int32), seed=seed)


# ----------------------------------------------------------------------------
# Layers against NumPy.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_matches_numpy(attention, num_heads):
  """Both attentions, causal + padding mask, vs float64 NumPy: rel. error < 1e-5."""
  x, valid = _attention_inputs()
  xq = x * 0.7 + 0.1  # queries differ from keys, as in the SASRec block
  mask = np_mask(valid, causal=True)
  module = (layers.DotProductAttention(num_heads=num_heads) if attention == "dot_product"
            else layers.AdditiveAttention(num_heads=num_heads))
  params = _random_params(module, xq, x, seed=1)
  out = module.apply({"params": params}, xq, x, jnp.asarray(mask[:, None]))
  ref_fn = np_dot_product_attention if attention == "dot_product" else np_additive_attention
  ref = ref_fn(np.float64(xq), np.float64(x), mask, _f64(params), num_heads)
  assert out.shape == (3, 6, DIM) and out.dtype == jnp.float32
  assert _rel_err(out, ref) < RTOL
  # Row 2's queries 0..4 allow no key (causal + all earlier keys padded): finite zeros
  # for additive (no output bias); the dot-product output is just W_o's bias there.
  if attention == "additive":
    np.testing.assert_array_equal(np.asarray(out)[2, :5], 0.0)


def test_additive_attention_hidden_dim():
  """A non-default attention-hidden size changes only the W_q/W_k/b/v shapes."""
  x, valid = _attention_inputs()
  module = layers.AdditiveAttention(hidden_dim=5)
  params = _random_params(module, x, x)
  assert params["query"]["kernel"].shape == (DIM, 5) and params["v"].shape == (5,)
  mask = np_mask(valid, causal=False)
  out = module.apply({"params": params}, x, x, jnp.asarray(mask[:, None]))
  ref = np_additive_attention(np.float64(x), np.float64(x), mask, _f64(params), 1)
  assert _rel_err(out, ref) < RTOL


@pytest.mark.parametrize("attention,num_heads,causal,activation,np_activation", [
    ("dot_product", 2, True, nn.relu, lambda x: np.maximum(x, 0.0)),
    ("additive", 1, True, nn.relu, lambda x: np.maximum(x, 0.0)),
    ("dot_product", 1, False, nn.gelu, np_gelu),
    ("additive", 2, False, nn.gelu, np_gelu),
])
def test_block_matches_numpy(attention, num_heads, causal, activation, np_activation):
  """One SelfAttentionBlock (eval mode) vs float64 NumPy: rel. error < 1e-5."""
  x, valid = _attention_inputs(seed=2)
  x = x * valid[..., None]  # blocks receive zeros at padding
  block = encoder.SelfAttentionBlock(attention=attention, num_heads=num_heads, causal=causal,
                                    activation=activation, dropout_rate=0.5)
  params = _random_params(block, x, valid, seed=2)
  out = block.apply({"params": params}, x, valid)
  ref = np_block(np.float64(x), valid, _f64(params), attention, num_heads, causal, np_activation)
  assert _rel_err(out, ref) < RTOL
  np.testing.assert_array_equal(np.asarray(out)[~valid], 0.0)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_block_ignores_content_at_padding(attention):
  """A bidirectional block's outputs at real positions ignore whatever sits at padding.

  Padding is masked as keys, so replacing the (normally zero) inputs at padding
  positions by large garbage must leave the real positions unchanged.
  """
  x, valid = _attention_inputs(seed=3)
  clean = x * valid[..., None]
  garbage = np.where(valid[..., None], x, 50.0 * x + 7.0)
  block = encoder.SelfAttentionBlock(attention=attention, num_heads=2, causal=False,
                                    activation=nn.gelu)
  params = _random_params(block, clean, valid, seed=3)
  out_clean = np.asarray(block.apply({"params": params}, clean, valid))
  out_garbage = np.asarray(block.apply({"params": params}, garbage, valid))
  np.testing.assert_allclose(out_garbage[valid], out_clean[valid], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Models: causality, padding, bidirectionality.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sasrec_is_causal(attention):
  """Changing items after position t leaves SASRec's hidden[:, :t + 1] unchanged."""
  model = _model("sasrec", attention)
  params = _init(model)
  seq = _left_padded([6, 4, 2], 6, seed=4)
  hidden = np.asarray(model.apply({"params": params}, seq))
  for t in (1, 3, 4):
    changed = seq.copy()
    changed[:, t + 1:] = seq[:, t + 1:] % NUM_ITEMS + 1  # differs everywhere after t
    hidden_changed = np.asarray(model.apply({"params": params}, changed))
    np.testing.assert_allclose(hidden_changed[:, :t + 1], hidden[:, :t + 1], rtol=0, atol=1e-6)
    # ...and the later positions do change (the test has power).
    assert np.abs(hidden_changed[0, t + 1:] - hidden[0, t + 1:]).max() > 1e-3


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bert4rec_is_bidirectional(attention):
  """BERT4Rec's position t does depend on later items (unlike SASRec)."""
  model = _model("bert4rec", attention)
  params = _init(model)
  seq = _left_padded([6, 4, 2], 6, seed=5)
  changed = seq.copy()
  changed[:, -1] = seq[:, -1] % NUM_ITEMS + 1
  hidden = np.asarray(model.apply({"params": params}, seq))
  hidden_changed = np.asarray(model.apply({"params": params}, changed))
  assert np.abs(hidden_changed[0, 0] - hidden[0, 0]).max() > 1e-3


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_padding_invariance(name, attention):
  """The same sequences left-padded to L=6 and L=6+4 give the same real positions."""
  model = _model(name, attention)
  params = _init(model)
  lengths = [6, 3, 1]
  short = _left_padded(lengths, 6, seed=6)
  long = np.concatenate([np.zeros((3, 4), np.int32), short], axis=1)
  h_short = np.asarray(model.apply({"params": params}, short))
  h_long = np.asarray(model.apply({"params": params}, long))
  assert h_short.shape == (3, 6, DIM) and h_long.shape == (3, 10, DIM)
  real = short != 0
  np.testing.assert_allclose(h_long[:, 4:][real], h_short[real], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(h_long[:, :4], 0.0)  # hidden is zero at padding
  np.testing.assert_array_equal(h_short[~real], 0.0)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_padding_content_does_not_leak(name, attention):
  """Whatever the model could put at padded positions never reaches real positions.

  Padding is always item 0, so the only content a padded position can carry is
  the padding row of the item table plus the positional embedding of that slot.
  Replacing both by large random values must leave the hidden states at real
  positions unchanged (padding is masked out as attention keys and zeroed after
  every block). As a check of the test's power, perturbing the positional row
  of a real position does change them.
  """
  model = _model(name, attention, max_len=6)
  params = _init(model)
  seq = _left_padded([2, 1, 6], 6, seed=7)  # rows 0 and 1: slots 0..3 are padding
  real = seq != 0
  hidden = np.asarray(model.apply({"params": params}, seq))

  rng = np.random.default_rng(7)
  noisy = jax.tree.map(np.array, params)
  noisy["item_embed"]["embedding"][0] = 30.0 * rng.standard_normal(DIM)
  noisy["pos_embed"]["embedding"][:4] += 30.0 * rng.standard_normal((4, DIM))
  hidden_noisy = np.asarray(model.apply({"params": noisy}, seq))
  np.testing.assert_allclose(hidden_noisy[:2][real[:2]], hidden[:2][real[:2]], rtol=0,
                             atol=1e-6)
  assert np.abs(hidden_noisy[2] - hidden[2]).max() > 1e-3  # row 2 has items in slots 0..3


# ----------------------------------------------------------------------------
# Shapes, parameter counts, registry, validation.
# ----------------------------------------------------------------------------


def _expected_param_count(name, attention, positional, n, d, max_len, blocks):
  layer_norm = 2 * d
  dense = d * d + d
  # Dot product: W_q, W_k, W_v, W_o, biases on all but W_k. Additive: W_q,
  # W_k (no bias), b, v, and W_v with bias.
  att = 4 * dense - d if attention == "dot_product" else 2 * d * d + 2 * d + dense
  block = 2 * layer_norm + att + 2 * dense
  pos = max_len * d if positional else 0
  if name == "sasrec":
    # item (N+1)d (stored padded to table_rows) + pos Ld + blocks + final LN.
    return item_embedding.table_rows(n + 1) * d + pos + blocks * block + layer_norm
  # item (N+2)d (mask token) + pos + embedding LN + blocks + final LN + head (dense + LN).
  return (item_embedding.table_rows(n + 2) * d + pos + layer_norm + blocks * block
          + layer_norm + dense + layer_norm)


@pytest.mark.parametrize("positional", [True, False])
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name, attention, positional):
  model = _model(name, attention, positional=positional, num_blocks=3)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 7), jnp.int32))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  assert count == _expected_param_count(name, attention, positional, NUM_ITEMS, DIM, 10, 3)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_shapes_and_item_table(name):
  """create_model from the default config; hidden [B, L, D]; table rows 0..N."""
  config = default_config.get_config()
  config.model.name = name
  config.model.dim = DIM
  config.model.num_heads = 2
  model = models.create_model(config.model, num_items=NUM_ITEMS, num_users=5, max_len=10)
  assert models.spec(name).task == {"sasrec": "autoregressive", "bert4rec": "masked"}[name]
  seq = _left_padded([6, 4, 2], 6, seed=8)  # seq_len 6 < max_len 10
  if name == "bert4rec":
    seq[:, -1] = NUM_ITEMS + 1  # the mask token is a valid input
  variables = model.init(jax.random.key(0), seq)
  hidden = model.apply(variables, seq, user=jnp.zeros(3, jnp.int32))
  assert hidden.shape == (3, 6, DIM) and hidden.dtype == jnp.float32
  table = models.item_table(variables["params"], NUM_ITEMS)
  assert table.shape == (NUM_ITEMS + 1, DIM)
  assert (hidden @ table.T).shape == (3, 6, NUM_ITEMS + 1)


_BAD_FIELDS = [("attention", "multiplicative"), ("dtype", "float16"), ("num_heads", 3),
               ("dim", 0), ("dropout_rate", 1.0), ("num_blocks", -1), ("positional", "yes")]


@pytest.mark.parametrize("name,field,value",
                         [(name, *bad) for name in sorted(MODELS) for bad in _BAD_FIELDS])
def test_bad_fields_raise(name, field, value):
  with pytest.raises(ValueError, match=rf"model\.{field}"):
    _model(name, **{field: value})


@pytest.mark.parametrize("field,value", [("mask_prob", 0.0), ("mask_prob", 1.0),
                                         ("num_targets", 0)])
def test_bad_task_fields_raise(field, value):
  """The pipeline's settings (config.task) are checked where the trainer reads them."""
  config = default_config.get_config()
  config.task[field] = value
  with pytest.raises(ValueError, match=rf"task\.{field}"):
    validation.validate_task(config.task)


def test_too_long_sequence_raises():
  model = _model("sasrec", max_len=4)
  with pytest.raises(ValueError, match="max_len"):
    model.init(jax.random.key(0), jnp.ones((1, 5), jnp.int32))


# ----------------------------------------------------------------------------
# Training mode, jit, gradients, dtypes.
# ----------------------------------------------------------------------------


# Two jitted gradients cover both models, both attentions and both dtypes;
# each costs a few seconds of XLA compilation, so we do not take all 8 pairs.
@pytest.mark.parametrize("name,attention,dtype", [
    ("sasrec", "additive", "float32"),
    ("bert4rec", "dot_product", "bfloat16"),
])
def test_jit_grad(name, attention, dtype):
  """jit(value_and_grad) of a softmax loss in training mode is finite; dropout is seeded."""
  model = _model(name, attention, dtype=dtype, dropout_rate=0.3, num_blocks=1)
  params = _init(model)
  seq = jnp.asarray(_left_padded([6, 4, 2], 6, seed=9))
  targets = jnp.asarray(_left_padded([6, 4, 2], 6, seed=10))

  # Optimization level 0 halves XLA's compile time; this test is about values
  # (finite, seeded), which do not depend on how hard XLA optimizes.
  @jax.jit(compiler_options={"xla_backend_optimization_level": 0})
  def loss_and_grad(params, rng):
    def loss_fn(params):
      hidden = model.apply({"params": params}, seq, deterministic=False, rngs={"dropout": rng})
      logits = hidden @ models.item_table(params, NUM_ITEMS).T
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return jnp.sum(nll * (targets != 0)) / jnp.sum(targets != 0)
    return jax.value_and_grad(loss_fn)(params)

  # The 'rbg' PRNG compiles about twice as fast as threefry on CPU; dropout only
  # needs some key, and the model code is the same for every implementation.
  loss, grads = loss_and_grad(params, jax.random.key(1, impl="rbg"))
  loss2, _ = loss_and_grad(params, jax.random.key(2, impl="rbg"))
  assert np.isfinite(loss) and loss != loss2  # dropout is active and follows the RNG
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(grads["block_0"]["attention"]["value"]["kernel"]).max() > 0


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_close_to_float32(name, attention):
  """bfloat16 compute (float32 params) gives finite float32 hidden near the float32 one.

  bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through two
  blocks of layer-normed unit-scale activations we allow an absolute error of
  0.15 on any entry and 0.02 on average (measured: <= 0.06 and <= 0.006).
  """
  model = _model(name, attention)
  params = _init(model)
  seq = _left_padded([6, 4, 2], 6, seed=9)
  h32 = np.asarray(model.apply({"params": params}, seq))
  h16 = model.clone(dtype="bfloat16").apply({"params": params}, seq)
  assert h16.dtype == jnp.float32
  h16 = np.asarray(h16)
  assert np.isfinite(h16).all()
  err = np.abs(h16 - h32)
  assert err.max() < 0.15 and err.mean() < 0.02, (err.max(), err.mean())


# ----------------------------------------------------------------------------
# Query blocks, last-position outputs and dropout.
# ----------------------------------------------------------------------------


def test_query_blocks():
  """Causal attention splits ~50-row query blocks (at most 4) that read only earlier keys."""
  assert layers.query_blocks(200, 200, causal=False) == [(0, 200, 200)]
  assert layers.query_blocks(49, 49, causal=True) == [(0, 49, 49)]
  assert layers.query_blocks(200, 200, causal=True) == [
      (0, 50, 50), (50, 100, 100), (100, 150, 150), (150, 200, 200)]
  # The last query of 120 keys: one block reading every key.
  assert layers.query_blocks(1, 120, causal=True) == [(0, 1, 120)]
  blocks = layers.query_blocks(1000, 1000, causal=True)
  assert len(blocks) == 4 and blocks[-1] == (750, 1000, 1000)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_query_blocks_match_numpy(attention):
  """L = 120 runs in 2 causal query blocks; outputs equal the float64 reference.

  The last query alone (``q_len = 1``, the last-position path) gives the last row.
  """
  seq_len, dim = 120, 4
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, seq_len, dim)).astype(np.float32)
  valid = np.ones((2, seq_len), bool)
  valid[1, :70] = False  # a long left padding across the block boundary
  mask = np_mask(valid, causal=True)
  cls = layers.DotProductAttention if attention == "dot_product" else layers.AdditiveAttention
  module = cls(num_heads=2, causal=True)
  assert len(layers.query_blocks(seq_len, seq_len, causal=True)) == 2
  params = _random_params(module, x, x, seed=4)
  out = np.asarray(module.apply({"params": params}, x, x, jnp.asarray(mask[:, None])))
  ref_fn = np_dot_product_attention if attention == "dot_product" else np_additive_attention
  ref = ref_fn(np.float64(x), np.float64(x), mask, _f64(params), 2)
  assert _rel_err(out, ref) < RTOL
  last = module.apply({"params": params}, x[:, -1:], x, jnp.asarray(mask[:, None, -1:]))
  np.testing.assert_allclose(np.asarray(last), out[:, -1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_last_only_is_the_last_position(name, attention):
  """``last_only=True`` returns ``hidden[:, -1:]`` (L = 120: the block path is exercised)."""
  model = _model(name, attention, max_len=120)
  seq = jnp.asarray(_left_padded([120, 80, 3, 0], 120, seed=8))
  params = _random_params(model, seq[:1], seed=2)
  full = np.asarray(model.apply({"params": params}, seq))
  last = np.asarray(model.apply({"params": params}, seq, last_only=True))
  assert last.shape == (4, 1, DIM)
  np.testing.assert_allclose(last, full[:, -1:], rtol=0, atol=1e-5)


def test_dropout_keep_mask_statistics():
  """16-bit masks: keep rate, independence of rows/lanes/keys, exact expectation."""
  shape = (64, 4, 1001)  # an odd last dimension: a partial 64-bit word per row
  keep, scale = layers.dropout_keep_mask(jax.random.key(0), shape, 0.8)
  keep = np.asarray(keep)
  threshold = round(0.8 * 2**16)
  assert keep.shape == shape and scale == 2**16 / threshold
  n = keep.size
  sigma = np.sqrt(0.8 * 0.2 / n)
  assert abs(keep.mean() - threshold / 2**16) < 5 * sigma
  # The four 16-bit lanes of each hash, and every row, keep at the same rate.
  words = -(-shape[-1] // 4)
  for lane in range(4):
    part = keep[..., lane * words:(lane + 1) * words]
    assert abs(part.mean() - 0.8) < 5 * np.sqrt(0.16 / part.size)
  rows = keep.reshape(-1, shape[-1]).mean(axis=1)
  assert np.abs(rows - 0.8).max() < 5 * np.sqrt(0.16 / shape[-1])
  # Neighbouring elements and the same element in the next row are uncorrelated.
  flat = keep.reshape(-1, shape[-1]).astype(np.float64)
  for a, b in [(flat[:, :-1], flat[:, 1:]), (flat[:-1], flat[1:]),
               (flat[:, :words], flat[:, words:2 * words])]:
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)
  # Another key gives an independent mask; the same key the same one.
  other = np.asarray(layers.dropout_keep_mask(jax.random.key(1), shape, 0.8)[0])
  assert abs(np.corrcoef(keep.ravel(), other.ravel())[0, 1]) < 5 / np.sqrt(n)
  np.testing.assert_array_equal(
      np.asarray(layers.dropout_keep_mask(jax.random.key(0), shape, 0.8)[0]), keep)


def test_dropout_module():
  """Zeros a ``rate`` fraction, scales survivors by ``scale``; identity when deterministic."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((50, 2000)), jnp.float32)
  dropout = layers.Dropout(0.3)
  out = np.asarray(dropout.apply({}, x, deterministic=False,
                                 rngs={"dropout": jax.random.key(5)}))
  kept = out != 0
  _, scale = layers.dropout_keep_mask(jax.random.key(5), x.shape, 0.7)
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] * scale, rtol=1e-6)
  assert abs(kept.mean() - 0.7) < 5 * np.sqrt(0.21 / x.size)
  # E[mask * scale] = 1 exactly, so the output mean matches the input's.
  ones = np.asarray(dropout.apply({}, jnp.ones((400, 2500)), deterministic=False,
                                  rngs={"dropout": jax.random.key(6)}))
  assert abs(ones.mean() - 1.0) < 5 * np.sqrt(0.21 / 0.49 / ones.size)
  np.testing.assert_array_equal(np.asarray(dropout.apply({}, x, deterministic=True)), x)
  np.testing.assert_array_equal(
      np.asarray(layers.Dropout(0.0).apply({}, x, deterministic=False)), x)


@pytest.mark.parametrize("name,attention,positions_from",
                         [(n, a, "end") for n in ("sasrec", "bert4rec") for a in ATTENTIONS]
                         + [("sasrec", "dot_product", "start"),
                            ("bert4rec", "dot_product", "start")])
def test_packed_rows_equal_separate_rows(name, attention, positions_from):
  """Sequences packed side by side (segment ids + positions) give their own outputs."""
  seq_len = 120  # two causal query blocks
  model = _model(name, attention, max_len=seq_len, positions_from=positions_from)
  lengths = [70, 30, 20, 120, 5, 1]
  item_seq = _left_padded(lengths, seq_len, seed=9)
  batch = {"item_seq": item_seq, "targets": item_seq, "user": np.zeros(6, np.int32),
           "negatives": item_seq[..., None]}
  packed = packing.pack_batch(batch, 4)
  assert packed["item_seq"].shape == (4, seq_len)  # 70+30+20 | 120 | 5+1 | (empty)
  params = _random_params(model, item_seq[:1], seed=3)
  alone = np.asarray(model.apply({"params": params}, item_seq))
  together = np.asarray(model.apply({"params": params}, packed["item_seq"],
                                    segment_ids=packed["segment_ids"],
                                    positions=packed["positions"]))
  row, end, _ = packing.pack_layout(np.asarray(lengths), seq_len)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(together[row[i], end[i] - n:end[i]], alone[i, seq_len - n:],
                               rtol=0, atol=2e-5)
  np.testing.assert_array_equal(together[packed["item_seq"] == 0], 0.0)
