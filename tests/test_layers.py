"""models/layers.py, function by function, against float64 NumPy references.

Direct and fast (tiny shapes, one jitted program per test, no model around the
layers), so that a mutation run can afford the file once per mutant. The references
are written here from the docstrings' equations and never call the JAX code:
masks and masked softmax; the 16-bit dropout mask, against a NumPy
Threefry-2x32 (checked against the Random123 known-answer vector); the
query-block plan; dot-product and additive attention (cross-attention,
per-head masks, fully masked rows, causal query blocks with an offset).

Tolerances: softmax weights within 1e-6 absolute (float32 eps is 1.2e-7);
attention outputs ``|jax - ref| <= 1e-5 * max|ref|`` element-wise (a few
dozen roundings deep, measured below 2e-7); masks, dropout draws and block
plans exactly.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jex_random

from deeprec_jax.models import layers

ATTENTION_RTOL = 1e-5
# Optimization level 0 about halves XLA's compile time (values stay float32 round-off apart);
# one jitted program per test is cheaper than compiling every eager op.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _random_params(module, *args, seed, scale=0.5):
  """float32 ``scale * N(0, 1)`` params with ``module.init``'s structure (none compiled)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (scale * rng.standard_normal(leaf.shape)).astype(np.float32),
                      shapes)


def _exactly(message):
  """A ``pytest.raises`` pattern for the whole message (JAX may append notes on new lines)."""
  return rf"(?m)\A{re.escape(message)}$"


def _assert_attention_close(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=0, atol=ATTENTION_RTOL * np.abs(ref).max())


# ----------------------------------------------------------------------------
# Masks and masked softmax.
# ----------------------------------------------------------------------------


def test_reject_packing():
  layers.reject_packing("caser", None, None)
  message = ("model 'caser' does not take packed rows (segment_ids, positions); "
             "set train.pack=False.")
  for segment_ids, positions in [(np.ones((1, 2)), None), (None, np.ones((1, 2)))]:
    with pytest.raises(ValueError, match=_exactly(message)):
      layers.reject_packing("caser", segment_ids, positions)


def test_masks_match_numpy():
  causal = np.asarray(layers.causal_mask(4))
  assert causal.dtype == np.bool_ and causal.shape == (1, 1, 4, 4)
  np.testing.assert_array_equal(causal[0, 0], [[i >= j for j in range(4)] for i in range(4)])

  valid = np.array([[False, False, True, True, True], [False, True, True, True, True],
                    [True] * 5])
  segments = np.array([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2], [3, 3, 3, 4, 4]])
  padding = np.asarray(layers.key_padding_mask(jnp.asarray(valid)))
  assert padding.shape == (3, 1, 1, 5)
  np.testing.assert_array_equal(padding[:, 0, 0], valid)
  for is_causal in (False, True):
    for seg in (None, segments):
      got = np.asarray(layers.attention_mask(
          jnp.asarray(valid), causal=is_causal,
          segment_ids=None if seg is None else jnp.asarray(seg)))
      want = np.zeros((3, 1, 5, 5), bool)
      for b in range(3):
        for i in range(5):
          for j in range(5):
            want[b, 0, i, j] = (valid[b, j] and (j <= i or not is_causal)
                                and (seg is None or seg[b, i] == seg[b, j]))
      np.testing.assert_array_equal(got, want, err_msg=f"causal={is_causal} segments={seg}")


def np_masked_softmax(logits, mask):
  """Softmax of the allowed entries of each row (last axis); rows allowing none are 0."""
  logits, mask = np.broadcast_arrays(np.asarray(logits, np.float64), mask)
  out = np.zeros(logits.shape)
  for index in np.ndindex(logits.shape[:-1]):
    allowed = mask[index]
    if allowed.any():
      e = np.exp(logits[index][allowed] - logits[index][allowed].max())
      out[index][allowed] = e / e.sum()
  return out


