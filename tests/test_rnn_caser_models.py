"""Tests of the recurrent, Caser and popularity models against their contracts.

Numerical references are float64 NumPy re-implementations written from the
equations; the models run in float32, and "relative error" below is
``max|model - reference| / max|reference|``, required to be < 1e-5.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax import models
from deeprec_jax.models import caser, item_embedding, popularity, rnn

RTOL = 1e-5  # float32 model vs float64 reference, relative to the largest value


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def randomize(params, seed: int, scale: float = 0.5):
  """Every parameter redrawn from N(0, scale²): biases and peepholes non-zero too."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (scale * rng.normal(size=p.shape)).astype(np.float32), params)


def init_params(model: nn.Module, item_seq, **kwargs):
  """``model.init(...)['params']``.

  Not jitted on purpose: eagerly, each initialiser op compiles once for the
  whole file, while a jitted init compiles every model's RNG graph anew.
  """
  return model.init(jax.random.key(0), item_seq, **kwargs)["params"]


def count_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------
# PeepholeLSTMCell
# --------------------------------------------------------------------------


def peephole_weights(cell_params) -> dict[str, np.ndarray]:
  """Maps the cell's parameters to the named matrices of the equations (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), cell_params)
  hidden = p["recurrent_kernel"].shape[0]
  weights = {}
  for index, gate in enumerate(rnn.GATE_ORDER):
    block = slice(index * hidden, (index + 1) * hidden)
    weights[f"W_x{gate}"] = p["input_kernel"][:, block]  # x @ W_x·
    weights[f"W_h{gate}"] = p["recurrent_kernel"][:, block]  # h @ W_h·
    weights[f"b_{gate}"] = p["bias"][block]
  for gate in ("i", "f", "o"):
    weights[f"W_c{gate}"] = p[f"peephole_{gate}"]  # diagonal: element-wise
  return weights


def peephole_reference(w, xs, c, h):
  """The five equations, step by step. xs [B, T, in]; returns hs [B, T, H], c_T."""
  hs = []
  for t in range(xs.shape[1]):
    x = xs[:, t]
    i = sigmoid(x @ w["W_xi"] + h @ w["W_hi"] + w["W_ci"] * c + w["b_i"])
    f = sigmoid(x @ w["W_xf"] + h @ w["W_hf"] + w["W_cf"] * c + w["b_f"])
    c = f * c + i * np.tanh(x @ w["W_xc"] + h @ w["W_hc"] + w["b_c"])
    o = sigmoid(x @ w["W_xo"] + h @ w["W_ho"] + w["W_co"] * c + w["b_o"])  # new c
    h = o * np.tanh(c)
    hs.append(h)
  return np.stack(hs, axis=1), c


@pytest.mark.parametrize("params_kind", ["initialised", "randomized"])
def test_peephole_cell_matches_numpy_equations(params_kind):
  batch, steps, in_features, features = 3, 7, 5, 4
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(batch, steps, in_features)).astype(np.float32)
  carry = tuple(rng.normal(size=(batch, features)).astype(np.float32) for _ in range(2))
  layer = nn.RNN(rnn.PeepholeLSTMCell(features), return_carry=True)
  params = layer.init(jax.random.key(1), xs, initial_carry=carry)["params"]
  if params_kind == "randomized":
    params = randomize(params, seed=2)
  (c_last, _), hs = layer.apply({"params": params}, xs, initial_carry=carry)

  w = peephole_weights(params["cell"])
  ref_hs, ref_c = peephole_reference(w, xs.astype(np.float64), *(
      a.astype(np.float64) for a in carry))
  assert hs.shape == (batch, steps, features)
  assert relative_error(hs, ref_hs) < RTOL
  assert relative_error(c_last, ref_c) < RTOL


def test_peephole_cell_output_gate_reads_the_new_cell_state():
  # Only b_c and the output peephole w_co are non-zero, so one step from c0
  # gives i = f = 1/2, c1 = c0 / 2 + tanh(b_c) / 2 and o = σ(w_co ⊙ c), where c
  # must be c1, not c0.
  features = 3
  cell = rnn.PeepholeLSTMCell(features)
  c0 = jnp.array([[2.0, -2.0, 1.0]])
  h0 = jnp.array([[0.3, 0.1, -0.2]])
  x = jnp.ones((1, 2))
  params = jax.tree.map(jnp.zeros_like, cell.init(jax.random.key(0), (c0, h0), x)["params"])
  b_c = np.array([-2.0, 2.0, -1.0])
  w_co = np.array([3.0, 3.0, 3.0])
  params["bias"] = params["bias"].at[2 * features:3 * features].set(b_c)
  params["peephole_o"] = jnp.asarray(w_co, jnp.float32)
  (c1, h1), out = cell.apply({"params": params}, (c0, h0), x)

  expected_c1 = 0.5 * np.asarray(c0) + 0.5 * np.tanh(b_c)
  np.testing.assert_allclose(c1, expected_c1, rtol=1e-6)
  np.testing.assert_allclose(h1, sigmoid(w_co * expected_c1) * np.tanh(expected_c1), rtol=1e-6)
  with_old_cell = sigmoid(w_co * np.asarray(c0)) * np.tanh(expected_c1)
  assert np.abs(np.asarray(h1) - with_old_cell).min() > 1e-2
  np.testing.assert_array_equal(out, h1)


# --------------------------------------------------------------------------
# RNN model
# --------------------------------------------------------------------------

NUM_ITEMS, NUM_USERS, DIM = 9, 4, 6


def rnn_model(cell: str = "gru", **kwargs) -> rnn.Model:
  kwargs = dict(dim=DIM, cell=cell) | kwargs
  return rnn.Model(num_items=NUM_ITEMS, num_users=NUM_USERS, max_len=12, **kwargs)


def rnn_param_count(cell: str, num_items: int, dim: int, num_layers: int) -> int:
  """Hand formula: item table + per layer (input width = hidden width = dim)."""
  per_layer = {
      # input [d, 4d] + recurrent [d, 4d] + bias 4d + peepholes 3d
      "peephole_lstm": 8 * dim * dim + 7 * dim,
      # flax OptimizedLSTMCell: 4 input [d, d] + 4 recurrent [d, d] + 4 biases d
      "lstm": 8 * dim * dim + 4 * dim,
      # flax GRUCell: 3 input [d, d] + 3 biases d + 3 recurrent [d, d] + b_hn d
      "gru": 6 * dim * dim + 4 * dim,
  }[cell]
  return item_embedding.table_rows(num_items + 1) * dim + num_layers * per_layer


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_rnn_shapes_param_count_causality_and_left_padding(cell):
  model = rnn_model(cell, num_layers=2)
  rng = np.random.default_rng(0)
  real = rng.integers(1, NUM_ITEMS + 1, size=(3, 6)).astype(np.int32)
  seq = np.pad(real, ((0, 0), (2, 0)))  # L = 8, two padding slots
  params = init_params(model, seq)
  assert count_params(params) == rnn_param_count(cell, NUM_ITEMS, DIM, num_layers=2)
  # A non-zero padding row must not matter either.
  params["item_embed"]["embedding"] = params["item_embed"]["embedding"].at[0].set(5.0)
  apply = jax.jit(lambda s: model.apply({"params": params}, s))

  hidden = np.asarray(apply(seq))
  assert hidden.shape == (3, 8, DIM) and hidden.dtype == np.float32
  np.testing.assert_array_equal(hidden[:, :2], 0.0)  # padded positions

  # Causality: items after t do not change hidden[:, :t + 1] (and do change later ones).
  t = 4
  changed = seq.copy()
  changed[:, t + 1:] = (changed[:, t + 1:] % NUM_ITEMS) + 1
  hidden_changed = np.asarray(apply(changed))
  np.testing.assert_allclose(hidden_changed[:, :t + 1], hidden[:, :t + 1], rtol=1e-6, atol=1e-7)
  assert np.abs(hidden_changed[:, t + 1:] - hidden[:, t + 1:]).max() > 1e-4

  # Left padding: the same items padded to L + 5 give the same hidden states.
  longer = np.pad(real, ((0, 0), (7, 0)))
  hidden_longer = np.asarray(apply(longer))
  np.testing.assert_allclose(hidden_longer[:, -6:], hidden[:, -6:], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(hidden_longer[:, :7], 0.0)


@pytest.mark.slow  # ~70 s for the three cells; float32 gradients: test_gradient_equality.py.
@pytest.mark.parametrize("cell", rnn.CELLS)
def test_rnn_jit_grad_no_nan_float32_and_bfloat16(cell):
  seq = jnp.array([[0, 0, 3, 1, 4], [1, 5, 9, 2, 6]], jnp.int32)
  for dtype in ("float32", "bfloat16"):
    model = rnn_model(cell, dtype=dtype, dropout_rate=0.3)
    params = init_params(model, seq)

    def loss_fn(params, model=model):
      hidden = model.apply({"params": params}, seq, deterministic=False,
                           rngs={"dropout": jax.random.key(1)})
      # Scored against real items only, as a ranker masks the padding row.
      scores = hidden @ models.item_table(params, NUM_ITEMS)[1:].T  # [B, L, N]
      return jax.nn.logsumexp(scores, axis=-1).mean(), hidden

    # jit outside grad: one compiled program for forward and backward.
    (loss, hidden), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert hidden.shape == (2, 5, DIM) and hidden.dtype == jnp.float32
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), dtype
    # The padding input never reaches the loss: its embedding row gets no gradient.
    np.testing.assert_array_equal(grads["item_embed"]["embedding"][0], 0.0)


@pytest.mark.parametrize("field, value", [
    ("cell", "transformer"), ("num_layers", 0), ("dropout_rate", 1.0), ("dim", 0),
    ("dtype", "float16")])
def test_rnn_rejects_bad_config(field, value):
  with pytest.raises(ValueError, match=f"model.{field}"):
    rnn_model(**{field: value})


# --------------------------------------------------------------------------
# Caser
# --------------------------------------------------------------------------

ACTIVATIONS_NP = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh, "sigmoid": sigmoid,
                  "identity": lambda x: x}


def caser_reference(params, item_seq, user, *, act_conv="relu", act_fc="relu"):
  """Caser's eval-mode forward pass in float64, with explicit loops over windows."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, length = item_seq.shape
  image = p["item_embed"]["embedding"][item_seq]  # [B, L, d]
  image = image * (item_seq > 0)[..., None]  # padding rows are zero rows
  features = []
  if "vertical" in p:
    # Filter k: c̃^k = Σ_l F̃^k_l E_l + b_k over each column, flattened filter-major.
    weights, bias = p["vertical"]["kernel"], p["vertical"]["bias"]  # [L, n_v], [n_v]
    vertical = np.stack([
        np.einsum("bld,l->bd", image, weights[:, k]) + bias[k]
        for k in range(weights.shape[1])], axis=1)  # [B, n_v, d]
    features.append(vertical.reshape(batch, -1))
  for height in range(1, length + 1):
    if f"horizontal_{height}" not in p:
      continue
    weights = p[f"horizontal_{height}"]["kernel"]  # [h, d, n_h]
    bias = p[f"horizontal_{height}"]["bias"]
    windows = [np.einsum("bhd,hdk->bk", image[:, i:i + height], weights) + bias
               for i in range(length - height + 1)]
    features.append(ACTIVATIONS_NP[act_conv](np.stack(windows, axis=1)).max(axis=1))
  features = np.concatenate(features, axis=-1)
  z = ACTIVATIONS_NP[act_fc](features @ p["fc"]["kernel"] + p["fc"]["bias"])
  joint = np.concatenate([z, p["user_embed"]["embedding"][user]], axis=-1)
  return joint @ p["output"]["kernel"] + p["output"]["bias"]


