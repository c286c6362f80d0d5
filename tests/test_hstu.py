"""Tests of HSTU (deeprec_jax/models/hstu.py) and its configs.

The references are float64 NumPy, written here from the equations of the
module docstring (not from the JAX code), on random parameters with the
structure of the initialized ones (every weight, bias, rab entry and the final
layer norm's scale and offset drawn at random), with left-padded rows of
different lengths. Tolerance: ``max|jax - ref| <= 1e-5 * max|ref|`` in float32
(float32 eps is 1.2e-7; a layer is a few dozen roundings deep, and the layer
norm of the attention output divides by a standard deviation that may be small;
measured: 2e-7 to 3e-7 for a layer and for the model).

Everything runs eagerly on tiny sizes except two jitted gradients and the
tiny training run (about 30 s of CPU time in all, half of it the training
run).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax import models, train
from deeprec_jax.data import packing
from deeprec_jax.models import hstu, item_embedding, layers
from deeprec_jax.serving import exporter
from experiments.configs import hstu as hstu_config
from experiments.configs import tiny

NUM_ITEMS = 13
DIM = 8
MAX_LEN = 10
RTOL = 1e-5


# ----------------------------------------------------------------------------
# Helpers and float64 NumPy references.
# ----------------------------------------------------------------------------


def _random_params(module, *args, seed=0, scale=0.4, **kwargs):
  """Float32 params with ``module.init``'s structure, every entry ``scale * N(0, 1)``.

  Layer-norm scales are ``1 + scale * N(0, 1)``. The structure comes from
  ``jax.eval_shape`` (nothing is compiled).
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
    return (base + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(out - ref)) / np.max(np.abs(ref))


def _left_padded(lengths, seq_len, seed=0):
  """int32[len(lengths), seq_len]: random items 1..NUM_ITEMS, left-padded with 0."""
  rng = np.random.default_rng(seed)
  seq = np.zeros((len(lengths), seq_len), np.int32)
  for row, n in enumerate(lengths):
    if n:
      seq[row, -n:] = rng.integers(1, NUM_ITEMS + 1, n)
  return seq


def _model(**kwargs):
  fields = dict(num_items=NUM_ITEMS, num_users=5, max_len=MAX_LEN, dim=DIM, num_blocks=2,
                num_heads=2, qk_dim=3, v_dim=5, dropout_rate=0.2)
  fields.update(kwargs)
  return hstu.Model(**fields)


def np_silu(x):
  return x / (1.0 + np.exp(-x))


def np_layer_norm(x, p=None, eps=hstu.EPSILON):
  mean = x.mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  return y if p is None else y * p["scale"] + p["bias"]


def np_time_bucket(gap, num_buckets):
  """min(floor(ln(max(|gap|, 1)) / 0.301), T), one gap at a time (float64)."""
  return min(int(np.floor(np.log(max(abs(float(gap)), 1.0)) / 0.301)), num_buckets)


def np_hstu_layer(x, valid, p, heads, qk_dim, v_dim, max_len, times=None):
  """One HSTU layer, loops over rows, heads, queries and keys (float64).

  U, V, Q, K = split(SiLU(LN(x) W_1 + b_1)); a_ij = SiLU(q_i . k_j + rab[i - j]
  [+ rab_t[bucket(query_time_i - time_j)]]) / max_len for real keys j <= i;
  y = x + (LN(sum_j a_ij v_j) * U) W_2 + b_2, zero at padding. ``times``:
  ``(time_seq, query_time)`` for the time bias ``p['time_bias']``.
  """
  batch, seq_len, _ = x.shape
  uvqk = np_silu(np_layer_norm(x) @ p["uvqk"]["kernel"] + p["uvqk"]["bias"])
  u = uvqk[..., :heads * v_dim]
  v = uvqk[..., heads * v_dim:2 * heads * v_dim].reshape(batch, seq_len, heads, v_dim)
  q = uvqk[..., 2 * heads * v_dim:2 * heads * v_dim + heads * qk_dim]
  k = uvqk[..., 2 * heads * v_dim + heads * qk_dim:]
  q = q.reshape(batch, seq_len, heads, qk_dim)
  k = k.reshape(batch, seq_len, heads, qk_dim)
  out = np.zeros((batch, seq_len, heads, v_dim))
  for b in range(batch):
    for h in range(heads):
      for i in range(seq_len):
        for j in range(i + 1):
          if valid[b, j]:
            bias = p["rel_bias"][h, min(i - j, max_len - 1)]
            if times is not None:
              time_seq, query_time = times
              num_buckets = p["time_bias"].shape[1] - 1
              bias += p["time_bias"][h, np_time_bucket(query_time[b, i] - time_seq[b, j],
                                                       num_buckets)]
            weight = np_silu(q[b, i, h] @ k[b, j, h] + bias) / max_len
            out[b, i, h] += weight * v[b, j, h]
  out = out.reshape(batch, seq_len, heads * v_dim)
  y = (np_layer_norm(out) * u) @ p["out"]["kernel"] + p["out"]["bias"]
  return (x + y) * valid[..., None]