def test_masked_softmax_matches_numpy():
  rng = np.random.default_rng(0)
  logits = (3 * rng.standard_normal((2, 2, 3, 5))).astype(np.float32)  # q_len != k_len
  mask = rng.random((2, 1, 3, 5)) < 0.6  # one mask for both heads
  mask[0, 0, 1] = False  # a row with no allowed key
  mask[1, 0, 2] = True
  got = np.asarray(layers.masked_softmax(jnp.asarray(logits), jnp.asarray(mask)))
  assert got.dtype == np.float32 and got.shape == logits.shape
  np.testing.assert_allclose(got, np_masked_softmax(logits, mask), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got[0, :, 1], 0.0)
  # No mask: the plain softmax over keys.
  plain = np.asarray(layers.masked_softmax(jnp.asarray(logits), None))
  np.testing.assert_allclose(plain, np_masked_softmax(logits, np.ones(logits.shape, bool)),
                             rtol=0, atol=1e-6)
  # 16-bit logits are normalised in float32.
  half = jnp.asarray(logits, jnp.bfloat16)
  for m in (jnp.asarray(mask), None):
    weights = layers.masked_softmax(half, m)
    assert weights.dtype == jnp.float32
    want = np_masked_softmax(np.asarray(half, np.float64),
                             mask if m is not None else np.ones(logits.shape, bool))
    np.testing.assert_allclose(np.asarray(weights), want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Dropout.
# ----------------------------------------------------------------------------


def np_threefry2x32(key, x0, x1):
  """Threefry-2x32, 20 rounds (Salmon et al. 2011), on uint32 NumPy arrays."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = [np.uint32(key[0]), np.uint32(key[1]),
        np.uint32(key[0]) ^ np.uint32(key[1]) ^ np.uint32(0x1BD11BDA)]
  x0 = np.asarray(x0, np.uint32) + ks[0]
  x1 = np.asarray(x1, np.uint32) + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
      x1 = x1 ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


def test_threefry_reference_known_answer():
  # Random123's known-answer test for threefry2x32_20.
  high, low = np_threefry2x32((0x13198A2E, 0x03707344), np.array([0x243F6A88]),
                              np.array([0x85A308D3]))
  assert (int(high[0]), int(low[0])) == (0xC4923A9C, 0x483DF7A0)


def np_keep_mask(rng, shape, keep_prob):
  """dropout_keep_mask's documented draw: element (r, c) of the [rows, last] view.

  Word w = c mod ceil(last / 4) of row r is Threefry-2x32 of the counters
  (r, w) under the key's two 32-bit words -> (high, low); lane c div words
  picks high >> 16, high & 0xFFFF, low >> 16 or low & 0xFFFF. Keep when the
  draw is below round(keep_prob * 2**16).
  """
  seed = np.asarray(jax.random.bits(rng, (2,), jnp.uint32))
  rows, last = int(np.prod(shape[:-1])), shape[-1]
  words = (last + 3) // 4
  row, word = np.meshgrid(np.arange(rows, dtype=np.uint32), np.arange(words, dtype=np.uint32),
                          indexing="ij")
  high, low = np_threefry2x32(seed, row, word)
  lanes = [high >> 16, high & 0xFFFF, low >> 16, low & 0xFFFF]
  draws = np.concatenate(lanes, axis=1)[:, :last]
  threshold = round(keep_prob * 2**16)
  return (draws < threshold).reshape(shape), draws.reshape(shape), 2**16 / threshold


def test_dropout_keep_mask_matches_numpy():
  rng = jax.random.key(3)
  shapes = [(3, 2, 7), (5, 8), (9,)]  # a partial last word, whole words, 1-D
  draws = {shape: np_keep_mask(rng, shape, 0.7)[1] for shape in shapes}
  # A threshold equal to a draw drops that element (draw < threshold, not <=).
  equal = {shape: int(draws[shape].flat[0]) for shape in shapes}
  scales = {}  # Python floats, recorded while tracing

  def masks():
    out = {}
    for shape in shapes:
      for p in (0.7, equal[shape] / 2**16):
        out[shape, p], scales[shape, p] = layers.dropout_keep_mask(rng, shape, p)
    return out

  got = jit(masks)()
  for shape in shapes:
    want, _, want_scale = np_keep_mask(rng, shape, 0.7)
    keep, at_draw = got[shape, 0.7], got[shape, equal[shape] / 2**16]
    assert keep.dtype == jnp.bool_ and keep.shape == shape
    np.testing.assert_array_equal(np.asarray(keep), want)
    assert scales[shape, 0.7] == want_scale == 2**16 / 45875  # round(0.7 * 2**16) = 45875
    assert not np.asarray(at_draw).flat[0]
    np.testing.assert_array_equal(np.asarray(at_draw), draws[shape] < equal[shape])
    assert scales[shape, equal[shape] / 2**16] == 2**16 / equal[shape]


def test_dropout_keep_mask_row_limit():
  """At most 2**32 - 1 rows (the row counter is 32 bits); checked without allocating."""
  rng = jax.random.key(0)
  limit = jax.eval_shape(lambda: layers.dropout_keep_mask(rng, (2**16 - 1, 2**16 + 1, 3), 0.5))
  assert limit[0].shape == (2**16 - 1, 2**16 + 1, 3)  # 2**32 - 1 rows
  message = "dropout on (65536, 65536, 3): the leading dimensions hold 4294967296 rows, " \
            "more than 2**32."
  with pytest.raises(ValueError, match=_exactly(message)):
    jax.eval_shape(lambda: layers.dropout_keep_mask(rng, (2**16, 2**16, 3), 0.5))


class _RngProbe(nn.Module):
  """The first ``'dropout'`` key a root module draws, as ``layers.Dropout`` would."""

  @nn.compact
  def __call__(self):
    return self.make_rng("dropout")


def test_dropout_module_matches_numpy():
  x = np.random.default_rng(1).standard_normal((6, 9)).astype(np.float32)
  rngs = {"dropout": jax.random.key(7)}
  dropout = layers.Dropout(0.25)
  key, out, half = jit(lambda: [
      _RngProbe().apply({}, rngs=rngs),
      dropout.apply({}, x, deterministic=False, rngs=rngs),
      dropout.apply({}, jnp.asarray(x, jnp.bfloat16), deterministic=False, rngs=rngs)])()
  keep, _, scale = np_keep_mask(key, x.shape, 0.75)
  assert 0 < keep.sum() < keep.size
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), np.where(keep, x * np.float32(scale), 0.0))
  # 16-bit inputs stay 16-bit.
  assert half.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(half, np.float32),
                                np.where(keep, np.asarray(jnp.asarray(x, jnp.bfloat16)
                                                          * jnp.bfloat16(scale), np.float32),
                                         0.0))
  # Deterministic, or rate 0: the input itself, and no 'dropout' key is needed.
  np.testing.assert_array_equal(np.asarray(dropout.apply({}, x, deterministic=True)), x)
  np.testing.assert_array_equal(
      np.asarray(layers.Dropout(0.0).apply({}, x, deterministic=False)), x)


# ----------------------------------------------------------------------------
# Query blocks.
# ----------------------------------------------------------------------------


def test_query_blocks():
  """About 50 rows per causal block, at most 4 blocks; keys up to each block's last query."""
  assert layers.query_blocks(120, 130, causal=False) == [(0, 120, 130)]
  assert layers.query_blocks(0, 5, causal=True) == []
  assert layers.query_blocks(1, 120, causal=True) == [(0, 1, 120)]
  assert layers.query_blocks(99, 99, causal=True) == [(0, 99, 99)]
  assert layers.query_blocks(100, 100, causal=True) == [(0, 50, 50), (50, 100, 100)]
  # 120 of 130 positions: block ends are offset by the 10 earlier keys.
  assert layers.query_blocks(120, 130, causal=True) == [(0, 60, 70), (60, 120, 130)]
  # 170 / 3 rows: block edges rounded (56.7 -> 57, 113.3 -> 113).
  assert layers.query_blocks(170, 170, causal=True) == [(0, 57, 57), (57, 113, 113),
                                                        (113, 170, 170)]
  assert layers.query_blocks(1000, 1000, causal=True) == [
      (0, 250, 250), (250, 500, 500), (500, 750, 750), (750, 1000, 1000)]


def test_mask_block_slices_only_full_axes():
  rng = np.random.default_rng(2)
  full = rng.random((2, 1, 6, 7)) < 0.5
  np.testing.assert_array_equal(layers._mask_block(full, 2, 4, 5), full[..., 2:4, :5])
  two = rng.random((2, 1, 2, 2)) < 0.5
  np.testing.assert_array_equal(layers._mask_block(two, 1, 2, 1), two[..., 1:2, :1])
  # Size-1 (broadcast) axes are kept whole.
  keys_only = rng.random((2, 1, 1, 7)) < 0.5
  np.testing.assert_array_equal(layers._mask_block(keys_only, 3, 6, 5), keys_only[..., :5])
  rows_only = rng.random((2, 1, 6, 1)) < 0.5
  np.testing.assert_array_equal(layers._mask_block(rows_only, 3, 6, 5), rows_only[..., 3:6, :])
  # A mask of lower rank, broadcast against [batch, heads, q_len, k_len].
  for shape in [(6, 7), (1, 6, 7)]:
    low_rank = rng.random(shape) < 0.5
    np.testing.assert_array_equal(layers._mask_block(low_rank, 2, 4, 5), low_rank[..., 2:4, :5])


# ----------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------


def test_attend_by_blocks_follows_the_block_plan():
  """``logits_fn`` is asked for each query block of ``query_blocks``; outputs as one softmax."""
  q_len, k_len = 100, 120  # the last 100 of 120 positions: two causal blocks, offset 20
  rng = np.random.default_rng(13)
  logits = rng.standard_normal((2, 2, q_len, k_len)).astype(np.float32)
  value = rng.standard_normal((2, k_len, 2, 3)).astype(np.float32)
  mask = np.tril(np.ones((q_len, k_len), bool), k=k_len - q_len)[None, None]
  calls = []

  class Blocks(nn.Module):
    causal: bool

    @nn.compact
    def __call__(self, logits, value, mask):
      def logits_fn(start, stop, num_keys):
        calls.append((start, stop, num_keys))
        return logits[:, :, start:stop, :num_keys]

      return layers.attend_by_blocks(logits_fn, value, mask, q_len=q_len, causal=self.causal,
                                     dropout_rate=0.0, deterministic=True)

  outputs = jit(lambda *a: [Blocks(causal=c).apply({}, *a) for c in (True, False)])(
      logits, value, mask)
  assert calls == [(0, 50, 70), (50, 100, 120), (0, 100, 120)]
  weights = np_masked_softmax(logits, mask)  # [b, h, q, k]
  want = np.einsum("bhqk,bkhd->bqhd", weights, np.float64(value))
  for out in outputs:
    _assert_attention_close(out, want)


def np_dot_product_attention(xq, xkv, mask, p, num_heads):
  """Per head h: softmax(Q_h K_h^T / sqrt(d_h)) V_h; heads concatenated, then W_o + b_o.

  Q = xq W_q + b_q, K = xkv W_k (no key bias), V = xkv W_v + b_v.
  """
  q = xq @ p["query"]["kernel"] + p["query"]["bias"]
  k = xkv @ p["key"]["kernel"]
  v = xkv @ p["value"]["kernel"] + p["value"]["bias"]
  head = q.shape[-1] // num_heads
  heads = []
  for h in range(num_heads):
    cols = slice(h * head, (h + 1) * head)
    logits = np.einsum("bqd,bkd->bqk", q[..., cols], k[..., cols]) / np.sqrt(head)
    heads.append(np.einsum("bqk,bkd->bqd", np_masked_softmax(logits, mask[:, h % mask.shape[1]]),
                           v[..., cols]))
  return np.concatenate(heads, -1) @ p["out"]["kernel"] + p["out"]["bias"]


def np_additive_attention(xq, xkv, mask, p, num_heads):
  """Per head h: softmax_j(tanh(W_q q_i + W_k k_j + b) . v) over allowed j, times V_j.

  The head's slices of the hidden units (W_q, W_k columns, b, v) and of the
  value features (V = xkv W_v + b_v); no output projection.
  """
  wq, wk, b, vec = p["query"]["kernel"], p["key"]["kernel"], p["bias"], p["v"]
  values = xkv @ p["value"]["kernel"] + p["value"]["bias"]
  att, head = wq.shape[1] // num_heads, xq.shape[-1] // num_heads
  heads = []
  for h in range(num_heads):
    a, c = slice(h * att, (h + 1) * att), slice(h * head, (h + 1) * head)
    hidden = np.tanh((xq @ wq[:, a])[:, :, None] + (xkv @ wk[:, a])[:, None] + b[a])
    weights = np_masked_softmax(hidden @ vec[a], mask[:, h % mask.shape[1]])
    heads.append(np.einsum("bqk,bkd->bqd", weights, values[..., c]))
  return np.concatenate(heads, -1)


NP_ATTENTION = {layers.DotProductAttention: np_dot_product_attention,
                layers.AdditiveAttention: np_additive_attention}


def _cross_inputs(seed):
  rng = np.random.default_rng(seed)
  xq = rng.standard_normal((2, 3, 4)).astype(np.float32)
  xkv = rng.standard_normal((2, 5, 4)).astype(np.float32)
  mask = rng.random((2, 2, 3, 5)) < 0.6  # a different mask per head
  mask[0, 1, 2] = False  # head 1 of query 2 sees no key: its output is the value bias path
  mask[:, :, 0, 0] = True
  return xq, xkv, mask


def test_dot_product_attention_matches_numpy():
  xq, xkv, mask = _cross_inputs(seed=3)
  module = layers.DotProductAttention(num_heads=2)
  params = _random_params(module, xq, xkv, mask, seed=4)
  assert jax.tree.map(np.shape, params) == {
      "query": {"kernel": (4, 4), "bias": (4,)}, "key": {"kernel": (4, 4)},
      "value": {"kernel": (4, 4), "bias": (4,)}, "out": {"kernel": (4, 4), "bias": (4,)}}
  # A mask per head, one mask for every head, no mask.
  masks = (mask, mask[:, :1], None)
  outputs = jit(lambda p: [module.apply({"params": p}, xq, xkv, m) for m in masks])(params)
  assert outputs[0].dtype == jnp.float32
  for m, out in zip(masks, outputs, strict=True):
    m = np.ones((1, 1, 3, 5), bool) if m is None else m
    _assert_attention_close(out, np_dot_product_attention(xq, xkv, m, _f64(params), 2))


@pytest.mark.parametrize("hidden_dim,shapes", [(6, (4, 6)), (None, (4, 4))])
def test_additive_attention_matches_numpy(hidden_dim, shapes):
  xq, xkv, mask = _cross_inputs(seed=5)
  module = layers.AdditiveAttention(num_heads=2, hidden_dim=hidden_dim)
  params = _random_params(module, xq, xkv, mask, seed=6)
  assert jax.tree.map(np.shape, params) == {
      "query": {"kernel": shapes}, "key": {"kernel": shapes},
      "value": {"kernel": (4, 4), "bias": (4,)}, "bias": shapes[1:], "v": shapes[1:]}
  masks = (mask, None)
  outputs = jit(lambda p: [module.apply({"params": p}, xq, xkv, m) for m in masks])(params)
  assert outputs[0].dtype == jnp.float32
  for m, out in zip(masks, outputs, strict=True):
    m = np.ones((1, 1, 3, 5), bool) if m is None else m
    _assert_attention_close(out, np_additive_attention(xq, xkv, m, _f64(params), 2))


@pytest.mark.parametrize("cls", [layers.DotProductAttention, layers.AdditiveAttention])
def test_causal_attention_in_query_blocks_matches_numpy(cls):
  """L = 120: two causal query blocks; then the last 100 queries (offset blocks) and the last."""
  seq_len = 120
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, seq_len, 4)).astype(np.float32)
  valid = np.ones((2, seq_len), bool)
  valid[1, :70] = False  # left padding across the block boundary
  mask = valid[:, None, None, :] & np.tril(np.ones((seq_len, seq_len), bool))
  module = cls(num_heads=2, causal=True)
  params = _random_params(module, x, x, seed=8)
  reference = NP_ATTENTION[cls](x, x, mask, _f64(params), 2)
  q_lens = (seq_len, 100, 1)
  outputs = jit(lambda p: [module.apply({"params": p}, x[:, -q:], x, mask[:, :, -q:])
                           for q in q_lens])(params)
  for q_len, out in zip(q_lens, outputs, strict=True):
    _assert_attention_close(out, reference[:, -q_len:])
  # The first block's logits are 60 x 60: it never reads the 60 later keys.
  program = str(jax.make_jaxpr(lambda p: module.apply({"params": p}, x, x, mask))(params))
  assert "f32[2,2,60,60]" in program and "f32[2,2,120,120]" not in program


