"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

A causal stack of self-attention blocks over the left-padded item sequence;
the hidden state at position t predicts the item at t + 1 by a dot product with
the shared item embedding. Follows the public code (``kang205/SASRec``,
``pmixer/SASRec.pytorch``):

    x = Dropout(E[item_seq] * sqrt(dim) + P) * valid     # E row 0 = padding
    x = SelfAttentionBlock(causal=True)(x) x num_blocks  # see layers.py
    hidden = LayerNorm(x) * valid

with learned positions ``P`` aligned to the right end of the sequence (see
``encoder.PositionalEmbedding``) and Xavier-uniform initialization throughout,
as in the public code (``init_std`` > 0: normal instead). Parameters
(dot-product attention, N items, d = dim, L = max_len, B = num_blocks):

    (N + 1) d + L d + B [2 * 2d + 4 (d^2 + d) + 2 (d^2 + d)] + 2d

(additive attention: ``3 (d^2 + d)`` instead of ``4 (d^2 + d)`` per block).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import encoder, image_cnn, item_embedding, layers, validation


class Model(image_cnn.ImageTower, encoder.AttentionEncoder):
  """SASRec; its fields are ``encoder.AttentionEncoder``'s (N items, 0 = padding).

  With ``item_encoder != 'id'`` the image tower (``image_cnn.ItemImageCNN``,
  ``out_dim = dim``) sits at ``image_cnn.IMAGE_TOWER``; see ``models.item_vectors``.
  """

  @nn.compact
  def __call__(self, item_seq: jax.Array, *, deterministic: bool = True,
               user: jax.Array | None = None, last_only: bool = False,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None,
               item_vectors: jax.Array | None = None) -> jax.Array:
    """Encodes left-padded item sequences.

    Args:
      item_seq: ``int32[batch, seq_len]`` item ids, 0 = padding, with
        ``seq_len <= max_len``.
      user: ``int32[batch]``, ignored.
      deterministic: False enables dropout (needs the ``'dropout'`` RNG).
      last_only: return the last position only; the last block then computes
        that one row (``encoder.SelfAttentionBlock``).
      segment_ids: ``int32[batch, seq_len]`` for packed rows (several users'
        sequences side by side, ``packing.pack_batch``): 0 at padding, and
        positions attend only within their own segment.
      positions: ``int32[batch, seq_len]`` positional-embedding rows of packed
        rows (each segment keeps the right-aligned rows it would have alone).
        Given together with ``segment_ids``, every segment's outputs equal
        those of the sequence on its own row.
      item_vectors: ``float[N + 1, dim]`` (``models.item_vectors``) to embed
        the inputs with instead of the id table; None = the table.

    Returns:
      ``float32[batch, seq_len, dim]`` (``[batch, 1, dim]`` with
      ``last_only``); zero at padding positions. Position t depends only on
      items at positions <= t.
    """
    del user  # SASRec does not use user ids.
    self.check_input(item_seq)
    dtype = validation.compute_dtype(self.dtype)
    init = (nn.initializers.normal(self.init_std) if self.init_std
            else nn.initializers.xavier_uniform())
    valid = item_seq != 0  # [batch, seq_len]: SASRec's "timeline mask"

    # Embeddings are summed in float32 (param dtype), then cast for compute.
    x = item_embedding.ItemEmbedding(self.num_items + 1, self.dim, embedding_init=init,
                                     name=item_embedding.ITEM_TABLE[0])(item_seq)
    if item_vectors is not None:
      x = jnp.take(item_vectors.astype(jnp.float32), item_seq, axis=0)
    x = x * (self.dim**0.5)  # scaled as in the SASRec code
    if self.positional:
      x = x + encoder.PositionalEmbedding(self.max_len, self.dim, embedding_init=init,
                                         name="pos_embed")(
          item_seq.shape[1], self.position_rows(item_seq, positions, segment_ids))
    x = layers.Dropout(self.dropout_rate)(x.astype(dtype), deterministic=deterministic)
    x = x * valid[..., None].astype(dtype)

    self.make_output_table(init)
    x = self.blocks(x, valid, causal=True, activation=nn.relu, kernel_init=init, dtype=dtype,
                    deterministic=deterministic, last_only=last_only, segment_ids=segment_ids)
    if last_only:
      x, valid = x[:, -1:], valid[:, -1:]

    x = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=dtype, use_fast_variance=False,
                     name="final_ln")(x)
    if self.l2_norm:  # cosine scores against models.item_vectors' unit rows
      x = layers.l2_normalize(x)
    # Zero padding positions so nothing downstream can read a spurious state.
    return (x * valid[..., None].astype(x.dtype)).astype(jnp.float32)