def np_hstu(seq, p, num_blocks, heads, qk_dim, v_dim, max_len, l2_norm=False, times=None):
  """The whole model in eval mode: embeddings, layers, final layer norm (float64).

  ``l2_norm``: the output is L2-normalized instead of layer-normed; ``times``
  as in ``np_hstu_layer``.
  """
  valid = seq != 0
  dim = p["item_embed"]["embedding"].shape[1]
  x = p["item_embed"]["embedding"][seq] * np.sqrt(dim)
  x = (x + p["pos_embed"]["embedding"][max_len - seq.shape[1]:][None]) * valid[..., None]
  for i in range(num_blocks):
    x = np_hstu_layer(x, valid, p[f"block_{i}"], heads, qk_dim, v_dim, max_len, times)
  if l2_norm:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-6) * valid[..., None]
  return np_layer_norm(x, p["final_ln"]) * valid[..., None]


# ----------------------------------------------------------------------------
# Against the references.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("heads,qk_dim,v_dim", [(1, 8, 8), (2, 3, 5)])
def test_layer_matches_numpy(heads, qk_dim, v_dim):
  """One HSTULayer (eval mode) vs float64 NumPy; the last-only row equals the last row."""
  rng = np.random.default_rng(1)
  valid = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], bool)
  x = (rng.standard_normal((3, 6, DIM)) * valid[..., None]).astype(np.float32)
  layer = hstu.HSTULayer(num_heads=heads, qk_dim=qk_dim, v_dim=v_dim, max_len=MAX_LEN,
                         dropout_rate=0.5)
  params = _random_params(layer, x, valid, seed=1)
  assert params["rel_bias"].shape == (heads, MAX_LEN)
  out = layer.apply({"params": params}, x, valid)
  ref = np_hstu_layer(np.float64(x), valid, _f64(params), heads, qk_dim, v_dim, MAX_LEN)
  assert out.shape == (3, 6, DIM) and out.dtype == jnp.float32
  assert _rel_err(out, ref) < RTOL
  np.testing.assert_array_equal(np.asarray(out)[~valid], 0.0)
  last = layer.apply({"params": params}, x, valid, last_only=True)
  np.testing.assert_allclose(np.asarray(last), np.asarray(out)[:, -1:], rtol=0, atol=1e-6)


def test_model_matches_numpy():
  """The whole model (2 layers, 2 heads, d_qk != d_v) vs float64 NumPy, hidden and scores."""
  model = _model()
  seq = _left_padded([6, 4, 1], 6, seed=2)
  params = _random_params(model, seq, seed=2)
  hidden = model.apply({"params": params}, seq)
  assert hidden.shape == (3, 6, DIM) and hidden.dtype == jnp.float32
  p = _f64(params)
  ref = np_hstu(seq, p, 2, 2, 3, 5, MAX_LEN)
  assert _rel_err(hidden, ref) < RTOL
  table = models.item_table(params, NUM_ITEMS)
  assert table.shape == (NUM_ITEMS + 1, DIM)
  ref_scores = ref @ p["item_embed"]["embedding"][:NUM_ITEMS + 1].T
  assert _rel_err(hidden @ table.T, ref_scores) < RTOL
  np.testing.assert_array_equal(np.asarray(hidden)[seq == 0], 0.0)


def _timestamps(seq, seed=0):
  """(time_seq, query_time) int32: increasing times at real items, gaps of 0-60 s.

  The gaps straddle every bucket of T = 6 (bucket 6 holds gaps >= e^1.806 =
  6.1 s), so the clamp is exercised; padding slots hold arbitrary times.
  """
  rng = np.random.default_rng(seed)
  gaps = rng.choice([0, 1, 2, 3, 5, 9, 20, 60], size=(seq.shape[0], seq.shape[1] + 1))
  times = 1_000_000 + np.cumsum(gaps, axis=1)
  time_seq = np.where(seq != 0, times[:, :-1], rng.integers(0, 99, seq.shape))
  return time_seq.astype(np.int32), times[:, 1:].astype(np.int32)