@pytest.mark.parametrize("cls", [layers.DotProductAttention, layers.AdditiveAttention])
def test_attention_dropout_on_the_weights(cls):
  """Dropout on the weights: off when deterministic; on average the deterministic output."""
  rng = np.random.default_rng(9)
  x = np.repeat(rng.standard_normal((1, 6, 4)).astype(np.float32), 512, axis=0)
  module = cls(num_heads=2, dropout_rate=0.5)
  params = _random_params(module, x[:1], x[:1], seed=10)
  exact = NP_ATTENTION[cls](x[:1], x[:1], np.ones((1, 1, 6, 6), bool), _f64(params), 2)[0]
  kept, dropped = jit(lambda p: [
      module.apply({"params": p}, x[:1], x[:1]),
      module.apply({"params": p}, x, x, deterministic=False,
                   rngs={"dropout": jax.random.key(0)})])(params)
  _assert_attention_close(kept[0], exact)
  dropped = np.asarray(dropped, np.float64)
  assert np.abs(dropped - exact).max() > 0.1 * np.abs(exact).max()
  # Inverted dropout keeps the expectation; each of the 512 identical rows draws its own mask.
  error = np.abs(dropped.mean(0) - exact)
  sigma = dropped.std(0) / np.sqrt(len(x))
  assert (error < 5 * sigma + 1e-6).all(), (error / sigma).max()


