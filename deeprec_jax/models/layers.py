"""Shared building blocks of the self-attention recommenders (SASRec, BERT4Rec).

Conventions used throughout:

* Sequences are left-padded with item id 0. ``valid`` (the "timeline mask" of
  the SASRec code) is ``bool[batch, seq_len]``, True at real items.
* Attention masks are ``bool[batch, 1 or num_heads, q_len, k_len]``, True where
  query ``i`` may attend to key ``j``. Padding is masked out as *keys* only;
  padding *queries* are zeroed after each block by the timeline mask.
* Parameters are stored in ``param_dtype`` (float32); matmuls run in ``dtype``
  (float32 or bfloat16). Softmax and layer-norm statistics always run in
  float32, because bfloat16 has only 8 mantissa bits and both reduce over a
  whole row.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]



# SASRec's public code (TF `normalize` and the PyTorch port) uses 1e-8.
LAYER_NORM_EPSILON = 1e-8


def reject_packing(model_name: str, segment_ids: Array | None,
                   positions: Array | None) -> None:
  """Raises unless both packing inputs are None (for models that do not pack)."""
  if segment_ids is not None or positions is not None:
    raise ValueError(f"model {model_name!r} does not take packed rows (segment_ids, "
                     "positions); set train.pack=False.")


# ----------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------


def causal_mask(seq_len: int) -> Array:
  """``bool[1, 1, seq_len, seq_len]``: query i may attend to keys j <= i."""
  return jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))[None, None]


def key_padding_mask(valid: Array) -> Array:
  """``bool[batch, 1, 1, k_len]`` from ``valid bool[batch, k_len]``: never attend to padding."""
  return valid[:, None, None, :]


def attention_mask(valid: Array, *, causal: bool, segment_ids: Array | None = None) -> Array:
  """Self-attention mask ``bool[batch, 1, seq_len, seq_len]``.

  Args:
    valid: ``bool[batch, seq_len]``, True at real (non-padding) positions.
    causal: also forbid attending to later positions (SASRec).
    segment_ids: ``int[batch, seq_len]`` for rows that pack several sequences
      (``packing.pack_batch``): positions attend only within their segment.

  Returns:
    True where query i may attend to key j: j is real (and j <= i if causal,
    and in i's segment if ``segment_ids`` is given).
  """
  batch, seq_len = valid.shape
  mask = jnp.broadcast_to(key_padding_mask(valid), (batch, 1, seq_len, seq_len))
  if causal:
    mask = mask & causal_mask(seq_len)
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def masked_softmax(logits: Array, mask: Array | None) -> Array:
  """Softmax over the last axis restricted to ``mask``, in float32.

  Rows where ``mask`` allows no key (e.g. a left-padding query under a causal
  mask) return all zeros rather than NaN, so their output is 0 and their
  gradients are finite.

  Args:
    logits: ``[..., q_len, k_len]`` of any float dtype.
    mask: bool, broadcastable to ``logits``; None = no masking.

  Returns:
    float32 weights of the shape of ``logits``.
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  # A finite fill (not -inf) keeps fully masked rows NaN-free: they become a
  # uniform softmax that the final `where` zeroes.
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.where(mask, weights, 0.0)


# ----------------------------------------------------------------------------
# Dropout.
# ----------------------------------------------------------------------------

# Keep an element when 16 random bits fall below round(keep_prob * 2**16).
_DROPOUT_BITS = 16


def dropout_keep_mask(rng: Array, shape: tuple[int, ...], keep_prob: float
                      ) -> tuple[Array, float]:
  """A Bernoulli(``keep_prob``) mask from 16 random bits per element.

  One Threefry-2x32 hash gives 64 bits, i.e. four elements' draws, where
  ``jax.random.bernoulli`` spends one hash (and a float32 uniform) on each
  element: a quarter of the hashing, which dominated the SASRec step on CPU
  (benchmarks/README.md). The counters are the element's (row, word)
  coordinates, so the mask depends on the shape only, not on how the array is
  sharded, and each device can draw its own rows.

  Args:
    rng: a PRNG key of any implementation.
    shape: the mask's shape (at least 1-D; all but the last dimension together
      must be < 2**32).
    keep_prob: probability of keeping an element, in (0, 1].

  Returns:
    ``(keep bool[shape], scale)``: the mask, and ``2**16 / threshold``, the
    inverse of the realised keep probability (within 2**-17 of ``keep_prob``),
    so that ``where(keep, x * scale, 0)`` has expectation ``x`` exactly.
  """
  *lead, last = shape
  rows = int(np.prod(lead))
  if rows >= 2**32:
    raise ValueError(f"dropout on {shape}: the leading dimensions hold {rows} rows, "
                     "more than 2**32.")
  threshold = round(keep_prob * 2**_DROPOUT_BITS)
  words = -(-last // 4)  # four 16-bit draws per 64-bit hash
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  row = jax.lax.broadcasted_iota(jnp.uint32, (rows, words), 0)
  col = jax.lax.broadcasted_iota(jnp.uint32, (rows, words), 1)
  high, low = jex_random.threefry2x32_p.bind(seed[0], seed[1], row, col)
  # Compare, then concatenate: the bool quarters move a quarter of the bytes
  # of the uint32 draws (the same mask; 1.7x faster at BERT4Rec's attention
  # weights, benchmarks/README.md).
  keep = jnp.concatenate([(high >> 16) < threshold, (high & 0xFFFF) < threshold,
                          (low >> 16) < threshold, (low & 0xFFFF) < threshold], axis=-1)
  keep = keep[:, :last]
  return keep.reshape(shape), 2**_DROPOUT_BITS / threshold


class Dropout(nn.Module):
  """Inverted dropout with 16-bit masks (``dropout_keep_mask``).

  ``flax.linen.Dropout``'s semantics (the ``'dropout'`` RNG stream, zero with
  probability ``rate``, survivors scaled to keep the expectation), with the
  keep probability rounded to a multiple of 2**-16.

  Attributes:
    rate: probability of zeroing an element, in [0, 1).
  """

  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """``x`` with dropout applied unless ``deterministic``."""
    if deterministic or self.rate == 0.0:
      return x
    keep, scale = dropout_keep_mask(self.make_rng("dropout"), x.shape, 1.0 - self.rate)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


# ----------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------


# Causal attention runs in query blocks of about this many rows (at most
# _MAX_QUERY_BLOCKS): a block never reads the keys after its last query, which
# skips most of the masked upper triangle (figures: benchmarks/README.md).
_QUERY_BLOCK_ROWS = 50
_MAX_QUERY_BLOCKS = 4


def query_blocks(q_len: int, k_len: int, *, causal: bool) -> list[tuple[int, int, int]]:
  """How attention splits its queries: ``[(start, stop, num_keys), ...]``.

  Queries are the last ``q_len`` of the ``k_len`` positions (``q_len < k_len``
  when only the most recent positions are asked for). Query rows
  ``[start, stop)`` read keys ``[0, num_keys)``: all of them without a causal
  mask, else only up to the block's last query. Every row's softmax is its
  own, so the split changes no output.
  """
  if not causal:
    return [(0, q_len, k_len)]
  num_blocks = max(1, min(_MAX_QUERY_BLOCKS, q_len // _QUERY_BLOCK_ROWS))
  edges = [round(i * q_len / num_blocks) for i in range(num_blocks + 1)]
  offset = k_len - q_len
  return [(a, b, b + offset) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def attend_by_blocks(logits_fn: Callable[[int, int, int], Array], value: Array,
                     mask: Array | None, *, q_len: int, causal: bool, dropout_rate: float,
                     deterministic: bool) -> Array:
  """``dropout(masked_softmax(logits)) @ value``, one query block at a time.

  Call it inside a module's compact method (it creates the dropout layers).

  Args:
    logits_fn: ``(start, stop, num_keys) -> [batch, heads, stop - start,
      num_keys]``, the attention logits of query rows ``[start, stop)``
      against keys ``[0, num_keys)``.
    value: ``[batch, k_len, heads, head_dim]``.
    mask: ``bool[batch, 1 or heads, q_len, k_len]`` (or broadcastable), or None.
    q_len: number of queries (the last ``q_len`` of the ``k_len`` positions).
    causal: ``mask`` is causal, so blocks may skip later keys (``query_blocks``).
    dropout_rate: dropout on the attention weights.
    deterministic: disables dropout.

  Returns:
    ``[batch, q_len, heads, head_dim]`` in ``value``'s dtype.
  """
  # Heads before positions, [batch, heads, k_len, head_dim]: XLA's CPU dot runs
  # "bhqk,bhkd" as plain batched matmuls, but "bhqk,bkhd" ~4x slower
  # (benchmarks/README.md, "Attention layouts").
  value = jnp.swapaxes(value, 1, 2)
  outputs = []
  for start, stop, num_keys in query_blocks(q_len, value.shape[2], causal=causal):
    block_mask = None if mask is None else _mask_block(mask, start, stop, num_keys)
    weights = masked_softmax(logits_fn(start, stop, num_keys), block_mask)
    weights = Dropout(dropout_rate)(weights, deterministic=deterministic)
    outputs.append(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype),
                              value[:, :, :num_keys]))
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)
  return jnp.swapaxes(out, 1, 2)


def _mask_block(mask: Array, start: int, stop: int, num_keys: int) -> Array:
  """Rows ``[start, stop)`` and keys ``[0, num_keys)`` of a broadcastable mask."""
  rows = slice(start, stop) if mask.shape[-2] > 1 else slice(None)
  keys = slice(0, num_keys) if mask.shape[-1] > 1 else slice(None)
  return mask[..., rows, keys]


class _Attention(nn.Module):
  """Fields shared by the two attention forms (documented on each)."""

  num_heads: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  qkv_init: Initializer | None = None  # W_q, W_k, W_v; None = kernel_init
  causal: bool = False
  implementation: str = "xla"  # 'xla' | 'pallas'

  def _pallas_attention(self, form: str, score_args: tuple[Array, ...], value: Array,
                        mask: Array | None, deterministic: bool) -> Array:
    """``pallas_attention``'s fused kernel in place of ``attend_by_blocks``."""
    if self.implementation != "pallas":
      raise ValueError(f"implementation={self.implementation!r}: expected 'xla' or 'pallas' "
                       "(model.attention_impl).")
    if not deterministic and self.dropout_rate > 0:
      raise ValueError(f"model.attention_impl='pallas' has no attention dropout "
                       f"(dropout_rate={self.dropout_rate}): set the attention dropout to 0 "
                       "or use model.attention_impl='xla'.")
    from deeprec_jax.models import pallas_attention  # only when asked for

    fn = (pallas_attention.dot_product_attention if form == "dot"
          else pallas_attention.additive_attention)
    return fn(*score_args[:2], value, *score_args[2:], mask=mask, causal=self.causal)


class DotProductAttention(_Attention):
  """Multi-head scaled dot-product attention with q/k/v/out projections.

  ``softmax(Q K^T / sqrt(head_dim)) V`` per head, where Q, K, V are dense
  projections (with bias) of the inputs, followed by a dense output projection
  (with bias): ``4 * (dim * dim + dim)`` parameters, as PyTorch's
  ``nn.MultiheadAttention`` used by the public SASRec port.

  Attributes:
    num_heads: number of heads; must divide the feature size.
    dropout_rate: dropout on the attention weights (as in SASRec).
    dtype: compute dtype of the projections.
    param_dtype: parameter dtype.
    kernel_init: initializer of the projection kernels.
    causal: ``mask`` is causal (query ``i``, the ``i``-th of the last
      ``q_len`` positions, never sees a later key): queries then run in blocks
      that skip the keys after them (``query_blocks``).
  """

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None, *,
               deterministic: bool = True) -> Array:
    """Attends from ``inputs_q`` to ``inputs_kv``.

    Args:
      inputs_q: queries ``[batch, q_len, dim]``.
      inputs_kv: keys and values ``[batch, k_len, dim]``.
      mask: ``bool[batch, 1 or num_heads, q_len, k_len]``, True = may attend.
      deterministic: disables attention dropout.

    Returns:
      ``[batch, q_len, dim]`` in ``dtype``.
    """
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the feature size {features}.")
    head_dim = features // self.num_heads
    dense = lambda name, use_bias=True: nn.Dense(
        features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=(self.qkv_init or self.kernel_init) if name != "out" else self.kernel_init,
        name=name)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, head_dim))
    query = split(dense("query")(inputs_q))  # [batch, q_len, heads, head_dim]
    # No key bias: it adds q_i . b_k to every logit of row i, which the softmax
    # cancels, so its gradient is exactly 0 and Adam would only amplify
    # rounding noise in it (making runs differ across device counts).
    key = split(dense("key", use_bias=False)(inputs_kv))  # [batch, k_len, heads, head_dim]
    value = split(dense("value")(inputs_kv))  # [batch, k_len, heads, head_dim]

    query = query * head_dim**-0.5  # a Python float keeps query's dtype
    if self.implementation != "xla":
      out = self._pallas_attention("dot", (query, key), value, mask, deterministic)
      return dense("out")(out.reshape(out.shape[:-2] + (features,)))

    # [batch, heads, block, num_keys] logits of query rows [start, stop), from
    # heads-first copies (the layout note in attend_by_blocks).
    query_heads, key_heads = jnp.swapaxes(query, 1, 2), jnp.swapaxes(key, 1, 2)
    logits_fn = lambda start, stop, num_keys: jnp.einsum(
        "bhqd,bhkd->bhqk", query_heads[:, :, start:stop], key_heads[:, :, :num_keys])
    out = attend_by_blocks(logits_fn, value, mask, q_len=query.shape[1], causal=self.causal,
                           dropout_rate=self.dropout_rate, deterministic=deterministic)
    out = out.reshape(out.shape[:-2] + (features,))
    return dense("out")(out)