def test_time_bias_matches_numpy():
  """model.time_buckets: the bucketed time bias vs float64 NumPy; last_only; it matters."""
  model = _model(time_buckets=6)
  seq = _left_padded([6, 4, 1], 6, seed=3)
  time_seq, query_time = _timestamps(seq, seed=3)
  params = _random_params(model, seq, time_seq=time_seq, query_time=query_time, seed=3)
  assert params["block_0"]["time_bias"].shape == (2, 7)
  hidden = model.apply({"params": params}, seq, time_seq=time_seq, query_time=query_time)
  ref = np_hstu(seq, _f64(params), 2, 2, 3, 5, MAX_LEN, times=(time_seq, query_time))
  assert _rel_err(hidden, ref) < RTOL
  last = model.apply({"params": params}, seq, time_seq=time_seq, query_time=query_time,
                     last_only=True)
  np.testing.assert_allclose(np.asarray(last), np.asarray(hidden)[:, -1:], rtol=0, atol=1e-6)
  # Padding slots' times do not matter; a real item's time does.
  time_seq2 = np.where(seq != 0, time_seq, 7)
  np.testing.assert_allclose(
      model.apply({"params": params}, seq, time_seq=time_seq2, query_time=query_time),
      hidden, rtol=0, atol=1e-6)
  earlier = query_time.copy()
  earlier[0, -1] = time_seq[0, 0]  # the first key's gap 0 (bucket 0) instead of the last bucket
  assert np_time_bucket(query_time[0, -1] - time_seq[0, 0], 6) == 6
  moved = np.asarray(model.apply({"params": params}, seq, time_seq=time_seq,
                                 query_time=earlier))
  assert np.abs(moved[0, -1] - np.asarray(hidden)[0, -1]).max() > 1e-3
  with pytest.raises(ValueError, match="time_seq and query_time"):
    model.apply({"params": params}, seq)


def test_time_bias_model_is_not_exported():
  """The serving signature has no timestamps: export refuses such a model, naming the key."""
  with pytest.raises(ValueError, match="model.time_buckets"):
    exporter.export_function(_model(time_buckets=4), {}, num_items=NUM_ITEMS, max_len=MAX_LEN,
                             top_k=3)


def test_l2_norm_gives_cosine_scores():
  """model.l2_norm: unit output (no final layer norm) and unit item vectors: cosines."""
  model = _model(l2_norm=True)
  seq = _left_padded([6, 4, 1], 6, seed=2)
  params = _random_params(model, seq, seed=2)
  assert "final_ln" not in params
  hidden = model.apply({"params": params}, seq)
  p = _f64(params)
  ref = np_hstu(seq, p, 2, 2, 3, 5, MAX_LEN, l2_norm=True)
  assert _rel_err(hidden, ref) < RTOL
  vectors = np.asarray(models.item_vectors(model, params, NUM_ITEMS))
  table = p["item_embed"]["embedding"][:NUM_ITEMS + 1]
  unit = table / np.linalg.norm(table, axis=-1, keepdims=True)
  np.testing.assert_allclose(vectors, unit, rtol=1e-5)
  assert _rel_err(np.asarray(hidden) @ vectors.T, ref @ unit.T) < RTOL


# ----------------------------------------------------------------------------
# Causality and padding.
# ----------------------------------------------------------------------------


def test_is_causal():
  """Changing the items after position t leaves hidden[:, :t + 1] unchanged."""
  model = _model()
  seq = _left_padded([6, 4, 2], 6, seed=4)
  params = _random_params(model, seq, seed=4)
  hidden = np.asarray(model.apply({"params": params}, seq))
  for t in (1, 4):
    changed = seq.copy()
    changed[:, t + 1:] = seq[:, t + 1:] % NUM_ITEMS + 1  # differs everywhere after t
    hidden_changed = np.asarray(model.apply({"params": params}, changed))
    np.testing.assert_allclose(hidden_changed[:, :t + 1], hidden[:, :t + 1], rtol=0, atol=1e-6)
    assert np.abs(hidden_changed[0, t + 1:] - hidden[0, t + 1:]).max() > 1e-3  # power