@pytest.mark.parametrize("cls", [layers.DotProductAttention, layers.AdditiveAttention])
def test_attention_dtypes_and_initializers(cls):
  xq, xkv, mask = _cross_inputs(seed=11)
  half = cls(num_heads=2, dtype=jnp.bfloat16)
  params = _random_params(half, xq, xkv, seed=12)
  out = jit(lambda p: half.apply({"params": p}, xq, xkv, mask))(params)
  assert out.dtype == jnp.bfloat16
  reference = NP_ATTENTION[cls](xq, xkv, mask, _f64(params), 2)
  np.testing.assert_allclose(np.asarray(out, np.float64), reference, rtol=0,
                             atol=0.05 * np.abs(reference).max())  # bfloat16: 8 mantissa bits
  # "Matmuls run in dtype": every dot of the program is bfloat16. Additive attention never
  # forms its [batch, q, k, heads, hidden / heads] tanh argument: no tensor of rank 5 at
  # all; its tanh runs on one float32 [batch, heads, q, k] slab per feature (a scan).
  program = str(jax.make_jaxpr(lambda p: half.apply({"params": p}, xq, xkv, mask))(params))
  dots = re.findall(r"(\w+)\[[\d,]*\] = dot_general", program)
  assert len(dots) >= 3 and set(dots) == {"bf16"}, dots
  assert not re.search(r"\[\d+,\d+,\d+,\d+,\d+\]", program)
  if cls is layers.AdditiveAttention:
    assert re.search(r"f32\[2,2,3,5\] = tanh", program), program
  shapes = jax.eval_shape(cls(num_heads=2, param_dtype=jnp.bfloat16).init, jax.random.key(0),
                          xq, xkv)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
  params = jit(cls(num_heads=2, kernel_init=nn.initializers.constant(0.5)).init)(
      jax.random.key(0), xq, xkv)["params"]
  for name in ("query", "key", "value"):
    np.testing.assert_array_equal(params[name]["kernel"], 0.5)


