"""HSTU: Hierarchical Sequential Transduction Units (Zhai et al., ICML 2024).

"Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers
for Generative Recommendations", as its public code
(``facebookresearch/generative-recommenders``, ``modeling/sequential/hstu.py``)
runs the traditional sequential setting: a causal stack of HSTU layers whose
hidden state at position t predicts the item at t + 1 by a dot product with
the shared item table. With ``valid`` the timeline mask (True at real items):

    x = Dropout(E[item_seq] * sqrt(dim) + P) * valid      # E row 0 = padding
    x = HSTULayer(x) x num_blocks                           # below
    hidden = LayerNorm(x) * valid

and one layer (pre-norm, residual; h heads, widths d_qk and d_v per head):

    normed = LN(x)                                          # no scale or offset
    U, V, Q, K = split(SiLU(normed @ W_1 + b_1))            # W_1: d -> 2h d_v + 2h d_qk
    A_h = SiLU(Q_h K_h^T + rab_h) / n, masked               # pointwise, no softmax
    out = concat_h(A_h V_h)                                 # [batch, seq_len, h d_v]
    x = (x + Dropout((LN(out) * U) @ W_2 + b_2)) * valid    # W_2: h d_v -> d

* The mask allows key j for query i when j <= i, j is a real item and (for
  packed rows) j is in i's segment: padding keys would otherwise add
  ``SiLU(b_1)``-driven values, as there is no softmax to renormalize.
* ``n = max_len``, a constant. The official code divides by the padded length
  (``invalid_attn_mask.size(-1)``), which is the maximum length because its
  inputs are always padded to it; a constant keeps the output at a real
  position independent of how much left padding precedes it, which the
  evaluation's length groups rely on (docs/contracts.md).
* ``rab_h`` is a learned relative-position bias per head: ``rab[h, min(i - j,
  max_len - 1)]`` for query position i and key position j <= i, so buckets
  ``0..max_len - 1``. The official bias is one table for all heads over every
  signed distance (``2 max_len - 1`` entries, of which causal attention reads
  the ``max_len`` non-negative ones).
* With ``time_buckets = T > 0`` it adds the official *time* bias,
  ``rab_t[h, b_ij]`` with ``b_ij = min(floor(log(max(|q_i - t_j|, 1)) /
  0.301), T)``: ``q_i`` is the time of query i's request (the next item's
  timestamp; at evaluation, the target's), ``t_j`` key j's timestamp
  (``times.timed_rows``), in the source's units (seconds for MovieLens).
  The official code uses T = 128 and one table for all heads.
* The layer norms inside a layer have no learned scale or offset, as in the
  official code (``F.layer_norm`` without weights, epsilon 1e-6); the final
  layer norm (not in the official code, which L2-normalizes the output
  instead) has both. Scores are raw dot products with the item table unless
  ``l2_norm``: then, as in the official code, the output is L2-normalized
  instead of layer-normed, the item vectors are too (``models.item_vectors``),
  and scores are cosines (the published configs divide them by a temperature
  of 0.05).
* Dropout is applied after ``W_2`` (the official code drops ``LN(out) * U``
  before ``W_2``; the two differ only by where the mask sits relative to the
  linear map) and on the input embeddings; there is no attention dropout
  (0 in the published configs).

Initialization follows the official code: item table truncated-normal with
standard deviation 0.02, positions truncated-normal with ``dim**-0.5``,
``W_1`` normal(0.02), ``W_2`` Xavier-uniform, ``rab`` normal(0.02), biases 0.

Parameters (N items, d = dim, L = max_len, B = num_blocks, h heads, widths
d_qk and d_v, w = 2 h (d_qk + d_v)):

    table_rows(N + 1) d + L d + B [d w + w + h d_v d + d + h L (+ h (T + 1))] + 2d
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deeprec_jax.models import encoder, item_embedding, layers, validation

Array = jax.Array

# Epsilon of every HSTU layer norm (the official code's default).
EPSILON = 1e-6


def check_fields(model: "Model") -> None:
  """Checks HSTU's fields; each error names its ``model.<field>`` config key."""
  validation.check_sizes(model)
  validation.validate_fields(model, {"dim": lambda m, f: validation.check_int(m, f, 1),
                                     "num_blocks": lambda m, f: validation.check_int(m, f, 0),
                                     "num_heads": lambda m, f: validation.check_int(m, f, 1)})
  for field in ("qk_dim", "v_dim"):
    value = getattr(model, field)
    validation.check(value is None or (validation.is_int(value) and value >= 1),
                     f"model.{field}", "None (dim // num_heads) or an int >= 1", value)
  if model.qk_dim is None or model.v_dim is None:
    validation.check(model.dim % model.num_heads == 0, "model.num_heads",
                     f"a positive int dividing model.dim={model.dim} (or set model.qk_dim "
                     "and model.v_dim)", model.num_heads)
  validation.check_fraction(model, "dropout_rate")
  validation.check_bool(model, "l2_norm")
  validation.check(validation.is_int(model.time_buckets) and model.time_buckets >= 0,
                   "model.time_buckets", "an int >= 0 (0 = no time bias; the official 128)",
                   model.time_buckets)
  validation.compute_dtype(model.dtype)


