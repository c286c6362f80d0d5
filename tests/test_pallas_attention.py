"""models/pallas_attention.py against float64 NumPy references, in Pallas interpret mode.

The references are written here from the equations (masked softmax of
``q . k`` or ``tanh(q + k + bias) . v`` scores, times the values) and never
call the JAX code; gradients are checked against an analytic NumPy VJP of the
same float64 math. Shapes are tiny but blocks are smaller still (and do not
divide the lengths), so every case runs several query and key blocks plus the
padding to whole blocks.

Tolerances (float32 kernels): outputs ``|jax - ref| <= 1e-5 * max|ref|``
element-wise, gradients likewise ``<= 1e-5 * max|ref|`` per array (measured:
outputs below 2e-7, gradients below 8e-7); rows without an allowed key are
exactly 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax.models import layers, pallas_attention

OUT_RTOL = 1e-5
GRAD_RTOL = 1e-5
BLOCKS = {"block_q": 2, "block_k": 4}
# Optimization level 0 about halves XLA's compile time (as in test_layers.py).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ----------------------------------------------------------------------------
# float64 NumPy references.
# ----------------------------------------------------------------------------


def np_mask(q_len, key_valid, segment_ids=None, causal=False):
  """``bool[batch, 1, q_len, k_len]``; queries are the last q_len positions."""
  batch, k_len = key_valid.shape
  mask = np.broadcast_to(key_valid[:, None, None, :], (batch, 1, q_len, k_len)).copy()
  q_pos = np.arange(k_len - q_len, k_len)
  if causal:
    mask &= np.arange(k_len)[None, :] <= q_pos[:, None]
  if segment_ids is not None:
    mask &= segment_ids[:, None, q_pos, None] == segment_ids[:, None, None, :]
  return mask


def np_softmax(scores, mask):
  """Masked softmax over the last axis; rows with no allowed key are 0."""
  mask = np.broadcast_to(mask, scores.shape)
  s = np.where(mask, scores, -np.inf)
  row_max = np.max(s, axis=-1, keepdims=True)
  e = np.where(mask, np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


def np_dot_scores(q, k):
  return np.einsum("bqhd,bkhd->bhqk", q, k)


def np_additive_hidden(q, k, bias):
  """``tanh(q_i + k_j + bias)``: ``[batch, q, k, heads, head_hidden]``."""
  return np.tanh(q[:, :, None] + k[:, None, :] + bias)


def np_additive_scores(q, k, bias, v):
  return np.einsum("bqkhd,hd->bhqk", np_additive_hidden(q, k, bias), v)


def np_attend(weights, value):
  return np.einsum("bhqk,bkhd->bqhd", weights, value)


def np_grads(form, args, value, mask, cotangent):
  """Analytic VJP of ``sum(cotangent * attention)``: grads of (*args, value)."""
  if form == "dot":
    q, k = args
    scores = np_dot_scores(q, k)
  else:
    q, k, bias, v = args
    hidden = np_additive_hidden(q, k, bias)
    scores = np.einsum("bqkhd,hd->bhqk", hidden, v)
  w = np_softmax(scores, mask)
  grad_value = np.einsum("bhqk,bqhd->bkhd", w, cotangent)
  grad_w = np.einsum("bqhd,bkhd->bhqk", cotangent, value)
  grad_s = w * (grad_w - np.sum(w * grad_w, -1, keepdims=True))
  if form == "dot":
    return (np.einsum("bhqk,bkhd->bqhd", grad_s, k), np.einsum("bhqk,bqhd->bkhd", grad_s, q),
            grad_value)
  grad_pre = np.einsum("bhqk,hd->bqkhd", grad_s, v) * (1 - hidden**2)
  return (grad_pre.sum(2), grad_pre.sum(1), grad_pre.sum((0, 1, 2)),
          np.einsum("bhqk,bqkhd->hd", grad_s, hidden), grad_value)


# ----------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------


def _inputs(form, *, batch=2, q_len=7, k_len=7, heads=2, head_dim=3, seed=0):
  """float64 (score args, value): query, key[, bias, v] and values."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape)
  args = (normal(batch, q_len, heads, head_dim), normal(batch, k_len, heads, head_dim))
  if form == "additive":
    args += (0.5 * normal(heads, head_dim), normal(heads, head_dim))
  return args, normal(batch, k_len, heads, 4)


def _left_padded(batch, k_len, lengths):
  return np.arange(k_len)[None, :] >= k_len - np.asarray(lengths)[:, None]