def caser_param_count(num_items, num_users, length, dim, num_h, num_v) -> int:
  """Hand formula for Caser's parameters."""
  embeddings = item_embedding.table_rows(num_items + 1) * dim + num_users * dim
  horizontal = num_h * dim * length * (length + 1) // 2 + num_h * length  # sum_h h*d*n_h + biases
  vertical = (length * num_v + num_v) if num_v else 0
  fc = (num_h * length + num_v * dim) * dim + dim
  output = 2 * dim * dim + dim
  return embeddings + horizontal + vertical + fc + output


CASER_L, CASER_DIM, CASER_ITEMS, CASER_USERS = 4, 6, 3, 2


def caser_model(**kwargs) -> caser.Model:
  kwargs = dict(num_horizontal=2, num_vertical=2, dim=CASER_DIM) | kwargs
  return caser.Model(num_items=CASER_ITEMS, num_users=CASER_USERS, max_len=CASER_L, **kwargs)


CASER_SEQ = np.array([[0, 0, 1, 3], [2, 1, 3, 3], [0, 3, 2, 1]], np.int32)
CASER_USER = np.array([1, 0, 1], np.int32)


@pytest.mark.parametrize("num_h, num_v, act_conv, act_fc", [
    (2, 2, "relu", "relu"), (2, 2, "tanh", "sigmoid"), (2, 0, "relu", "relu"),
    (0, 2, "relu", "tanh")])