def relative_distances(q_start: int, q_stop: int, num_keys: int, num_buckets: int) -> np.ndarray:
  """``int32[q_stop - q_start, num_keys]``: ``clip(i - j, 0, num_buckets - 1)``.

  For query positions ``i`` in ``[q_start, q_stop)`` and key positions ``j``
  in ``[0, num_keys)``; negative distances (later keys, masked by causality)
  map to bucket 0.
  """
  rows = np.arange(q_start, q_stop)[:, None]
  cols = np.arange(num_keys)[None, :]
  return np.clip(rows - cols, 0, num_buckets - 1).astype(np.int32)


# Width of a time bucket in log-seconds (the official bucketization).
TIME_BUCKET_LOG_WIDTH = 0.301


def time_buckets(query_time: Array, time_seq: Array, num_buckets: int) -> Array:
  """``int32[batch, q_len, k_len]``: ``min(floor(log(max(|q_i - t_j|, 1)) / 0.301), T)``.

  Args:
    query_time: ``int[batch, q_len]``, each query's request time.
    time_seq: ``int[batch, k_len]``, each key's timestamp.
    num_buckets: T, the last bucket (gaps of ``e^(0.301 T)`` and more).
  """
  # The difference in int32 (exact for int32 times), then float32 for the log.
  gap = jnp.abs(query_time[:, :, None].astype(jnp.int32)
                - time_seq[:, None, :].astype(jnp.int32)).astype(jnp.float32)
  bucket = jnp.floor(jnp.log(jnp.maximum(gap, 1.0)) / TIME_BUCKET_LOG_WIDTH)
  return jnp.minimum(bucket, num_buckets).astype(jnp.int32)


