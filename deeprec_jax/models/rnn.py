"""GRU4Rec-style recurrent next-item model: peephole LSTM, LSTM or GRU.

The model embeds the left-padded item sequence, runs ``num_layers`` stacked
recurrent layers over it and returns the hidden state at every position;
``hidden[:, t]`` summarises items ``0..t`` and is scored against the shared
item table to predict item ``t + 1`` (the ``'autoregressive'`` task).

Left padding: batches are padded with item 0 at the *front*, so
``nn.RNN(seq_lengths=...)`` (which assumes right padding) does not apply.
Instead every layer scans a masked step that keeps the previous carry where the
input is padding. The carry therefore stays at its initial value (zeros) until
the first real item, and the outputs at real positions do not depend on how
much padding precedes them (nor on the padding embedding row). Outputs at
padded positions are zero.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from deeprec_jax.models import image_cnn, item_embedding, layers, validation

CELLS = ("peephole_lstm", "lstm", "gru")

# Gate blocks of PeepholeLSTMCell's fused kernels and bias, in this order.
GATE_ORDER = ("i", "f", "c", "o")

Array = jax.Array
Initializer = Callable[..., Array]
LSTMCarry = tuple[Array, Array]


def blockwise_orthogonal(num_blocks: int) -> Initializer:
  """Initialiser of a ``[H, num_blocks * H]`` kernel as independent orthogonal blocks.

  One orthogonal matrix per gate, as flax's LSTM cells get from their separate
  per-gate kernels; an orthogonal init of the whole ``[H, 4H]`` matrix would
  instead couple the gates.
  """

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    rows, cols = shape
    if cols % num_blocks:
      raise ValueError(f"blockwise_orthogonal: {cols} columns do not split into "
                       f"{num_blocks} blocks.")
    keys = jax.random.split(key, num_blocks)
    orthogonal = nn.initializers.orthogonal()
    return jnp.concatenate(
        [orthogonal(k, (rows, cols // num_blocks), dtype) for k in keys], axis=-1)

  return init


class PeepholeLSTMCell(nn.RNNCellBase):
  r"""LSTM cell with diagonal peephole connections (Gers & Schmidhuber, 2000).

  Exactly::

    i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)
    f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xc x_t + W_hc h_{t-1} + b_c)
    o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)   # the *new* cell c_t
    h_t = o_t ⊙ tanh(c_t)

  Parameters (``H = features``, gate blocks in ``GATE_ORDER = (i, f, c, o)``):

  * ``input_kernel [in, 4H]``: ``[W_xi | W_xf | W_xc | W_xo]`` (x @ kernel);
  * ``recurrent_kernel [H, 4H]``: ``[W_hi | W_hf | W_hc | W_ho]`` (h @ kernel);
  * ``bias [4H]``: ``[b_i | b_f | b_c | b_o]``;
  * ``peephole_i``, ``peephole_f``, ``peephole_o`` ``[H]``: ``w_ci, w_cf, w_co``.

  The matmuls run in ``dtype``; the element-wise cell update runs in the
  carry's dtype (``param_dtype``, float32) so that the cell state does not
  accumulate bfloat16 rounding over long sequences.

  Call convention as flax's cells: ``carry = (c, h)``, each ``[*batch, H]``;
  ``__call__(carry, x [*batch, in]) -> ((c_t, h_t), h_t)``.

  Attributes:
    features: hidden size H.
    kernel_init: initialiser of ``input_kernel``.
    recurrent_kernel_init: initialiser of ``recurrent_kernel`` (one orthogonal
      block per gate).
    bias_init: initialiser of ``bias``.
    peephole_init: initialiser of the peephole vectors. Random rather than zero,
      so that an initialised cell already differs from a plain LSTM.
    dtype: computation dtype of the matmuls (None: inferred from the inputs).
    param_dtype: dtype of the parameters and of the carry.
    carry_init: initialiser of ``(c, h)``.
  """

  features: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  recurrent_kernel_init: Initializer = blockwise_orthogonal(len(GATE_ORDER))
  bias_init: Initializer = nn.initializers.zeros_init()
  peephole_init: Initializer = nn.initializers.normal(stddev=0.1)
  dtype: Any = None
  param_dtype: Any = jnp.float32
  carry_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, carry: LSTMCarry, inputs: Array) -> tuple[LSTMCarry, Array]:
    """One step.

    Args:
      carry: ``(c_{t-1}, h_{t-1})``, each ``[*batch, features]``.
      inputs: ``x_t [*batch, in_features]``.

    Returns:
      ``((c_t, h_t), h_t)``.
    """
    c, h = carry
    width = len(GATE_ORDER) * self.features
    input_kernel = self.param("input_kernel", self.kernel_init, (inputs.shape[-1], width),
                              self.param_dtype)
    recurrent_kernel = self.param("recurrent_kernel", self.recurrent_kernel_init,
                                  (self.features, width), self.param_dtype)
    bias = self.param("bias", self.bias_init, (width,), self.param_dtype)
    peephole_i, peephole_f, peephole_o = (
        self.param(f"peephole_{gate}", self.peephole_init, (self.features,), self.param_dtype)
        for gate in ("i", "f", "o"))

    x, h_in, input_kernel, recurrent_kernel = flax_dtypes.promote_dtype(
        inputs, h, input_kernel, recurrent_kernel, dtype=self.dtype)
    # One fused matmul per operand for all four gates.
    pre = (x @ input_kernel + h_in @ recurrent_kernel).astype(c.dtype) + bias.astype(c.dtype)
    pre_i, pre_f, pre_c, pre_o = jnp.split(pre, len(GATE_ORDER), axis=-1)

    i = jax.nn.sigmoid(pre_i + peephole_i.astype(c.dtype) * c)
    f = jax.nn.sigmoid(pre_f + peephole_f.astype(c.dtype) * c)
    new_c = f * c + i * jnp.tanh(pre_c)
    o = jax.nn.sigmoid(pre_o + peephole_o.astype(c.dtype) * new_c)
    new_h = o * jnp.tanh(new_c)
    return (new_c, new_h), new_h

  @nn.nowrap
  def initialize_carry(self, rng: Array, input_shape: tuple[int, ...]) -> LSTMCarry:
    """Returns ``(c, h)``, each ``[*input_shape[:-1], features]``."""
    shape = tuple(input_shape[:-1]) + (self.features,)
    key_c, key_h = jax.random.split(rng)
    return (self.carry_init(key_c, shape, self.param_dtype),
            self.carry_init(key_h, shape, self.param_dtype))

  @property
  def num_feature_axes(self) -> int:
    return 1


def make_cell(kind: str, features: int, dtype: Any, **kwargs: Any) -> nn.RNNCellBase:
  """The recurrent cell named ``kind`` (one of ``CELLS``) with float32 params."""
  if kind == "peephole_lstm":
    return PeepholeLSTMCell(features=features, dtype=dtype, **kwargs)
  if kind == "lstm":
    return nn.OptimizedLSTMCell(features=features, dtype=dtype, **kwargs)
  if kind == "gru":
    return nn.GRUCell(features=features, dtype=dtype, **kwargs)
  raise ValueError(f"model.cell: unknown cell {kind!r}; expected one of {', '.join(CELLS)}.")


class MaskedStep(nn.Module):
  """One recurrent step that holds the carry where the input is padding.

  Scanned over time by ``Model``; the cell's parameters live under ``cell``.

  Attributes:
    kind: the cell, one of ``CELLS``.
    features: hidden size.
    dtype: computation dtype.
  """

  kind: str
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry: Any, inputs: tuple[Array, Array]) -> tuple[Any, Array]:
    """Args: carry (the cell's); ``inputs = (x [B, D_in], mask bool[B])``.

    Returns:
      ``(carry', y [B, features])``: the cell's new carry and output where
      ``mask``, else the old carry and zeros.
    """
    x, mask = inputs
    new_carry, y = make_cell(self.kind, self.features, self.dtype, name="cell")(carry, x)
    keep = mask[:, None]
    # The cast keeps the scan carry's dtype fixed (float32) under bfloat16 compute.
    carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old).astype(old.dtype),
                         new_carry, carry)
    return carry, jnp.where(keep, y, jnp.zeros_like(y))


def _validate(model: Any) -> None:
  """Raises ValueError naming ``model.<field>`` for bad hyper-parameters."""
  validation.check_sizes(model)
  validation.validate_fields(model, {
      "dim": lambda m, f: validation.check_int(m, f, 1),
      "cell": lambda m, f: validation.check_choice(m, f, CELLS),
      "num_layers": lambda m, f: validation.check_int(m, f, 1),
      "dropout_rate": validation.check_fraction,
  })
  validation.compute_dtype(model.dtype)
  image_cnn.check_fields(model)


class Model(image_cnn.ImageTower, nn.Module):
  """Stacked recurrent next-item model (GRU4Rec-style, trained autoregressively).

  Attributes:
    num_items: catalogue size; item ids are ``1..num_items``, 0 is padding.
    num_users: unused (the contract passes it to every model).
    max_len: training sequence length; only validated, since the recurrence
      runs on any length.
    dim: embedding and hidden width.
    cell: ``'peephole_lstm'`` (``PeepholeLSTMCell``), ``'lstm'``
      (``nn.OptimizedLSTMCell``) or ``'gru'`` (``nn.GRUCell``).
    num_layers: stacked recurrent layers.
    dropout_rate: dropout on the item embeddings and between layers.
    dtype: computation dtype, ``'float32'`` or ``'bfloat16'``; parameters and
      the recurrent carry stay float32, the output is float32.
    item_encoder: item vectors from the id table ('id'), the pictures
      ('image', ``image_cnn.ItemImageCNN`` with ``out_dim = dim``) or their
      sum ('id+image'); see ``models.item_vectors``.
    image_channels: the image tower's conv channels.
    image_kernel: its square kernel side.
    image_pool: its max-pool window side.
    image_dense: its hidden dense width (0 = none).
    id_dropout: 'id+image' training drops each item's id row with this
      probability per step, so that pictures alone must carry items too.
  """

  num_items: int
  num_users: int
  max_len: int
  dim: int = 64
  cell: str = "peephole_lstm"
  num_layers: int = 1
  dropout_rate: float = 0.2
  dtype: str = "float32"
  item_encoder: str = "id"
  image_channels: tuple[int, ...] = (32, 64, 128)
  image_kernel: int = 3
  image_pool: int = 2
  image_dense: int = 128
  id_dropout: float = 0.0

  def __post_init__(self) -> None:
    _validate(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, item_seq: Array, *, deterministic: bool = True,
               user: Array | None = None, last_only: bool = False,
               segment_ids: Array | None = None, positions: Array | None = None,
               item_vectors: Array | None = None) -> Array:
    """Hidden states for next-item prediction.

    Args:
      item_seq: ``int32[B, L]``, left-padded with 0.
      user: ``int32[B]``, ignored.
      deterministic: False enables dropout (needs the ``'dropout'`` RNG).
      last_only: return the last position only (the scan still runs over all).
      segment_ids: must be None: the recurrence does not pack rows.
      positions: must be None.
      item_vectors: ``float[N + 1, dim]`` (``models.item_vectors``) to embed
        the inputs with instead of the id table; None = the table.

    Returns:
      ``hidden float32[B, L, dim]`` (``[B, 1, dim]`` with ``last_only``);
      ``hidden[:, t]`` depends only on ``item_seq[:, :t + 1]``, and is zero
      where ``item_seq`` is padding.
    """
    del user  # A session model: the history is the user.
    layers.reject_packing("rnn", segment_ids, positions)
    if item_seq.ndim != 2:
      raise ValueError(f"item_seq must be [batch, seq_len], got shape {item_seq.shape}.")
    compute_dtype = jnp.dtype(self.dtype)
    mask = item_seq > 0  # [B, L]
    x = item_embedding.ItemEmbedding(self.num_items + 1, self.dim, dtype=compute_dtype,
                                     name=item_embedding.ITEM_TABLE[0])(item_seq)
    if item_vectors is not None:
      x = jnp.take(item_vectors, item_seq, axis=0).astype(compute_dtype)
    x = layers.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    # nn.scan (the lifted scan under nn.RNN) over time, with the mask as a
    # second scanned input: one compiled step whatever the length.
    scanned_step = nn.scan(MaskedStep, variable_broadcast="params",
                           split_rngs={"params": False}, in_axes=1, out_axes=1)
    for layer in range(self.num_layers):
      if layer > 0:
        x = layers.Dropout(self.dropout_rate)(x, deterministic=deterministic)
      # Unbound cell, only to build the initial carry (zeros, float32).
      carry = make_cell(self.cell, self.dim, compute_dtype, parent=None).initialize_carry(
          jax.random.key(0), x[:, 0].shape)
      _, x = scanned_step(self.cell, self.dim, compute_dtype, name=f"layer_{layer}")(
          carry, (x, mask))
    if last_only:
      x = x[:, -1:]
    return x.astype(jnp.float32)
