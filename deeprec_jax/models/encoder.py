"""The self-attention encoder: feed-forward, positions, the block, the shared fields.

``SelfAttentionBlock`` is SASRec's pre-LN block over ``layers``' attention
kernels; ``AttentionEncoder`` holds the fields and the block stack that
SASRec, BERT4Rec and HSTU share. Conventions (padding, masks, dtypes) are
those of ``layers``.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import image_cnn, item_embedding, layers, validation

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]


class PointwiseFeedForward(nn.Module):
  """Position-wise FFN: Dense -> activation -> dropout -> Dense -> dropout.

  SASRec's two kernel-size-1 convolutions (``2 * (dim * dim + dim)``
  parameters with the default ``hidden_dim = dim``). The residual connection
  is added by the caller (``SelfAttentionBlock``).

  Attributes:
    hidden_dim: inner width; None = the input feature size (as in SASRec).
    activation: ``nn.relu`` (SASRec) or ``nn.gelu`` (BERT4Rec).
    dropout_rate: dropout after each dense layer's activation / output.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    kernel_init: kernel initializer.
  """

  hidden_dim: int | None = None
  activation: Callable[[Array], Array] = nn.relu
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    """``[batch, seq_len, dim]`` -> ``[batch, seq_len, dim]``."""
    shape, features = x.shape, x.shape[-1]
    # As one [batch * seq_len, dim] matrix: the kernel gradients become plain
    # 2-D matmuls (the FFN alone, forward and backward: 9.5 -> 6.3 ms at
    # SASRec's ML-1M shapes). Dropout masks are counted per flattened row, so
    # they are the same.
    x = x.reshape(-1, features)
    dense = lambda size, name: nn.Dense(size, dtype=self.dtype, param_dtype=self.param_dtype,
                                        kernel_init=self.kernel_init, name=name)
    y = self.activation(dense(self.hidden_dim or features, "dense_in")(x))
    y = layers.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(features, "dense_out")(y)
    return layers.Dropout(self.dropout_rate)(y, deterministic=deterministic).reshape(shape)


class PositionalEmbedding(nn.Module):
  """Learned positional embedding of ``max_len`` positions, aligned to the right.

  A sequence of length ``seq_len <= max_len`` gets rows
  ``max_len - seq_len .. max_len - 1``: the last (most recent) position always
  uses row ``max_len - 1``. Since sequences are left-padded, this makes a
  sequence's real items get the same embeddings whether it is padded to
  ``seq_len`` or to ``max_len``, which is what makes padding invariance hold.

  Attributes:
    max_len: number of positions (rows).
    features: embedding size.
    param_dtype: parameter dtype.
    embedding_init: initializer of the ``embedding`` table ``[max_len, features]``.
  """

  max_len: int
  features: int
  param_dtype: Dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, seq_len: int, positions: Array | None = None) -> Array:
    """Returns ``[1, seq_len, features]`` in ``param_dtype``.

    Args:
      seq_len: the input length L (rows ``max_len - L .. max_len - 1``).
      positions: ``int[batch, seq_len]`` explicit rows instead (packed rows,
        where each sequence keeps its own right-aligned rows); the result is
        then ``[batch, seq_len, features]``.
    """
    if seq_len > self.max_len:
      raise ValueError(f"sequence length {seq_len} exceeds max_len={self.max_len} "
                       "(config key data.max_len).")
    table = self.param("embedding", self.embedding_init, (self.max_len, self.features),
                       self.param_dtype)
    if positions is not None:
      return jnp.take(table, positions, axis=0)
    return table[self.max_len - seq_len:][None]


class SelfAttentionBlock(nn.Module):
  """A SASRec self-attention block, as in the public SASRec code, or a pre-LN one.

  With ``x`` the block input ``[batch, seq_len, dim]`` and ``arrangement='sasrec'``:

      q = LN_1(x)
      h = q + Attention(query=q, key=value=x, mask)   # residual adds LN_1(x)
      f = LN_2(h)
      y = (f + FFN(f)) * valid                        # residual adds LN_2(h)

  This is SASRec's arrangement (``kang205/SASRec`` ``model.py`` and
  ``pmixer/SASRec.pytorch``): the query is layer-normed but the keys/values
  are the raw input, and the residuals add the *normalized* tensors (not x, as
  a textbook pre-LN transformer would). Multiplying by the timeline mask
  zeroes padding positions so that they carry nothing into the next block.
  The model applies a final LayerNorm after the last block.

  ``arrangement='pre_ln'`` is the textbook pre-LN transformer block that later
  reimplementations use (queries, keys and values all normalized; residuals
  add the raw input):

      h = x + Attention(LN_1(x))
      y = (h + FFN(LN_2(h))) * valid

  ``arrangement='post_ln'`` is BERT's (and the original Transformer's) block,
  as the BERT4Rec reimplementations built on Hugging Face's ``BertModel`` run
  it: each sublayer's residual sum is layer-normed:

      h = LN_1(x + Attention(x))
      y = LN_2(h + FFN(h)) * valid

  Attributes:
    arrangement: 'sasrec', 'pre_ln' or 'post_ln' (``validation.BLOCK_ARRANGEMENTS``).
    attention: 'dot_product' or 'additive'.
    attention_impl: 'xla' (``layers``) or 'pallas' (``pallas_attention``).
    num_heads: attention heads.
    dropout_rate: dropout on attention weights and inside the FFN.
    dtype: compute dtype (layer-norm statistics and softmax stay float32).
    param_dtype: parameter dtype.
    causal: forbid attending to later positions (SASRec: True; BERT4Rec: False).
    activation: FFN activation (``nn.relu`` for SASRec, ``nn.gelu`` for BERT4Rec).
    ffn_dim: FFN inner width; None = dim.
    attention_dim: additive attention-hidden size; None = dim.
    epsilon: layer-norm epsilon.
    kernel_init: initializer of all dense kernels.
    qkv_init: initializer of the query/key/value kernels instead (None = kernel_init).
  """

  arrangement: str = "sasrec"
  attention: str = "dot_product"
  attention_impl: str = "xla"
  num_heads: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = True
  activation: Callable[[Array], Array] = nn.relu
  ffn_dim: int | None = None
  attention_dim: int | None = None
  epsilon: float = layers.LAYER_NORM_EPSILON
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  qkv_init: Initializer | None = None

  @nn.compact
  def __call__(self, x: Array, valid: Array, *, deterministic: bool = True,
               last_only: bool = False, segment_ids: Array | None = None) -> Array:
    """Applies the block.

    Args:
      x: ``[batch, seq_len, dim]``, zero at padding positions.
      valid: ``bool[batch, seq_len]``, True at real items.
      deterministic: disables dropout.
      segment_ids: ``int[batch, seq_len]`` for packed rows: attention stays
        within each segment (``layers.attention_mask``).
      last_only: compute the output at the last position only (the queries,
        output projection and FFN of one row; keys and values still cover
        every position). For a model's last block when only the most recent
        state is read (evaluation, recommendation).

    Returns:
      ``[batch, seq_len, dim]`` in ``dtype`` (``[batch, 1, dim]`` with
      ``last_only``), zero at padding positions.
    """
    if self.attention not in validation.ATTENTION_KINDS:
      raise ValueError(f"attention must be one of {', '.join(validation.ATTENTION_KINDS)}; "
                       f"got {self.attention!r}.")
    if self.arrangement not in validation.BLOCK_ARRANGEMENTS:
      raise ValueError(f"arrangement must be one of {', '.join(validation.BLOCK_ARRANGEMENTS)}; "
                       f"got {self.arrangement!r}.")
    layer_norm = lambda name: nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype,
                                           param_dtype=self.param_dtype,
                                           use_fast_variance=False, name=name)
    common = dict(num_heads=self.num_heads, dropout_rate=self.dropout_rate, dtype=self.dtype,
                  param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                  qkv_init=self.qkv_init, causal=self.causal,
                  implementation=self.attention_impl, name="attention")
    if self.attention == "dot_product":
      attend = layers.DotProductAttention(**common)
    else:
      attend = layers.AdditiveAttention(hidden_dim=self.attention_dim, **common)

    x = inputs = x.astype(self.dtype)
    # [batch, 1, seq_len, seq_len]
    mask = layers.attention_mask(valid, causal=self.causal, segment_ids=segment_ids)
    if last_only:
      mask, valid = mask[:, :, -1:], valid[:, -1:]
    ffn = PointwiseFeedForward(hidden_dim=self.ffn_dim, activation=self.activation,
                               dropout_rate=self.dropout_rate, dtype=self.dtype,
                               param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                               name="ffn")
    if self.arrangement == "post_ln":
      q = x[:, -1:] if last_only else x
      h = layer_norm("ln_attention")(q + attend(q, x, mask, deterministic=deterministic))
      y = layer_norm("ln_ffn")(h + ffn(h, deterministic=deterministic))
      return y * valid[..., None].astype(y.dtype)
    pre_ln = self.arrangement == "pre_ln"
    if pre_ln:
      x = layer_norm("ln_attention")(x)  # keys and values see the normalized input too
      q = x[:, -1:] if last_only else x
      residual = inputs[:, -1:] if last_only else inputs
    else:
      q = residual = layer_norm("ln_attention")(x[:, -1:] if last_only else x)
    h = residual + attend(q, x, mask, deterministic=deterministic)
    f = layer_norm("ln_ffn")(h)
    y = (h if pre_ln else f) + ffn(f, deterministic=deterministic)
    return y * valid[..., None].astype(y.dtype)


class AttentionEncoder(nn.Module):
  """The fields every self-attention recommender takes (SASRec, BERT4Rec), checked at construction.

  Attributes:
    num_items: catalogue size N; item ids are 1..N, 0 = padding.
    num_users: unused (not personalized beyond the sequence).
    max_len: longest input sequence (number of learned positions).
    dim: embedding and hidden width.
    num_blocks: self-attention blocks.
    num_heads: attention heads.
    dropout_rate: dropout on embeddings, attention weights and FFN.
    init_std: 0 = the model's own initializer (SASRec: Xavier uniform, as
      its code; BERT4Rec: truncated normal 0.02, as BERT); > 0 = normal(0,
      init_std) (BERT4Rec: truncated), as the SASRec+ and RecBole
      reimplementations initialize SASRec (0.02).
    ffn_dim: the FFN's inner width; 0 = dim (SASRec); BERT uses 4 * dim.
    l2_norm: L2-normalize the output states and the item vectors
      (``models.item_vectors``): scores are cosines, as generative-recommenders
      scores SASRec and HSTU (with ``train.temperature`` 0.05).
    output_table: score items against a separate output table
      (``item_embedding.OUTPUT_TABLE``) instead of the input one, as gSASRec
      does; 'id' item encoder and dense optimizers only.
    block: the blocks' arrangement, 'sasrec' (the original code's) or
      'pre_ln' (``SelfAttentionBlock``).
    positions_from: 'end': the most recent item gets positional row
      ``max_len - 1`` (the SASRec code's left padding); 'start': the oldest
      input item gets row 0 (the right-padded SASRec+ and BERT codes).
    qkv_init: 'same': the query/key/value kernels are initialized like the
      other kernels; 'torch_mha': Xavier uniform over the stacked ``[3d, d]``
      in-projection, as PyTorch's ``nn.MultiheadAttention``, which the
      SASRec+ code leaves at that default under ``init_std``.
    attention: 'dot_product' or 'additive'.
    attention_impl: 'xla' or 'pallas' (kernels of ``pallas_attention``,
      interpret mode on CPU; attention dropout must be 0).
    positional: add the learned positional embedding.
    dtype: compute dtype, 'float32' or 'bfloat16' (params stay float32).
    item_encoder: item vectors from the id table ('id'), the pictures' CNN
      ('image') or their sum ('id+image'); see ``models.item_vectors``.
    image_channels: the image tower's conv channels (``image_cnn.ItemImageCNN``).
    image_kernel: its square kernel side.
    image_pool: its max-pool window side.
    image_dense: its hidden dense width (0 = none).
    id_dropout: 'id+image' training drops each item's id row with this
      probability per step, so that pictures alone must carry items too.
  """

  num_items: int
  num_users: int
  max_len: int
  dim: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  dropout_rate: float = 0.2
  init_std: float = 0.0
  ffn_dim: int = 0
  l2_norm: bool = False
  output_table: bool = False
  block: str = "sasrec"
  positions_from: str = "end"
  qkv_init: str = "same"
  attention: str = "dot_product"
  attention_impl: str = "xla"
  positional: bool = True
  dtype: str = "float32"
  item_encoder: str = "id"
  image_channels: tuple[int, ...] = (32, 64, 128)
  image_kernel: int = 3
  image_pool: int = 2
  image_dense: int = 128
  id_dropout: float = 0.0

  def __post_init__(self) -> None:
    super().__post_init__()
    # Fail at construction (create_model), not at the first trace.
    validation.check_attention_encoder(self)
    image_cnn.check_fields(self)

  def blocks(self, x: Array, valid: Array, *, causal: bool, activation: Callable[[Array], Array],
             kernel_init: Initializer, dtype: Dtype, deterministic: bool, last_only: bool,
             segment_ids: Array | None) -> Array:
    """``num_blocks`` ``SelfAttentionBlock``s named ``block_<i>``, called from ``__call__``.

    ``x [batch, seq_len, dim]`` -> ``[batch, seq_len, dim]``, or
    ``[batch, 1, dim]`` with ``last_only`` (the last block computes only the
    last position).
    """
    for i in range(self.num_blocks):
      last = last_only and i == self.num_blocks - 1
      x = SelfAttentionBlock(arrangement=self.block, attention=self.attention,
                             attention_impl=self.attention_impl, num_heads=self.num_heads,
                             ffn_dim=self.ffn_dim or None,
                             dropout_rate=self.dropout_rate, dtype=dtype, causal=causal,
                             activation=activation, kernel_init=kernel_init,
                             qkv_init=self.qkv_initializer(), name=f"block_{i}")(
          x, valid, deterministic=deterministic, last_only=last, segment_ids=segment_ids)
    return x

  def qkv_initializer(self) -> Initializer | None:
    """The Q/K/V kernels' initializer of ``qkv_init`` (None: the blocks' kernel_init)."""
    if self.qkv_init == "torch_mha":
      # torch's xavier_uniform_ on the stacked [3d, d] matrix: variance 1 / (2d),
      # half of flax's Xavier on one [d, d] kernel.
      return nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
    return None

  def position_rows(self, item_seq: Array, positions: Array | None,
                    segment_ids: Array | None) -> Array | None:
    """Positional rows for ``positions_from`` (None: ``PositionalEmbedding``'s own, right-aligned).

    ``item_seq`` is left-padded ``[batch, seq_len]``; packed rows pass their
    right-aligned ``positions`` and ``segment_ids``. With 'start' each
    sequence's oldest input item gets row 0: ``positions`` minus the
    smallest row of its segment, or, unpacked, the index past the padding.
    """
    if self.positions_from == "end":
      return positions
    if positions is None:
      length = jnp.sum(item_seq != 0, axis=1, keepdims=True)
      return jnp.maximum(jnp.arange(item_seq.shape[1]) - (item_seq.shape[1] - length), 0)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, seq_len, seq_len]
    first = jnp.min(jnp.where(same, positions[:, None, :], self.max_len), axis=-1)
    return positions - first

  def make_output_table(self, embedding_init: Initializer) -> None:
    """Creates the ``output_table`` rows at init (called from ``__call__``; no-op when off)."""
    if self.output_table:
      item_embedding.ItemEmbedding(self.num_items + 1, self.dim, embedding_init=embedding_init,
                                   name=item_embedding.OUTPUT_TABLE[0])(
          jnp.zeros((0,), jnp.int32))

  def check_input(self, item_seq: Array) -> None:
    """Raises unless ``item_seq`` is ``[batch, seq_len]`` with ``seq_len <= max_len``."""
    if item_seq.ndim != 2 or item_seq.shape[1] > self.max_len:
      raise ValueError(f"item_seq must be [batch, seq_len] with seq_len <= max_len="
                       f"{self.max_len}; got shape {item_seq.shape}.")