def pointwise_attention(query: Array, key: Array, value: Array, mask: Array, rel_bias: Array,
                        *, normalizer: float, time_bias: Array | None = None,
                        time_bucket: Array | None = None) -> Array:
  """``sum_j [mask] SiLU(q_i . k_j + rab[i - j] + rab_t[b_ij]) / normalizer * v_j``, per head.

  Causal: queries run in blocks that skip the keys after them
  (``layers.query_blocks``); each row is its own sum, so the split changes no
  output.

  Args:
    query: ``[batch, q_len, heads, qk_dim]``, the last ``q_len`` positions.
    key: ``[batch, k_len, heads, qk_dim]``.
    value: ``[batch, k_len, heads, v_dim]``.
    mask: ``bool[batch, 1, q_len, k_len]``, True where query i may use key j
      (causal: j <= i).
    rel_bias: ``[heads, num_buckets]``, the relative-position bias.
    normalizer: the constant the weights are divided by (``max_len``).
    time_bias: ``[heads, T + 1]``, the time bias rab_t, or None.
    time_bucket: ``int32[batch, q_len, k_len]`` (``time_buckets``), with
      ``time_bias``.

  Returns:
    ``[batch, q_len, heads, v_dim]`` in ``value``'s dtype.
  """
  q_len, k_len = query.shape[1], key.shape[1]
  offset = k_len - q_len
  # Heads first, [batch, heads, len, d]: the matmul layout XLA's CPU dot runs
  # fastest (see layers.attend_by_blocks).
  query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  outputs = []
  for start, stop, num_keys in layers.query_blocks(q_len, k_len, causal=True):
    distances = relative_distances(start + offset, stop + offset, num_keys, rel_bias.shape[1])
    bias = jnp.take(rel_bias, jnp.asarray(distances), axis=1)  # [heads, block, num_keys]
    logits = jnp.einsum("bhqd,bhkd->bhqk", query[:, :, start:stop],
                        key[:, :, :num_keys]) + bias
    if time_bias is not None:
      buckets = time_bucket[:, start:stop, :num_keys]  # [batch, block, num_keys]
      logits = logits + jnp.moveaxis(jnp.take(time_bias, buckets, axis=1), 0, 1)
    # SiLU in float32 (pointwise; the sum over keys runs in value's dtype).
    weights = nn.silu(logits.astype(jnp.float32)) * (1.0 / normalizer)
    weights = jnp.where(mask[:, :, start:stop, :num_keys], weights, 0.0)
    outputs.append(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype),
                              value[:, :, :num_keys]))
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)
  return jnp.swapaxes(out, 1, 2)


class HSTULayer(nn.Module):
  """One HSTU layer (module docstring): pointwise attention gated by U, residual.

  Attributes:
    num_heads: heads h.
    qk_dim: query/key width per head d_qk.
    v_dim: value (and U) width per head d_v.
    max_len: the attention normalizer n and the number of rab buckets.
    time_buckets: T of the time bias (0 = none).
    dropout_rate: dropout on the layer's output before the residual.
    dtype: compute dtype (layer-norm statistics and SiLU weights in float32).
    param_dtype: parameter dtype.
  """

  num_heads: int
  qk_dim: int
  v_dim: int
  max_len: int
  time_buckets: int = 0
  dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, valid: Array, *, deterministic: bool = True,
               last_only: bool = False, segment_ids: Array | None = None,
               time_bucket: Array | None = None) -> Array:
    """Applies the layer.

    Args:
      x: ``[batch, seq_len, dim]``, zero at padding, ``seq_len <= max_len``.
      valid: ``bool[batch, seq_len]``, True at real items.
      deterministic: disables dropout.
      last_only: compute the last position only (its U, Q, output and
        residual; K and V still cover every position).
      segment_ids: ``int[batch, seq_len]`` for packed rows: attention stays
        within each segment. Relative distances are column differences, which
        within a segment (contiguous, ``packing.pack_layout``) equal those of
        the sequence on its own row.
      time_bucket: ``int32[batch, seq_len, seq_len]`` (``time_buckets``;
        ``[batch, 1, seq_len]`` with ``last_only``), when ``time_buckets > 0``.

    Returns:
      ``[batch, seq_len, dim]`` in ``dtype`` (``[batch, 1, dim]`` with
      ``last_only``), zero at padding positions.
    """
    dim = x.shape[-1]
    heads, qk_dim, v_dim = self.num_heads, self.qk_dim, self.v_dim
    if x.shape[1] > self.max_len:
      raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={self.max_len} "
                       "(config key data.max_len).")
    norm = lambda name: nn.LayerNorm(epsilon=EPSILON, dtype=self.dtype,
                                     param_dtype=self.param_dtype, use_scale=False,
                                     use_bias=False, use_fast_variance=False, name=name)
    x = x.astype(self.dtype)
    normed = norm("ln_input")(x)
    uvqk = nn.Dense(2 * heads * (v_dim + qk_dim), dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.normal(stddev=0.02), name="uvqk")(normed)
    uvqk = nn.silu(uvqk)
    edges = [heads * v_dim, 2 * heads * v_dim, 2 * heads * v_dim + heads * qk_dim]
    u, v, q, k = jnp.split(uvqk, edges, axis=-1)  # [batch, seq_len, h d_v | h d_qk]
    split_heads = lambda t, width: t.reshape(t.shape[:-1] + (heads, width))
    mask = layers.attention_mask(valid, causal=True, segment_ids=segment_ids)  # [b, 1, L, L]
    if last_only:
      x, u, q, mask, valid = x[:, -1:], u[:, -1:], q[:, -1:], mask[:, :, -1:], valid[:, -1:]
    rel_bias = self.param("rel_bias", nn.initializers.normal(stddev=0.02),
                          (heads, self.max_len), self.param_dtype)
    time_bias = None
    if self.time_buckets:
      time_bias = self.param("time_bias", nn.initializers.normal(stddev=0.02),
                             (heads, self.time_buckets + 1), self.param_dtype
                             ).astype(self.dtype)
    out = pointwise_attention(split_heads(q, qk_dim), split_heads(k, qk_dim),
                              split_heads(v, v_dim), mask, rel_bias.astype(self.dtype),
                              normalizer=float(self.max_len), time_bias=time_bias,
                              time_bucket=time_bucket)
    out = out.reshape(out.shape[:-2] + (heads * v_dim,))  # [batch, q_len, h d_v]
    y = nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.initializers.xavier_uniform(), name="out")(
        norm("ln_attention")(out) * u)
    y = layers.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return (x + y) * valid[..., None].astype(self.dtype)