def test_additive_attention_initial_bias_and_v():
  """b = 0; v ~ N(0, 1 / (hidden_dim / num_heads)), here std 1/32."""
  x = np.ones((1, 1, 4), np.float32)
  params = jit(layers.AdditiveAttention(num_heads=4, hidden_dim=4096).init)(
      jax.random.key(1), x, x)["params"]
  np.testing.assert_array_equal(params["bias"], 0.0)
  v = np.asarray(params["v"], np.float64)
  assert v.shape == (4096,)
  # The sample std of 4096 normals is within 5 * 1.1% of the true one.
  assert abs(v.std() * 32 - 1.0) < 0.06 and abs(v.mean()) * 32 < 5 / 64


def test_attention_head_errors():
  x = np.ones((1, 2, 6), np.float32)
  with pytest.raises(ValueError, match=_exactly(
      "num_heads=4 must divide the feature size 6.")):
    layers.DotProductAttention(num_heads=4).init(jax.random.key(0), x, x)
  message = ("num_heads={} must divide the feature size 6 and the attention-hidden "
             "size {}.")
  for num_heads, hidden_dim in [(4, 8), (2, 5)]:  # the features, then the hidden size
    with pytest.raises(ValueError, match=_exactly(message.format(num_heads, hidden_dim))):
      layers.AdditiveAttention(num_heads=num_heads, hidden_dim=hidden_dim).init(
          jax.random.key(0), x, x)