def test_caser_matches_numpy_reference_and_param_formula(num_h, num_v, act_conv, act_fc):
  model = caser_model(num_horizontal=num_h, num_vertical=num_v, activation_conv=act_conv,
                      activation_fc=act_fc)
  params = init_params(model, CASER_SEQ, user=CASER_USER)
  assert count_params(params) == caser_param_count(CASER_ITEMS, CASER_USERS, CASER_L,
                                                   CASER_DIM, num_h, num_v)
  # Random biases and a non-zero padding row, so that every term is exercised.
  params = randomize(params, seed=3)
  hidden = model.apply({"params": params}, CASER_SEQ, user=CASER_USER)
  assert hidden.shape == (3, CASER_DIM) and hidden.dtype == jnp.float32
  expected = caser_reference(params, CASER_SEQ, CASER_USER, act_conv=act_conv, act_fc=act_fc)
  assert relative_error(hidden, expected) < RTOL


def test_caser_padding_rows_read_as_zero_and_only_window_and_user_matter():
  model = caser_model()
  params = randomize(init_params(model, CASER_SEQ, user=CASER_USER), 4)
  apply = jax.jit(lambda params, seq, user: model.apply({"params": params}, seq, user=user))
  hidden = apply(params, CASER_SEQ, CASER_USER)

  # Padding: whatever the padding row holds, a padded window reads it as a
  # zero row of the image (the reference builds the image with zero rows).
  for row in (0.0, 7.0):
    table = params["item_embed"]["embedding"].copy()
    table[0] = row
    params_row = dict(params, item_embed={"embedding": table})
    np.testing.assert_array_equal(apply(params_row, CASER_SEQ, CASER_USER), hidden)

  # A window is the last L items of a longer history: what came before does
  # not matter, so different histories with the same window agree.
  histories = np.array([[3, 3, 1, 2, 1, 3, 3], [1, 2, 2, 2, 1, 3, 3]], np.int32)
  windows = histories[:, -CASER_L:]
  direct = np.array([[2, 1, 3, 3], [2, 1, 3, 3]], np.int32)
  user = np.array([0, 0], np.int32)
  np.testing.assert_array_equal(apply(params, windows, user), apply(params, direct, user))
  # ... while every slot of the window, and the user, does matter.
  base = apply(params, direct[:1], user[:1])
  for slot in range(CASER_L):
    moved = direct[:1].copy()
    moved[0, slot] = moved[0, slot] % CASER_ITEMS + 1
    assert np.abs(apply(params, moved, user[:1]) - base).max() > 1e-4, slot
  assert np.abs(apply(params, direct[:1], user[:1] + 1) - base).max() > 1e-4


