"""Click-through model: (recent items, candidate picture, optional id) -> click logit.

    u = mean(E[h] for h in recent items, padding masked)          # [B, d]
    c = ItemImageCNN(picture of candidate) (+ E[candidate] if use_id)  # [B, d]
    logit = MLP([u, c, u * c])                                     # [B]
    p(click) = sigmoid(logit)

``E`` is the shared item table (``ITEM_TABLE``); the candidate's picture
arrives with the batch, so the model can score items it never saw in training.
Trained with binary cross-entropy on clicked items (label 1) against sampled
unseen items (label 0) by ``deeprec_jax/ctr.py``.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import image_cnn, item_embedding, validation


class Model(nn.Module):
  """CTR scorer.

  Attributes:
    num_items: catalogue size N; ids 1..N, 0 = padding.
    num_users: unused.
    max_len: most recent items read from a history.
    dim: item and user width.
    use_id: add the candidate's id embedding to its picture vector.
    hidden: widths of the ReLU layers of the scoring MLP.
    image_channels: the image tower's conv channels.
    image_kernel: its square kernel side.
    image_pool: its max-pool window side.
    image_dense: its hidden dense width (0 = none).
  """

  num_items: int
  num_users: int
  max_len: int
  dim: int = 32
  use_id: bool = False
  hidden: Sequence[int] = (64,)
  image_channels: Sequence[int] = (32, 64, 128)
  image_kernel: int = 3
  image_pool: int = 2
  image_dense: int = 128

  def __post_init__(self) -> None:
    validation.check_sizes(self)
    validation.check_int(self, "dim", 1)
    validation.check_bool(self, "use_id")
    image_cnn.check_fields(self)
    super().__post_init__()

  def setup(self) -> None:
    # Attribute names are the parameter paths (ITEM_TABLE, IMAGE_TOWER, mlp_<i>, logit).
    self.item_embed = item_embedding.ItemEmbedding(self.num_items + 1, self.dim)
    self.item_image = image_cnn.ItemImageCNN(
        out_dim=self.dim, channels=tuple(self.image_channels), kernel_size=self.image_kernel,
        pool_size=self.image_pool, dense_dim=self.image_dense)
    self.mlp = [nn.Dense(width) for width in self.hidden]
    self.logit = nn.Dense(1)

  def __call__(self, history: jax.Array, candidate: jax.Array, candidate_images: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
    """Click logits.

    Args:
      history: ``int32[B, L]`` recent items, left-padded with 0.
      candidate: ``int32[B]`` candidate item ids (read only with ``use_id``).
      candidate_images: ``uint8[B, H, W, 3]`` the candidates' pictures.
      deterministic: unused (no dropout).

    Returns:
      ``float32[B]`` logits; ``sigmoid`` gives the click probability.
    """
    del deterministic
    return self._logits(self.encode_users(history), self.encode_items(candidate,
                                                                      candidate_images))

  def encode_users(self, history: jax.Array) -> jax.Array:
    """``int32[B, L] -> float32[B, dim]``: the mean of the recent items' embeddings."""
    history = history[:, -self.max_len:]
    valid = (history > 0)[..., None].astype(jnp.float32)
    return (jnp.sum(self.item_embed(history) * valid, axis=1)
            / jnp.maximum(valid.sum(axis=1), 1.0))

  def encode_items(self, items: jax.Array, images: jax.Array) -> jax.Array:
    """``int32[n]``, ``uint8[n, H, W, 3] -> float32[n, dim]``: picture (+ id) vectors."""
    item = self.item_image(images)
    if self.use_id:
      item = item + self.item_embed(items)
    return item

  def rank_logits(self, history: jax.Array, item_vectors: jax.Array) -> jax.Array:
    """``float32[B, n]``: every user's logit for every item of ``item_vectors [n, dim]``."""
    user = self.encode_users(history)[:, None, :]
    return self._logits(*jnp.broadcast_arrays(user, item_vectors[None]))

  def _logits(self, user: jax.Array, item: jax.Array) -> jax.Array:
    x = jnp.concatenate([user, item, user * item], axis=-1)
    for dense in self.mlp:
      x = nn.relu(dense(x))
    return self.logit(x)[..., 0]