def _np_additive_scores_and_grads(query, key, bias, v, cotangent):
  """float64 ``a = tanh(q_i + k_j + b) . v`` ``[b, h, q, k]`` and its vector-Jacobian product."""
  pre = query[:, :, None] + key[:, None] + bias  # [b, q, k, h, d]
  hidden = np.tanh(pre)
  scores = np.einsum("bqkhd,hd->bhqk", hidden, v)
  grad_pre = np.einsum("bhqk,hd->bqkhd", cotangent, v) * (1.0 - hidden**2)
  grads = (grad_pre.sum(2), grad_pre.sum(1), grad_pre.sum((0, 1, 2)),
           np.einsum("bhqk,bqkhd->hd", cotangent, hidden))
  return scores, grads


@pytest.mark.parametrize("heads", [1, 2])
def test_additive_scores_and_custom_gradient_match_numpy(heads):
  """``layers.additive_scores`` (scan over features, recomputing backward) vs float64.

  Scores and all four gradients within 1e-5 of the largest reference value
  (float32, sums over <= 8 * 9 * 11 terms), also with pre-activations up to
  ~|6| where tanh saturates.
  """
  rng = np.random.default_rng(heads)
  batch, q_len, k_len, head_hidden = 3, 7, 9, 8 // heads
  query = 2.0 * rng.normal(size=(batch, q_len, heads, head_hidden))
  key = 2.0 * rng.normal(size=(batch, k_len, heads, head_hidden))
  bias, v = rng.normal(size=(2, heads, head_hidden))
  cotangent = rng.normal(size=(batch, heads, q_len, k_len))
  args = [jnp.asarray(a, jnp.float32) for a in (query, key, bias, v)]

  @jit
  def scores_and_vjp(*args):
    scores, vjp = jax.vjp(layers.additive_scores, *args)
    return scores, vjp(jnp.asarray(cotangent, jnp.float32))

  scores, grads = scores_and_vjp(*args)
  ref_scores, ref_grads = _np_additive_scores_and_grads(query, key, bias, v, cotangent)
  assert scores.shape == (batch, heads, q_len, k_len) and scores.dtype == jnp.float32
  _assert_attention_close(scores, ref_scores)
  for name, grad, ref in zip(("query", "key", "bias", "v"), grads, ref_grads, strict=True):
    assert grad.shape == ref.shape, name
    _assert_attention_close(grad, ref)