@jax.custom_vjp
def additive_scores(query: Array, key: Array, bias: Array, v: Array) -> Array:
  """``a_ij = tanh(query_i + key_j + bias) . v`` per head: ``[batch, heads, q_len, k_len]``.

  Args:
    query: ``[batch, q_len, heads, head_hidden]`` (``W_q Q``).
    key: ``[batch, k_len, heads, head_hidden]`` (``W_k K``).
    bias: ``[heads, head_hidden]``.
    v: ``[heads, head_hidden]``.

  Returns:
    The scores in float32 (or wider, if the inputs are).

  The sum over features runs as a scan over them, one ``[batch, heads, q_len,
  k_len]`` slab at a time: XLA fuses each step's broadcast, tanh and
  accumulation into one loop, where the direct form writes (and autodiff
  keeps) the whole ``[batch, q_len, k_len, head_hidden]`` tanh tensor. The
  backward pass recomputes each slab's tanh instead of saving it, so memory
  stays at a few slabs (figures: benchmarks/README.md).
  """
  return _additive_scores_fwd(query, key, bias, v)[0]


def _feature_major(query: Array, key: Array, bias: Array) -> tuple[Array, Array]:
  """``[head_hidden, batch, heads, q_len]`` and ``[head_hidden, batch, heads, k_len]``."""
  dtype = jnp.promote_types(query.dtype, jnp.float32)
  return (jnp.transpose((query + bias).astype(dtype), (3, 0, 2, 1)),
          jnp.transpose(key.astype(dtype), (3, 0, 2, 1)))