# name -> (q_len, k_len, kernel masking kwargs as NumPy arrays, mask builder for the reference)
# Left padding of 3 and 5 (k_len 7): under a causal mask the first padding queries see no key.
_PADDED = _left_padded(2, 7, [4, 2])
_SEGMENTS = np.array([[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1]])  # 3 and 2 segments
_PACKED_VALID = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]], bool)
_PER_HEAD = np.random.default_rng(1).random((2, 2, 7, 7)) < 0.6
_PER_HEAD[0, 1, 3] = False  # a fully masked row of one head
CASES = {
    "bidirectional_left_padding": (7, 7, dict(key_valid=_PADDED), False),
    "causal_left_padding": (7, 7, dict(key_valid=_PADDED), True),
    "segments_bidirectional": (7, 7, dict(key_valid=_PACKED_VALID, segment_ids=_SEGMENTS), False),
    "segments_causal": (7, 7, dict(key_valid=_PACKED_VALID, segment_ids=_SEGMENTS), True),
    "last_queries_causal": (3, 7, dict(key_valid=_PADDED), True),
    "last_queries_segments": (3, 7, dict(segment_ids=_SEGMENTS), False),
    "no_mask": (5, 7, {}, False),
    "dense_per_head": (7, 7, dict(mask=_PER_HEAD), False),
    "dense_key_padding": (7, 7, dict(mask=_PADDED[:, None, None, :]), False),
    "dense_causal": (7, 7, dict(mask=np_mask(7, _PADDED, causal=True)), True),
}


def _reference_mask(q_len, k_len, masking, causal):
  if "mask" in masking:
    mask = np.broadcast_to(masking["mask"], masking["mask"].shape[:2] + (q_len, k_len))
    return mask & np_mask(q_len, np.ones((1, k_len), bool), causal=causal)
  key_valid = masking.get("key_valid", np.ones((2, k_len), bool))
  return np_mask(q_len, key_valid, masking.get("segment_ids"), causal)


def _kernel(form, masking, causal, **kwargs):
  """``(*score args, value) -> attention``, the masking fixed (its arrays as constants)."""
  fn = (pallas_attention.dot_product_attention if form == "dot"
        else pallas_attention.additive_attention)
  masks = {name: jnp.asarray(a) for name, a in masking.items()}
  return lambda *arrays: fn(*arrays[:2], arrays[-1], *arrays[2:-1], causal=causal, **masks,
                            **BLOCKS, **kwargs)


def _run(form, args, value, masking, causal, **kwargs):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return jit(_kernel(form, masking, causal, **kwargs))(*map(f32, args), f32(value))


def _np_forward(form, args, value, mask):
  scores = np_dot_scores(*args) if form == "dot" else np_additive_scores(*args)
  return np_attend(np_softmax(scores, mask), value)


def _assert_close(actual, expected, rtol):
  actual = np.asarray(actual, np.float64)
  assert actual.shape == expected.shape
  np.testing.assert_array_less(np.abs(actual - expected), rtol * np.max(np.abs(expected)) + 1e-30)


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dot", "additive"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(form, case):
  q_len, k_len, masking, causal = CASES[case]
  args, value = _inputs(form, q_len=q_len, k_len=k_len)
  if form == "dot":
    args = (args[0] * args[0].shape[-1]**-0.5, args[1])  # the caller's scaling
  mask = _reference_mask(q_len, k_len, masking, causal)
  expected = _np_forward(form, args, value, mask)
  actual = np.asarray(_run(form, args, value, masking, causal))
  _assert_close(actual, expected, OUT_RTOL)
  # Rows without an allowed key: exactly 0 (no NaN), as layers.masked_softmax.
  empty = ~np.broadcast_to(mask, (2, 2, q_len, k_len)).any(-1)  # [batch, heads, q]
  assert np.all(actual.transpose(0, 2, 1, 3)[empty] == 0.0)
  if case in ("causal_left_padding", "dense_per_head"):
    assert empty.any()  # the case really has such rows


@pytest.mark.parametrize("form", ["dot", "additive"])
@pytest.mark.parametrize("case", ["causal_left_padding", "dense_per_head"])
def test_gradients_match_numpy_vjp(form, case):
  q_len, k_len, masking, causal = CASES[case]
  args, value = _inputs(form, q_len=q_len, k_len=k_len, seed=2)
  cotangent = np.random.default_rng(3).normal(size=(2, q_len, 2, 4))
  expected = np_grads(form, args, value, _reference_mask(q_len, k_len, masking, causal),
                      cotangent)

  attention = _kernel(form, masking, causal)

  def loss(*arrays):
    out = attention(*arrays)
    return jnp.sum(out * jnp.asarray(cotangent, jnp.float32))

  arrays = [jnp.asarray(a, jnp.float32) for a in (*args, value)]
  grads = jit(jax.grad(loss, argnums=tuple(range(len(arrays)))))(*arrays)
  assert len(grads) == len(expected)
  for grad, want in zip(grads, expected, strict=True):
    _assert_close(grad, want, GRAD_RTOL)