def test_additive_scores_bfloat16_inputs_accumulate_in_float32():
  """bfloat16 inputs: float32 scores, gradients in the inputs' dtypes, within bf16 rounding."""
  rng = np.random.default_rng(5)
  query, key = rng.normal(size=(2, 2, 5, 1, 4))
  bias, v = rng.normal(size=(2, 1, 4))
  cotangent = rng.normal(size=(2, 1, 5, 5))
  args = [jnp.asarray(a, jnp.bfloat16) for a in (query, key, bias, v)]
  scores, vjp = jax.vjp(layers.additive_scores, *args)
  grads = vjp(jnp.asarray(cotangent, jnp.float32))
  assert scores.dtype == jnp.float32
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 4
  ref_scores, ref_grads = _np_additive_scores_and_grads(
      *(np.asarray(a, np.float64) for a in args), cotangent)
  np.testing.assert_allclose(np.asarray(scores), ref_scores, atol=2e-2 * np.abs(ref_scores).max())
  for grad, ref in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref, atol=2e-2 * np.abs(ref).max())


def test_l2_normalize_values_and_gradient_at_a_zero_row():
  """Unit rows and their float64 Jacobian; a zero row (padding) stays 0, its gradient finite.

  Below ``epsilon`` the function is ``x / epsilon``, so that is the zero row's
  gradient; dividing by ``norm(x)`` gave nan there, and nan everywhere after.
  """
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  x[1] = 0.0
  weights = rng.normal(size=x.shape).astype(np.float32)
  value, grad = jax.value_and_grad(
      lambda v: jnp.sum(layers.l2_normalize(v) * weights))(jnp.asarray(x))
  x64, w64 = np.float64(x), np.float64(weights)
  want_grad = np.zeros_like(x64)
  for row in (0, 2):
    norm = np.linalg.norm(x64[row])
    unit = x64[row] / norm
    want_grad[row] = (w64[row] - unit * (unit @ w64[row])) / norm  # (I - u u^T) w / |x|
  want_grad[1] = w64[1] / 1e-6
  want_value = sum(w64[r] @ (x64[r] / np.linalg.norm(x64[r])) for r in (0, 2))
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(layers.l2_normalize(jnp.asarray(x))[1], 0.0)


def test_dropout_keep_mask_is_the_16_bit_draws_below_the_threshold():
  """The mask is ``draw < round(keep * 2**16)`` for the four 16-bit draws of each hash, in order."""
  key, shape, keep_prob = jax.random.key(3, impl="rbg"), (3, 2, 10), 0.7
  keep, scale = layers.dropout_keep_mask(key, shape, keep_prob)
  seed = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
  rows, words = 6, 3  # ceil(10 / 4) hashes per row
  row, col = np.meshgrid(np.arange(rows, dtype=np.uint32), np.arange(words, dtype=np.uint32),
                         indexing="ij")
  high, low = (np.asarray(x, np.uint64) for x in jex_random.threefry2x32_p.bind(
      jnp.uint32(seed[0]), jnp.uint32(seed[1]), jnp.asarray(row), jnp.asarray(col)))
  draws = np.concatenate([high >> 16, high & 0xFFFF, low >> 16, low & 0xFFFF], axis=-1)
  threshold = round(keep_prob * 2**16)
  np.testing.assert_array_equal(np.asarray(keep), (draws[:, :10] < threshold).reshape(shape))
  assert scale == 2**16 / threshold
