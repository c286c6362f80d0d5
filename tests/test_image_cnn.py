"""ItemImageCNN against float64 NumPy references: one stage, then the whole stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax.models import image_cnn


def _conv_relu_pool(x: np.ndarray, w: np.ndarray, b: np.ndarray, pool: int) -> np.ndarray:
  """float64 'VALID' conv + ReLU + non-overlapping max-pool, loop by loop.

  ``x [H, W, C]``, ``w [k, k, C, O]``, ``b [O]`` -> ``[(H-k+1)//p, (W-k+1)//p, O]``:
  ``y_ij = max_{(i', j') in cell ij} relu(sum_{k,l,c} x_{i'+k, j'+l, c} w_{klc} + b)``.
  """
  k = w.shape[0]
  height, width = x.shape[0] - k + 1, x.shape[1] - k + 1
  conv = np.zeros((height, width, w.shape[3]))
  for i in range(height):
    for j in range(width):
      conv[i, j] = np.tensordot(x[i:i + k, j:j + k], w, axes=3) + b
  conv = np.maximum(conv, 0.0)
  ph, pw = height // pool, width // pool
  out = np.zeros((ph, pw, w.shape[3]))
  for i in range(ph):
    for j in range(pw):
      out[i, j] = conv[i * pool:(i + 1) * pool, j * pool:(j + 1) * pool].max(axis=(0, 1))
  return out


def _reference(params, images: np.ndarray, num_blocks: int, pool: int) -> np.ndarray:
  f64 = lambda a: np.asarray(a, np.float64)
  rows = []
  for image in images:
    x = f64(image) / 255.0
    for i in range(num_blocks):
      conv = params[f"conv_{i}"]
      x = _conv_relu_pool(x, f64(conv["kernel"]), f64(conv["bias"]), pool)
    x = x.reshape(-1)
    x = np.maximum(x @ f64(params["dense"]["kernel"]) + f64(params["dense"]["bias"]), 0.0)
    rows.append(x @ f64(params["out"]["kernel"]) + f64(params["out"]["bias"]))
  return np.stack(rows)


def _images(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_one_stage_matches_numpy():
  # One block and an identity head: the output is the flattened pooled stage.
  model = image_cnn.ItemImageCNN(out_dim=3 * 3 * 4, channels=(4,), dense_dim=0)
  images = _images((2, 9, 9, 3))
  params = model.init(jax.random.key(0), images)["params"]
  params["out"] = {"kernel": jnp.eye(36), "bias": jnp.zeros(36)}
  got = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
  conv = params["conv_0"]
  want = np.stack([_conv_relu_pool(np.float64(x) / 255.0, np.float64(conv["kernel"]),
                                   np.float64(conv["bias"]), 2) for x in images])
  assert want.shape == (2, 3, 3, 4)  # 9 -> 7 (3x3 valid) -> 3 (2x2 pool, remainder dropped)
  np.testing.assert_allclose(got, want.reshape(2, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,channels,pool", [(32, (32, 64, 128), 2), (16, (4, 6), 2),
                                                (13, (5,), 3)])
def test_forward_matches_numpy(size, channels, pool):
  model = image_cnn.ItemImageCNN(out_dim=7, channels=channels, pool_size=pool, dense_dim=16)
  images = _images((2, size, size, 3), seed=size)
  params = model.init(jax.random.key(1), images)["params"]
  got = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images))
  assert got.shape == (2, 7) and got.dtype == np.float32
  want = _reference(params, images, len(channels), pool)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_default_stack_shapes():
  model = image_cnn.ItemImageCNN(out_dim=10)
  params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))["params"]
  shapes = jax.tree.map(np.shape, params)
  assert shapes["conv_0"]["kernel"] == (3, 3, 3, 32)
  assert shapes["conv_1"]["kernel"] == (3, 3, 32, 64)
  assert shapes["conv_2"]["kernel"] == (3, 3, 64, 128)
  assert shapes["dense"]["kernel"] == (2 * 2 * 128, 128)  # 32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2
  assert shapes["out"]["kernel"] == (128, 10)


def test_rejects_bad_rank():
  model = image_cnn.ItemImageCNN(out_dim=2)
  with pytest.raises(ValueError, match="images must be"):
    model.init(jax.random.key(0), np.zeros((32, 32, 3), np.uint8))