def test_causal_skips_key_blocks_after_the_query_block():
  # Values after the first query block's reach are NaN: read, they would poison its rows.
  args, value = _inputs("dot", q_len=8, k_len=8)
  mask = np_mask(8, np.ones((2, 8), bool), causal=True)
  expected = _np_forward("dot", args, value, mask)
  poisoned = value.copy()
  poisoned[:, 4:] = np.nan  # block_q = 2, block_k = 4: rows 0-3 need key block 0 only
  actual = np.asarray(_run("dot", args, poisoned, {}, True))
  assert np.all(np.isnan(actual[:, 4:]))  # the later rows did read them
  _assert_close(actual[:, :4], expected[:, :4], OUT_RTOL)


def test_rejects_dropout_and_mixed_masking():
  args, value = _inputs("dot")
  with pytest.raises(ValueError, match="dropout"):
    _run("dot", args, value, {}, False, dropout_rate=0.1)
  with pytest.raises(ValueError, match="either a dense mask"):
    _run("dot", args, value, dict(mask=_PER_HEAD, key_valid=_PADDED), False)
  with pytest.raises(ValueError, match="power of 2"):
    pallas_attention.dot_product_attention(*map(jnp.asarray, (*args, value)), block_q=3)


@pytest.mark.parametrize("module", [layers.DotProductAttention, layers.AdditiveAttention])
def test_layers_pallas_implementation_matches_xla(module):
  """``implementation='pallas'`` gives the 'xla' outputs and parameter gradients."""
  rng = np.random.default_rng(4)
  inputs = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
  valid = jnp.asarray(_PADDED)
  mask = layers.attention_mask(valid, causal=True)
  xla, pallas = (module(num_heads=2, causal=True, dropout_rate=0.1, implementation=impl)
                 for impl in ("xla", "pallas"))
  params = xla.init(jax.random.key(0), inputs, inputs, mask)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.ones_like(p), params)  # nonzero bias

  def loss_and_grads(layer):
    loss = lambda params: jnp.sum(jnp.sin(layer.apply(params, inputs, inputs, mask)))
    return jit(jax.value_and_grad(loss))(params), jit(layer.apply)(params, inputs, inputs, mask)

  (xla_loss, xla_grads), xla_out = loss_and_grads(xla)
  (pallas_loss, pallas_grads), pallas_out = loss_and_grads(pallas)
  _assert_close(pallas_out, np.asarray(xla_out, np.float64), OUT_RTOL)
  assert abs(float(pallas_loss) - float(xla_loss)) <= OUT_RTOL * abs(float(xla_loss))
  assert jax.tree.structure(pallas_grads) == jax.tree.structure(xla_grads)
  for grad, want in zip(jax.tree.leaves(pallas_grads), jax.tree.leaves(xla_grads), strict=True):
    _assert_close(grad, np.asarray(want, np.float64), GRAD_RTOL)
  with pytest.raises(ValueError, match="model.attention_impl"):
    pallas.apply(params, inputs, inputs, mask, deterministic=False,
                 rngs={"dropout": jax.random.key(1)})


@pytest.mark.parametrize("attention", ["dot_product", "additive"])
def test_sasrec_config_switch_selects_the_kernels(attention):
  """``model.attention_impl='pallas'``: a SASRec config's outputs equal 'xla''s (packed rows).

  Dropout is off at evaluation; in training with attention dropout the
  Pallas configuration is refused with a message naming the key.
  """
  from deeprec_jax import models  # pylint: disable=g-import-not-at-top
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("sasrec")
  config.model.attention = attention
  built = {}
  for impl in ("xla", "pallas"):
    config.model.attention_impl = impl
    built[impl] = models.create_model(config.model, num_items=20, num_users=4, max_len=8)
  rng = np.random.default_rng(0)
  item_seq = rng.integers(1, 21, size=(3, 8)).astype(np.int32)
  item_seq[0, :3] = 0
  segment_ids = np.where(item_seq > 0, 1, 0).astype(np.int32)
  segment_ids[1, 4:] = 2  # two users in row 1
  positions = np.tile(np.arange(8, dtype=np.int32), (3, 1))
  params = built["xla"].init(jax.random.key(0), item_seq)["params"]
  outs = {impl: jit(lambda p, m=model: m.apply({"params": p}, item_seq,
                                                 segment_ids=segment_ids,
                                                 positions=positions))(params)
          for impl, model in built.items()}
  np.testing.assert_allclose(outs["pallas"], outs["xla"], rtol=0,
                             atol=OUT_RTOL * np.abs(outs["xla"]).max())
  with pytest.raises(ValueError, match="model.attention_impl"):
    built["pallas"].apply({"params": params}, item_seq, deterministic=False,
                          rngs={"dropout": jax.random.key(1)})