def test_padding_invariance_and_padding_content():
  """Real positions ignore the amount of left padding and whatever sits at padding.

  The same rows padded to 6 and to 10 give the same states at real positions
  (constant normalizer n = max_len, right-aligned positions, relative bias).
  Then the padding row of the item table and the positional rows of padded
  slots are replaced by large random values: nothing changes at real positions
  (padding is masked as keys and zeroed after each layer), while the same
  perturbation changes a row whose items occupy those slots.
  """
  model = _model()
  short = _left_padded([6, 3, 1], 6, seed=6)
  long = np.concatenate([np.zeros((3, 4), np.int32), short], axis=1)
  params = _random_params(model, short, seed=6)
  h_short = np.asarray(model.apply({"params": params}, short))
  h_long = np.asarray(model.apply({"params": params}, long))
  real = short != 0
  np.testing.assert_allclose(h_long[:, 4:][real], h_short[real], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(h_long[:, :4], 0.0)
  np.testing.assert_array_equal(h_short[~real], 0.0)

  rng = np.random.default_rng(7)
  noisy = jax.tree.map(np.array, params)
  noisy["item_embed"]["embedding"][0] = 30.0 * rng.standard_normal(DIM)
  noisy["pos_embed"]["embedding"][:MAX_LEN - 2] += 30.0 * rng.standard_normal(
      (MAX_LEN - 2, DIM))  # every slot but the last two of a length-10 row
  two = _left_padded([2, 10], MAX_LEN, seed=7)
  clean = np.asarray(model.apply({"params": params}, two))
  dirty = np.asarray(model.apply({"params": noisy}, two))
  np.testing.assert_allclose(dirty[0], clean[0], rtol=0, atol=1e-6)
  assert np.abs(dirty[1] - clean[1]).max() > 1e-3  # row 1 has items in the perturbed slots


def test_packed_rows_equal_separate_rows():
  """Sequences packed side by side give their own outputs; last_only is the last row.

  L = 100 runs the causal attention in two query blocks.
  """
  seq_len = 100
  assert len(layers.query_blocks(seq_len, seq_len, causal=True)) == 2
  model = _model(max_len=seq_len, num_blocks=1)
  lengths = [60, 25, 15, 100, 5, 1]
  item_seq = _left_padded(lengths, seq_len, seed=9)
  batch = {"item_seq": item_seq, "targets": item_seq, "user": np.zeros(6, np.int32),
           "negatives": item_seq[..., None]}
  packed = packing.pack_batch(batch, 4)
  assert packed["item_seq"].shape == (4, seq_len)  # 60+25+15 | 100 | 5+1 | (empty)
  params = _random_params(model, item_seq[:1], seed=3)
  alone = np.asarray(model.apply({"params": params}, item_seq))
  together = np.asarray(model.apply({"params": params}, packed["item_seq"],
                                    **packing.packing_kwargs(packed)))
  row, end, _ = packing.pack_layout(np.asarray(lengths), seq_len)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(together[row[i], end[i] - n:end[i]], alone[i, seq_len - n:],
                               rtol=0, atol=2e-5)
  np.testing.assert_array_equal(together[packed["item_seq"] == 0], 0.0)
  last = np.asarray(model.apply({"params": params}, item_seq, last_only=True))
  assert last.shape == (6, 1, DIM)
  np.testing.assert_allclose(last, alone[:, -1:], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------
# Gradients, dtypes, parameter count, fields, configs, training.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jit_grad(dtype):
  """jit(value_and_grad) of a softmax loss in training mode is finite; dropout is seeded."""
  model = _model(dtype=dtype, dropout_rate=0.3, num_blocks=1)
  seq = jnp.asarray(_left_padded([6, 4, 2], 6, seed=9))
  targets = jnp.asarray(_left_padded([6, 4, 2], 6, seed=10))
  params = _random_params(model, seq, seed=5, scale=0.3)

  # Optimization level 0 compiles faster; the values do not depend on it.
  @jax.jit(compiler_options={"xla_backend_optimization_level": 0})
  def loss_and_grad(params, rng):
    def loss_fn(params):
      hidden = model.apply({"params": params}, seq, deterministic=False, rngs={"dropout": rng})
      logp = jax.nn.log_softmax(hidden @ models.item_table(params, NUM_ITEMS).T)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return jnp.sum(nll * (targets != 0)) / jnp.sum(targets != 0)
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = loss_and_grad(params, jax.random.key(1, impl="rbg"))
  loss2, _ = loss_and_grad(params, jax.random.key(2, impl="rbg"))
  assert np.isfinite(loss) and loss != loss2  # dropout is active and follows the RNG
  assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))
  block = grads["block_0"]
  for name in ("uvqk", "out"):
    assert np.abs(block[name]["kernel"]).max() > 0, name
  assert np.abs(block["rel_bias"]).max() > 0


