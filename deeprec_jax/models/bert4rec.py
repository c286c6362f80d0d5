"""BERT4Rec: bidirectional self-attention with a cloze objective (Sun et al., CIKM 2019).

Some items of the sequence are replaced by the mask token ``num_items + 1``
(by the data pipeline, with probability ``config.task.mask_prob``) and the model predicts
them from both sides. At evaluation the last slot holds the mask token.

    x = Dropout(LN(E[item_seq] + P)) * valid        # E: N + 2 rows
    x = SelfAttentionBlock(causal=False, GELU)(x) x num_blocks
    hidden = LN_h(GELU(W_h LN(x) + b_h)) * valid    # BERT4Rec's output transform

The scores are ``hidden @ E[0..N].T`` (``models.item_table``), i.e. the
paper's ``GELU(h W^P + b^P) E^T`` (Eq. 7) with the LayerNorm of the public code;
its per-item output bias ``b^O`` is left out because the model contract
scores with the item table alone.

Differences from the original (kept so that SASRec and BERT4Rec differ only in
what the paper is about, direction and objective): the blocks are the SASRec
pre-LN blocks of ``encoder.SelfAttentionBlock`` with a final LayerNorm, rather
than BERT's post-LN blocks (``model.block='post_ln'`` gives those), and layer
norms use epsilon 1e-8. As in BERT the
embeddings are not scaled, are layer-normed, and all weights start from a
truncated normal with stddev 0.02.

Parameters (dot-product attention, N items, d = dim, L = max_len, B blocks):

    (N + 2) d + L d + 2d + B [2 * 2d + 4 (d^2 + d) + 2 (d^2 + d)] + 2d + (d^2 + d) + 2d

(additive attention: ``3 (d^2 + d)`` instead of ``4 (d^2 + d)`` per block).
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import encoder, image_cnn, item_embedding, layers, validation


class Model(image_cnn.ImageTower, encoder.AttentionEncoder):
  """BERT4Rec; fields as ``encoder.AttentionEncoder`` (ids 1..N, 0 = padding, N + 1 = [mask]).

  With ``item_encoder != 'id'`` the image tower (``image_cnn.ItemImageCNN``,
  ``out_dim = dim``) sits at ``image_cnn.IMAGE_TOWER`` and the item vectors
  (``models.item_vectors``) embed the inputs; the [mask] token keeps its row
  of the id table, the one item without a picture.
  """

  @property
  def mask_token(self) -> int:
    """The id of the [mask] token, ``num_items + 1``."""
    return self.num_items + 1

  @nn.compact
  def __call__(self, item_seq: jax.Array, *, deterministic: bool = True,
               user: jax.Array | None = None, last_only: bool = False,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None,
               item_vectors: jax.Array | None = None) -> jax.Array:
    """Encodes left-padded item sequences that may contain the mask token.

    Args:
      item_seq: ``int32[batch, seq_len]``: ids 1..num_items, 0 = padding,
        ``num_items + 1`` = [mask]; ``seq_len <= max_len``.
      user: ``int32[batch]``, ignored.
      deterministic: False enables dropout (needs the ``'dropout'`` RNG).
      last_only: return the last position (the mask slot at evaluation)
        only; the last block then computes that one row.
      segment_ids: packed rows' segment ids, as in ``sasrec.Model``.
      positions: packed rows' positional rows, as in ``sasrec.Model``; with
        both, every segment's outputs equal those of its sequence alone.
      item_vectors: ``float[N + 1, dim]`` (``models.item_vectors``) to embed
        items 0..N with instead of the id table; the mask token keeps its row.

    Returns:
      ``float32[batch, seq_len, dim]`` (``[batch, 1, dim]`` with
      ``last_only``); zero at padding positions. Real positions see every
      real position (bidirectional), never padding.
    """
    del user  # BERT4Rec does not use user ids.
    self.check_input(item_seq)
    dtype = validation.compute_dtype(self.dtype)
    # BERT's initializer_range 0.02 unless model.init_std says otherwise.
    init = nn.initializers.truncated_normal(stddev=self.init_std or 0.02)
    layer_norm = lambda name: nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=dtype,
                                           use_fast_variance=False, name=name)
    valid = item_seq != 0  # [batch, seq_len]; the mask token counts as real
    valid_f = valid[..., None].astype(dtype)

    # Row num_items + 1 is the [mask] token; models.item_table drops it.
    x = item_embedding.ItemEmbedding(self.num_items + 2, self.dim, embedding_init=init,
                                     name=item_embedding.ITEM_TABLE[0])(item_seq)
    if item_vectors is not None:
      is_mask = (item_seq == self.mask_token)[..., None]
      pictured = jnp.take(item_vectors.astype(jnp.float32),
                          jnp.where(is_mask[..., 0], 0, item_seq), axis=0)
      x = jnp.where(is_mask, x.astype(jnp.float32), pictured)
    if self.positional:
      x = x + encoder.PositionalEmbedding(self.max_len, self.dim, embedding_init=init,
                                         name="pos_embed")(
          item_seq.shape[1], self.position_rows(item_seq, positions, segment_ids))
    x = layer_norm("embed_ln")(x.astype(dtype))
    x = layers.Dropout(self.dropout_rate)(x, deterministic=deterministic) * valid_f

    self.make_output_table(init)
    x = self.blocks(x, valid, causal=False, activation=nn.gelu, kernel_init=init, dtype=dtype,
                    deterministic=deterministic, last_only=last_only, segment_ids=segment_ids)
    if last_only:
      x, valid_f = x[:, -1:], valid_f[:, -1:]
    x = layer_norm("final_ln")(x)

    # Output transform of the masked-LM head: hidden is what meets the table.
    x = nn.Dense(self.dim, dtype=dtype, kernel_init=init, name="head")(x)
    x = layer_norm("head_ln")(nn.gelu(x))
    if self.l2_norm:  # cosine scores against models.item_vectors' unit rows
      x = layers.l2_normalize(x).astype(valid_f.dtype)
    return (x * valid_f).astype(jnp.float32)