def _additive_scores_fwd(query: Array, key: Array, bias: Array, v: Array
                         ) -> tuple[Array, tuple[Array, ...]]:
  query_t, key_t = _feature_major(query, key, bias)

  def add_feature(scores, feature):
    q_d, k_d, v_d = feature  # [batch, heads, q_len], [batch, heads, k_len], [heads]
    hidden = jnp.tanh(q_d[..., :, None] + k_d[..., None, :])
    return scores + v_d[:, None, None] * hidden, None

  batch, q_len, heads, _ = query.shape
  scores = jnp.zeros((batch, heads, q_len, key.shape[1]), query_t.dtype)
  scores, _ = jax.lax.scan(add_feature, scores, (query_t, key_t, v.T.astype(query_t.dtype)))
  return scores, (query, key, bias, v)


def _additive_scores_bwd(residuals: tuple[Array, ...], grad: Array
                         ) -> tuple[Array, Array, Array, Array]:
  query, key, bias, v = residuals
  query_t, key_t = _feature_major(query, key, bias)
  grad = grad.astype(query_t.dtype)

  def feature_grads(_, feature):
    q_d, k_d, v_d = feature
    hidden = jnp.tanh(q_d[..., :, None] + k_d[..., None, :])  # recomputed, never stored
    grad_hidden = grad * hidden
    # d/dx tanh(x) = 1 - tanh(x)^2, times the cotangent and v_d.
    grad_pre = (grad - grad_hidden * hidden) * v_d[:, None, None]
    return None, (jnp.sum(grad_pre, -1), jnp.sum(grad_pre, -2), jnp.sum(grad_hidden, (0, 2, 3)))

  _, (grad_q, grad_k, grad_v) = jax.lax.scan(
      feature_grads, None, (query_t, key_t, v.T.astype(query_t.dtype)))
  grad_q = jnp.transpose(grad_q, (1, 3, 2, 0))  # [batch, q_len, heads, head_hidden]
  grad_k = jnp.transpose(grad_k, (1, 3, 2, 0))
  grad_bias = jnp.sum(grad_q, (0, 1))  # the bias enters every (i, j) as query_i does
  return (grad_q.astype(query.dtype), grad_k.astype(key.dtype), grad_bias.astype(bias.dtype),
          grad_v.T.astype(v.dtype))