class Model(nn.Module):
  """HSTU (module docstring), checked at construction.

  Attributes:
    num_items: catalogue size N; item ids are 1..N, 0 = padding.
    num_users: unused (not personalized beyond the sequence).
    max_len: longest input sequence: positions, rab buckets and the attention
      normalizer n (a constant, so that outputs at real positions do not
      depend on the amount of left padding; the official code divides by the
      padded length, which is max_len when inputs are padded to it).
    dim: embedding and hidden width d.
    num_blocks: HSTU layers.
    num_heads: attention heads h.
    qk_dim: query/key width per head d_qk; None = dim // num_heads.
    v_dim: value width per head d_v; None = dim // num_heads.
    dropout_rate: dropout on the input embeddings and each layer's output.
    l2_norm: L2-normalize the output (instead of the final layer norm) and
      the item vectors: cosine scores, as the official code.
    time_buckets: T of the relative time bias (0 = none; the official code
      128): the model then needs ``time_seq`` and ``query_time``.
    dtype: compute dtype, 'float32' or 'bfloat16' (params stay float32).
  """

  num_items: int
  num_users: int
  max_len: int
  dim: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  qk_dim: int | None = None
  v_dim: int | None = None
  dropout_rate: float = 0.2
  l2_norm: bool = False
  time_buckets: int = 0
  dtype: str = "float32"

  def __post_init__(self) -> None:
    super().__post_init__()
    # Fail at construction (create_model), not at the first trace.
    check_fields(self)

  @property
  def head_dims(self) -> tuple[int, int]:
    """``(d_qk, d_v)``, with None resolved to ``dim // num_heads``."""
    default = self.dim // self.num_heads
    return self.qk_dim or default, self.v_dim or default

  @nn.compact
  def __call__(self, item_seq: Array, *, deterministic: bool = True,
               user: Array | None = None, last_only: bool = False,
               segment_ids: Array | None = None, positions: Array | None = None,
               time_seq: Array | None = None, query_time: Array | None = None) -> Array:
    """Encodes left-padded item sequences.

    Args:
      item_seq: ``int32[batch, seq_len]`` item ids, 0 = padding, with
        ``seq_len <= max_len``.
      deterministic: False enables dropout (needs the ``'dropout'`` RNG).
      user: ``int32[batch]``, ignored.
      last_only: return the last position only; the last layer then computes
        that one row.
      segment_ids: ``int32[batch, seq_len]`` for packed rows
        (``packing.pack_batch``): 0 at padding, and positions attend only
        within their own segment.
      positions: ``int32[batch, seq_len]`` positional-embedding rows of packed
        rows. Given together with ``segment_ids``, every segment's outputs
        equal those of the sequence on its own row.
      time_seq: ``int[batch, seq_len]`` each item's timestamp (needed, with
        ``query_time``, when ``time_buckets > 0``; ignored otherwise).
      query_time: ``int[batch, seq_len]`` each position's request time.

    Returns:
      ``float32[batch, seq_len, dim]`` (``[batch, 1, dim]`` with
      ``last_only``); zero at padding positions. Position t depends only on
      items at positions <= t, and not on the amount of left padding.
    """
    del user  # HSTU does not use user ids.
    if item_seq.ndim != 2 or item_seq.shape[1] > self.max_len:
      raise ValueError(f"item_seq must be [batch, seq_len] with seq_len <= max_len="
                       f"{self.max_len}; got shape {item_seq.shape}.")
    dtype = validation.compute_dtype(self.dtype)
    qk_dim, v_dim = self.head_dims
    valid = item_seq != 0  # [batch, seq_len]: the timeline mask
    time_bucket = None
    if self.time_buckets:
      if time_seq is None or query_time is None:
        raise ValueError("model.time_buckets > 0: the model needs time_seq and query_time "
                         "(batches built with timestamps; set model.time_buckets=0 without).")
      if time_seq.shape != item_seq.shape or query_time.shape != item_seq.shape:
        raise ValueError(f"time_seq {time_seq.shape} and query_time {query_time.shape} must "
                         f"have item_seq's shape {item_seq.shape}.")
      time_bucket = time_buckets(query_time, time_seq, self.time_buckets)  # [b, L, L]

    # Embeddings are summed in float32 (param dtype), then cast for compute.
    x = item_embedding.ItemEmbedding(
        self.num_items + 1, self.dim, embedding_init=nn.initializers.truncated_normal(0.02),
        name=item_embedding.ITEM_TABLE[0])(item_seq)
    x = x * (self.dim**0.5)
    x = x + encoder.PositionalEmbedding(
        self.max_len, self.dim, embedding_init=nn.initializers.truncated_normal(self.dim**-0.5),
        name="pos_embed")(item_seq.shape[1], positions)
    x = layers.Dropout(self.dropout_rate)(x.astype(dtype), deterministic=deterministic)
    x = x * valid[..., None].astype(dtype)

    for i in range(self.num_blocks):
      last = last_only and i == self.num_blocks - 1
      x = HSTULayer(num_heads=self.num_heads, qk_dim=qk_dim, v_dim=v_dim, max_len=self.max_len,
                    time_buckets=self.time_buckets, dropout_rate=self.dropout_rate,
                    dtype=dtype, name=f"block_{i}")(
          x, valid, deterministic=deterministic, last_only=last, segment_ids=segment_ids,
          time_bucket=time_bucket[:, -1:] if last and time_bucket is not None else time_bucket)
    if last_only:
      x, valid = x[:, -1:], valid[:, -1:]

    if self.l2_norm:  # the official code's output: unit states, cosine scores
      x = layers.l2_normalize(x)
    else:
      x = nn.LayerNorm(epsilon=EPSILON, dtype=dtype, use_fast_variance=False,
                       name="final_ln")(x)
    # Zero padding positions so nothing downstream can read a spurious state.
    return (x * valid[..., None].astype(x.dtype)).astype(jnp.float32)