def test_bfloat16_close_to_float32():
  """bfloat16 compute gives finite float32 states near float32's (8 mantissa bits).

  Allowed: 0.15 on any entry, 0.02 on average, through two layer-normed
  layers of unit-scale activations (measured 0.03 and 0.004).
  """
  model = _model()
  seq = _left_padded([6, 4, 2], 6, seed=9)
  params = _random_params(model, seq, seed=9, scale=0.3)
  h32 = np.asarray(model.apply({"params": params}, seq))
  h16 = model.clone(dtype="bfloat16").apply({"params": params}, seq)
  assert h16.dtype == jnp.float32
  err = np.abs(np.asarray(h16) - h32)
  assert np.isfinite(err).all() and err.max() < 0.15 and err.mean() < 0.02, (
      err.max(), err.mean())


@pytest.mark.parametrize("heads,qk_dim,v_dim", [(1, None, None), (2, 3, 5), (3, 2, 4)])
def test_parameter_count(heads, qk_dim, v_dim):
  """table_rows(N + 1) d + L d + B [d w + w + h d_v d + d + h L] + 2d, w = 2h(d_qk + d_v)."""
  blocks, d, n, max_len = 3, DIM, NUM_ITEMS, MAX_LEN
  model = _model(num_blocks=blocks, num_heads=heads, qk_dim=qk_dim, v_dim=v_dim)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((2, 7), jnp.int32))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  dqk, dv = model.head_dims
  assert (dqk, dv) == ((qk_dim, v_dim) if qk_dim else (d, d))
  w = 2 * heads * (dqk + dv)
  layer = d * w + w + heads * dv * d + d + heads * max_len
  assert count == item_embedding.table_rows(n + 1) * d + max_len * d + blocks * layer + 2 * d
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize("field,value", [
    ("dim", 0), ("num_blocks", -1), ("num_heads", 0), ("num_heads", 3), ("qk_dim", 0),
    ("v_dim", 2.5), ("dropout_rate", 1.0), ("dtype", "float16"), ("num_items", 0),
])
def test_bad_fields_raise(field, value):
  overrides = {field: value}
  if field == "num_heads":
    overrides.update(qk_dim=None)  # 3 heads do not divide dim = 8 without explicit widths
  with pytest.raises(ValueError, match=rf"model\.{field}"):
    _model(**overrides)


def test_too_long_sequence_raises():
  model = _model(max_len=4)
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 5), jnp.int32))


def test_configs():
  """The base and large ML-1M variants, and the placeholder widths take overrides."""
  base = hstu_config.get_config("ml-1m")
  large = hstu_config.get_config("ml-1m,large")
  for config in (base, large):
    assert (config.model.name, config.model.dim, config.model.dropout_rate) == ("hstu", 50, 0.2)
    assert (config.data.max_len, config.train.learning_rate) == (200, 1e-3)
    assert (config.train.loss, config.train.num_negatives) == ("sampled_softmax", 128)
  dims = lambda c: models.create_model(c.model, num_items=5, num_users=1, max_len=200).head_dims
  assert (base.model.num_blocks, base.model.num_heads, dims(base)) == (2, 1, (50, 50))
  assert (large.model.num_blocks, large.model.num_heads, dims(large)) == (8, 2, (25, 25))
  base.lock()
  base.model.qk_dim = 25  # a None field that accepts an int override
  assert dims(base) == (25, 50)
  with pytest.raises(ValueError, match="variant"):
    hstu_config.get_config("ml-1m,huge")


def test_tiny_training_run(tmp_path):
  """tiny.py:hstu with the time bias trains (packed, timed batches) to finite metrics.

  The model raises without timestamps, so this is also the timed batches'
  path through the trainer and the evaluation.
  """
  config = tiny.get_config("hstu")
  config.model.time_buckets = 8
  assert config.model.name == "hstu" and models.spec("hstu").packs and config.train.pack
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  for split in ("valid", "test"):
    for name in ("hr@10", "ndcg@10", "sampled_ndcg@10"):
      value = results[f"{split}/{name}"]
      assert np.isfinite(value) and 0.0 <= value <= 1.0, (split, name, value)
