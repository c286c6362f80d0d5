"""Caser: convolutional sequence embedding (Tang & Wang, WSDM 2018).

The ``L`` most recent items form an ``L x d`` "image" ``E`` (one embedding per
row, oldest first). Two kinds of convolution read it:

* horizontal: for every height ``h = 1..L``, ``num_horizontal`` filters of size
  ``h x d`` slide over the rows (union-level and point-level sequential
  patterns), each followed by ``activation_conv`` and a max-pool over the
  ``L - h + 1`` positions -> ``o [num_horizontal * L]``;
* vertical: ``num_vertical`` filters of size ``L x 1``, i.e. learned weighted
  sums of the ``L`` rows (point-level patterns) -> ``õ [num_vertical * d]``.
  As in the paper and the authors' code, no activation here.

``z = activation_fc(W [o; õ] + b)`` after dropout on ``[o; õ]``, as in the
authors' code.

Head (deviation from the paper): the paper scores item ``j`` with a separate
output embedding ``W'_j ∈ R^{2d}`` and bias ``b'_j`` against ``[z; P_u]``. The
project's contract scores every model with the *shared* input table
``[num_items + 1, d]``, so the model returns
``hidden = A [z; P_u] + c  [B, d]`` (the ``output`` Dense layer, no
activation). Then ``score_j = e_j · A [z; P_u] + e_j · c``: the paper's
``W'_j`` is tied to ``A^T e_j`` (rank ``d`` instead of a free ``2d`` vector per
item) and ``b'_j`` to ``e_j · c``. ``A = [I | I], c = 0`` recovers the simpler
``z + P_u``, so this head contains that choice too.

Padding: windows shorter than ``L`` are left-padded with item 0; the padding
rows of ``E`` are zeroed, so a padded window reads exactly as zero rows,
whatever the (trainable) padding embedding row holds.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import image_cnn, item_embedding, layers, validation

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}

Array = jax.Array


def _validate(model: Any) -> None:
  """Raises ValueError naming ``model.<field>`` for bad hyper-parameters."""
  validation.check_sizes(model, needs_users=True)
  validation.validate_fields(model, {
      "dim": lambda m, f: validation.check_int(m, f, 1),
      "num_horizontal": lambda m, f: validation.check_int(m, f, 0),
      "num_vertical": lambda m, f: validation.check_int(m, f, 0),
  })
  if model.num_horizontal == 0 and model.num_vertical == 0:
    raise ValueError("model.num_horizontal and model.num_vertical cannot both be 0: "
                     "Caser needs at least one kind of convolution.")
  validation.validate_fields(model, {
      "dropout_rate": validation.check_fraction,
      "activation_conv": lambda m, f: validation.check_choice(m, f, ACTIVATIONS),
      "activation_fc": lambda m, f: validation.check_choice(m, f, ACTIVATIONS),
  })
  validation.compute_dtype(model.dtype)
  image_cnn.check_fields(model)


class Model(image_cnn.ImageTower, nn.Module):
  """Caser over a window of the ``max_len`` most recent items.

  Attributes:
    num_items: catalogue size; item ids are ``1..num_items``, 0 is padding.
    num_users: number of users; user ids are ``0..num_users - 1``.
    max_len: the window length ``L``; ``item_seq`` must be ``[B, L]``.
    dim: embedding width ``d`` (items, users, ``z`` and the output).
    num_horizontal: filters per height ``h = 1..L`` (0 = no horizontal conv).
    num_vertical: vertical ``L x 1`` filters (0 = no vertical conv).
    dropout_rate: dropout on the concatenated convolution features.
    activation_conv: activation of the horizontal convolutions.
    activation_fc: activation of the fully-connected layer giving ``z``.
    dtype: computation dtype, ``'float32'`` or ``'bfloat16'``; parameters stay
      float32, the output is float32.
    item_encoder: item vectors from the id table ('id'), the pictures
      ('image', ``image_cnn.ItemImageCNN`` with ``out_dim = dim``) or their
      sum ('id+image'); see ``models.item_vectors``.
    image_channels: the image tower's conv channels.
    image_kernel: its square kernel side.
    image_pool: its max-pool window side.
    image_dense: its hidden dense width (0 = none).
    id_dropout: 'id+image' training drops each item's id row with this
      probability per step.
  """

  num_items: int
  num_users: int
  max_len: int
  dim: int = 50
  num_horizontal: int = 16
  num_vertical: int = 4
  dropout_rate: float = 0.5
  activation_conv: str = "relu"
  activation_fc: str = "relu"
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
    """The window's hidden state.

    Args:
      item_seq: ``int32[B, L]``, the ``L = max_len`` most recent items, oldest
        first, left-padded with 0.
      user: ``int32[B]``, required.
      deterministic: False enables dropout (needs the ``'dropout'`` RNG).
      last_only: ignored: the output is one state per window already.
      segment_ids: must be None (windows are not packed).
      positions: must be None.
      item_vectors: ``float[N + 1, dim]`` (``models.item_vectors``) to embed
        the window with instead of the id table; None = the table.

    Returns:
      ``hidden float32[B, dim]``; scores are ``hidden @ item_table.T`` (or
      ``@ item_vectors.T``).
    """
    del last_only
    layers.reject_packing("caser", segment_ids, positions)
    length = self.max_len
    if item_seq.ndim != 2 or item_seq.shape[1] != length:
      raise ValueError(f"item_seq must be [batch, model.max_len={length}] (Caser's window), "
                       f"got shape {item_seq.shape}.")
    if user is None:
      raise ValueError("Caser needs the user ids: call it with user=int32[batch].")
    if user.shape != item_seq.shape[:1]:
      raise ValueError(f"user must be [batch={item_seq.shape[0]}], got shape {user.shape}.")
    compute_dtype = jnp.dtype(self.dtype)

    image = item_embedding.ItemEmbedding(self.num_items + 1, self.dim, dtype=compute_dtype,
                                         name=item_embedding.ITEM_TABLE[0])(item_seq)  # [B, L, d]
    if item_vectors is not None:
      image = jnp.take(item_vectors, item_seq, axis=0).astype(compute_dtype)
    # Zero the padding rows: left padding must read as zero rows for both
    # kinds of filter, whatever the padding embedding has learned.
    image = image * (item_seq > 0)[..., None].astype(compute_dtype)

    features = []
    if self.num_vertical:
      # An L x 1 filter is a weighted sum of the rows: a Dense over the time
      # axis, applied to every embedding column. [B, d, L] -> [B, d, n_v].
      vertical = nn.Dense(self.num_vertical, dtype=compute_dtype, name="vertical")(
          jnp.swapaxes(image, 1, 2))
      # Filter-major flattening, as the authors' code: [B, n_v * d].
      features.append(jnp.swapaxes(vertical, 1, 2).reshape(item_seq.shape[0], -1))
    if self.num_horizontal:
      activation = ACTIVATIONS[self.activation_conv]
      for height in range(1, length + 1):
        # An h x d filter over the full width is a 1-D conv with d channels.
        conv = nn.Conv(self.num_horizontal, kernel_size=(height,), padding="VALID",
                       dtype=compute_dtype, name=f"horizontal_{height}")
        features.append(activation(conv(image)).max(axis=1))  # [B, n_h]
    features = jnp.concatenate(features, axis=-1)
    features = layers.Dropout(self.dropout_rate)(features, deterministic=deterministic)
    z = ACTIVATIONS[self.activation_fc](
        nn.Dense(self.dim, dtype=compute_dtype, name="fc")(features))  # [B, d]

    user_emb = nn.Embed(self.num_users, self.dim, dtype=compute_dtype,
                        name="user_embed")(user)  # [B, d]
    # Projects [z; P_u] into the shared item space (see the module docstring).
    hidden = nn.Dense(self.dim, dtype=compute_dtype, name="output")(
        jnp.concatenate([z, user_emb], axis=-1))
    return hidden.astype(jnp.float32)
