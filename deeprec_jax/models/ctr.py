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

  @nn.compact
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
    table = item_embedding.ItemEmbedding(self.num_items + 1, self.dim,
                                         name=item_embedding.ITEM_TABLE[0])
    history = history[:, -self.max_len:]
    valid = (history > 0)[..., None].astype(jnp.float32)
    user = jnp.sum(table(history) * valid, axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)
    item = image_cnn.ItemImageCNN(out_dim=self.dim, channels=tuple(self.image_channels),
                                  kernel_size=self.image_kernel, pool_size=self.image_pool,
                                  dense_dim=self.image_dense,
                                  name=image_cnn.IMAGE_TOWER)(candidate_images)
    if self.use_id:
      item = item + table(candidate)
    x = jnp.concatenate([user, item, user * item], axis=-1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"mlp_{i}")(x))
    return nn.Dense(1, name="logit")(x)[:, 0]