@pytest.mark.slow  # ~38 s on 2 busy cores, mostly the bfloat16 compile.
def test_caser_jit_grad_no_nan_float32_and_bfloat16():
  for dtype in ("float32", "bfloat16"):
    model = caser_model(dtype=dtype)
    params = init_params(model, CASER_SEQ, user=CASER_USER)

    def loss_fn(params, model=model):
      hidden = model.apply({"params": params}, CASER_SEQ, user=CASER_USER, deterministic=False,
                           rngs={"dropout": jax.random.key(1)})
      table = models.item_table(params, CASER_ITEMS)
      return jax.nn.logsumexp(hidden @ table.T, -1).mean(), hidden

    # jit outside grad: one compiled program for forward and backward.
    (loss, hidden), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert hidden.shape == (3, CASER_DIM) and hidden.dtype == jnp.float32
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), dtype


def test_caser_rejects_bad_config_and_inputs():
  with pytest.raises(ValueError, match="model.num_horizontal and model.num_vertical"):
    caser_model(num_horizontal=0, num_vertical=0)
  with pytest.raises(ValueError, match="model.activation_fc"):
    caser_model(activation_fc="swish")
  model = caser_model()
  with pytest.raises(ValueError, match="user"):
    model.init(jax.random.key(0), CASER_SEQ)
  with pytest.raises(ValueError, match="max_len"):
    model.init(jax.random.key(0), CASER_SEQ[:, 1:], user=CASER_USER)


# --------------------------------------------------------------------------
# Popularity
# --------------------------------------------------------------------------


def test_popularity_ranks_by_count_then_id():
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 4, size=301)  # many ties, incl. never-seen items
  counts[[5, 9]] = [10**7 + 1, 10**7]  # float32 cannot tell their log1p apart
  counts[0] = 0
  params = popularity.fit_params(counts)
  stored = params["item_embed"]["embedding"]
  assert stored.shape == (item_embedding.table_rows(301), 1) and stored.dtype == np.float32
  np.testing.assert_array_equal(stored[301:], 0.0)  # the table's padding rows
  table = np.asarray(models.item_table(params, 300))

  model = popularity.Model(num_items=300, num_users=2, max_len=3)
  seq = jnp.array([[0, 4, 7]], jnp.int32)
  assert count_params(init_params(model, seq)) == item_embedding.table_rows(301)  # N + 1, padded
  hidden = model.apply({"params": params}, seq)
  assert hidden.shape == (1, 3, 1)
  scores = np.asarray(hidden[0, -1] @ jnp.asarray(table).T)  # scored as every model is

  ids = np.arange(1, 301)
  expected = ids[np.lexsort((ids, -counts[1:]))]
  np.testing.assert_array_equal(np.argsort(-scores[1:], kind="stable") + 1, expected)
  assert len(np.unique(scores)) == 301  # no ties left, padding included
  assert scores[0] < scores[1:].min()
  np.testing.assert_allclose(table[1:, 0], np.log1p(counts[1:]), rtol=1e-5, atol=1e-30)
