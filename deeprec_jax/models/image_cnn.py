"""Item pictures -> item vectors: the small CNN tower of image-aware item encoders.

``ItemImageCNN`` is the founding stack (one block per entry of ``channels``)::

    x = uint8 image / 255                                   # [B, H, W, 3]
    x = MaxPool(pool)(relu(Conv2D(c, kernel)(x)))  for c in channels (32, 64, 128)
    x = relu(Dense(dense_dim)(Flatten(x)))                  # [B, 128]
    y = Dense(out_dim)(x)                                   # [B, out_dim]

Convolutions are 'VALID' (no zero border) by default, pooling windows do not
overlap (stride = window) and drop a remainder row or column, as Keras'
``Conv2D``/``MaxPooling2D`` defaults do. ``ITEM_ENCODERS`` names the ways a
sequential model may build its item vectors (``models.item_vectors``).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import validation

# How a sequential model builds item vectors: the id table row ('id'), the
# CNN of the item's picture ('image'), or their sum ('id+image').
ITEM_ENCODERS = ("id", "image", "id+image")
# Path of the image tower inside a sequential model's params, and of the
# projection of precomputed image features (data.images.source='features').
IMAGE_TOWER = "item_image"
FEATURE_PROJECTION = "item_features"


class ItemImageCNN(nn.Module):
  """``uint8[batch, H, W, 3] -> float32[batch, out_dim]``.

  Attributes:
    out_dim: output width (the model width when it encodes items).
    channels: output channels of each conv + ReLU + max-pool block.
    kernel_size: square convolution kernel side.
    pool_size: square max-pool window side (and stride).
    dense_dim: width of the hidden ReLU dense layer (0 = none).
    padding: 'VALID' or 'SAME' convolutions.
  """

  out_dim: int = 128
  channels: Sequence[int] = (32, 64, 128)
  kernel_size: int = 3
  pool_size: int = 2
  dense_dim: int = 128
  padding: str = "VALID"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Encodes pictures.

    Args:
      images: ``uint8[batch, H, W, 3]`` (any real dtype is scaled the same
        way: divided by 255).

    Returns:
      ``float32[batch, out_dim]``.
    """
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, H, W, C], got shape {images.shape}.")
    x = images.astype(jnp.float32) / 255.0
    window = (self.pool_size, self.pool_size)
    for i, features in enumerate(self.channels):
      x = nn.Conv(features, (self.kernel_size, self.kernel_size), padding=self.padding,
                  name=f"conv_{i}")(x)
      x = nn.max_pool(nn.relu(x), window, strides=window, padding="VALID")
    x = x.reshape(x.shape[0], -1)
    if self.dense_dim:
      x = nn.relu(nn.Dense(self.dense_dim, name="dense")(x))
    return nn.Dense(self.out_dim, name="out")(x)



def check_fields(model: Any) -> None:
  """Raises ValueError naming ``model.<field>`` for bad item-encoder (and tower) fields."""
  if hasattr(model, "item_encoder"):
    validation.check_choice(model, "item_encoder", ITEM_ENCODERS)
  if hasattr(model, "id_dropout"):
    validation.check_fraction(model, "id_dropout")
  validation.validate_fields(model, {
      "image_kernel": lambda m, f: validation.check_int(m, f, 1),
      "image_pool": lambda m, f: validation.check_int(m, f, 1),
      "image_dense": lambda m, f: validation.check_int(m, f, 0),
  })
  channels = model.image_channels
  validation.check(isinstance(channels, (tuple, list)) and len(channels) > 0
                   and all(validation.is_int(c) and c >= 1 for c in channels),
                   "model.image_channels", "a non-empty tuple of positive ints", channels)


class ImageTower:
  """Mixin of the sequential models with an item encoder (the ``image_*`` fields).

  Its ``setup`` places the tower at ``IMAGE_TOWER`` when ``item_encoder !=
  'id'``; ``models.item_vectors`` calls ``encode_images``. Pictures
  (``uint8[n, H, W, 3]``) go through the CNN (``tower_of``); precomputed
  features (``float[n, F]``, ``data.images.source='features'``) through a
  learned linear projection ``E f`` to the model width, as VBPR projects its
  visual features. Which one is fixed by the first input (``init``).
  """

  def setup(self) -> None:
    if self.item_encoder != "id":
      self.item_image = tower_of(self)  # the attribute's name is IMAGE_TOWER
      self.item_features = nn.Dense(self.dim, use_bias=False)  # FEATURE_PROJECTION

  def encode_images(self, images: jax.Array) -> jax.Array:
    """``uint8[n, H, W, 3]`` or ``float[n, F]`` -> ``float32[n, dim]`` (not for 'id')."""
    if images.ndim == 2:
      return self.item_features(images.astype(jnp.float32))
    return self.item_image(images)


def tower_of(model: Any) -> ItemImageCNN:
  """The image tower of a sequential model with the ``image_*`` fields, out_dim = its dim.

  Call it in the model's ``setup`` (it is then named by the attribute, ``IMAGE_TOWER``).
  """
  return ItemImageCNN(out_dim=model.dim, channels=tuple(model.image_channels),
                      kernel_size=model.image_kernel, pool_size=model.image_pool,
                      dense_dim=model.image_dense)