additive_scores.defvjp(_additive_scores_fwd, _additive_scores_bwd)


class AdditiveAttention(_Attention):
  """Additive (Bahdanau-style) attention.

  For each head h, with Q = ``inputs_q`` and K = ``inputs_kv``:

      a_ij = tanh(W_q Q_i + W_k K_j + b) . v          (scores)
      e_ij = softmax_j(a_ij) over the allowed j        (masked softmax)
      out_i = sum_j e_ij V_j,  V = W_v K + b_v         (value projection)

  Projections: ``W_q``, ``W_k``: ``dim -> hidden_dim`` without bias (the one
  shared bias ``b`` is enough, two would be redundant); ``b``, ``v``:
  ``[hidden_dim]``; ``W_v``: ``dim -> dim`` with bias. No output projection:
  the output is linear in V, so one would compose with ``W_v`` into a single
  linear map. Parameters: ``2 * dim * hidden_dim + 2 * hidden_dim + dim * dim
  + dim`` (``3 * (dim * dim + dim)`` with the default ``hidden_dim = dim``).

  With ``num_heads > 1`` the attention-hidden and value features are split into
  heads, each with its own slice of ``b`` and ``v``; ``num_heads=1`` is exactly
  the equations above.

  Cost: ``batch * q_len * k_len * hidden_dim`` tanh evaluations, summed over
  the hidden features one ``[batch, heads, q_len, k_len]`` slab at a time
  (``additive_scores``), so the ``[batch, q_len, k_len, hidden_dim]`` tensor
  is never held, neither forward nor for the backward pass.

  Attributes:
    num_heads: number of heads; must divide ``hidden_dim`` and the feature size.
    hidden_dim: attention-hidden size d_att; None = the input feature size.
    dropout_rate: dropout on the attention weights.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    kernel_init: initializer of ``W_q``, ``W_k``, ``W_v``.
    qkv_init: overrides ``kernel_init`` for them when given.
    causal: ``mask`` is causal: queries run in blocks that skip the keys
      after them (``query_blocks``), as in ``DotProductAttention``.
  """

  hidden_dim: int | None = None

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None, *,
               deterministic: bool = True) -> Array:
    """Attends from ``inputs_q`` to ``inputs_kv``, as ``DotProductAttention.__call__``."""
    features = inputs_q.shape[-1]
    hidden_dim = self.hidden_dim or features
    if features % self.num_heads or hidden_dim % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide the feature size {features} "
                       f"and the attention-hidden size {hidden_dim}.")
    head_hidden = hidden_dim // self.num_heads
    head_dim = features // self.num_heads

    def project(name: str, x: Array, size: int, use_bias: bool, head_size: int) -> Array:
      y = nn.Dense(size, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=self.qkv_init or self.kernel_init, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.num_heads, head_size))

    query = project("query", inputs_q, hidden_dim, False, head_hidden)  # [b, q, h, d_att/h]
    key = project("key", inputs_kv, hidden_dim, False, head_hidden)  # [b, k, h, d_att/h]
    value = project("value", inputs_kv, features, True, head_dim)  # [b, k, h, dim/h]
    bias = self.param("bias", nn.initializers.zeros_init(), (hidden_dim,), self.param_dtype)
    # v ~ N(0, 1/d_att_per_head) keeps the initial scores O(1), as lecun_normal would.
    v = self.param("v", nn.initializers.normal(stddev=head_hidden**-0.5), (hidden_dim,),
                   self.param_dtype)
    bias = bias.astype(self.dtype).reshape(self.num_heads, head_hidden)
    v = v.astype(self.dtype).reshape(self.num_heads, head_hidden)
    if self.implementation != "xla":
      out = self._pallas_attention("additive", (query, key, bias, v), value, mask, deterministic)
      return out.reshape(out.shape[:-2] + (features,))

    def logits_fn(start: int, stop: int, num_keys: int) -> Array:
      # [batch, heads, block, num_keys], one feature at a time (additive_scores).
      return additive_scores(query[:, start:stop], key[:, :num_keys], bias, v)

    out = attend_by_blocks(logits_fn, value, mask, q_len=query.shape[1], causal=self.causal,
                           dropout_rate=self.dropout_rate, deterministic=deterministic)
    return out.reshape(out.shape[:-2] + (features,))


def l2_normalize(x: Array, epsilon: float = 1e-6) -> Array:
  """``x / max(||x||, epsilon)`` over the last axis, in float32; zero rows stay zero.

  Scores of L2-normalized states and item vectors are cosines (``model.l2_norm``).
  """
  x = x.astype(jnp.float32)
  # rsqrt of the clamped squared norm, not a division by norm(x): the norm's
  # gradient at a zero row (padding) is 0/0, which would turn the whole
  # gradient into nan.
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, epsilon * epsilon))
