r"""Throughput of the item image tower (``models/image_cnn.py``), in pictures per second.

  python -m benchmarks.image_tower [--size=32] [--batch=1024] [--dim=50]

Times the jitted forward pass (evaluation's catalogue encoding) and the
forward + backward pass (what a training step spends on the catalogue) of
the default tower (conv 32/64/128, 3x3, 2x2 pools, dense 128) on
``uint8[batch, size, size, 3]``: median of ``--repeats`` calls after one
warm-up, on the default device.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from deeprec_jax.models import image_cnn

_SIZE = flags.DEFINE_integer("size", 32, "Picture side S.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Pictures per call.")
_DIM = flags.DEFINE_integer("dim", 50, "Output width (the model's dim).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after one warm-up.")


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(size: int, batch: int, dim: int, repeats: int) -> dict[str, float]:
  """``{'forward', 'forward_backward'}`` pictures per second."""
  model = image_cnn.ItemImageCNN(out_dim=dim)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3),
                                                         dtype=np.uint8))
  params = model.init(jax.random.key(0), images[:1])["params"]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)))
  return {"forward": batch / _median_seconds(lambda: forward(params, images), repeats),
          "forward_backward": batch / _median_seconds(lambda: grad(params, images), repeats)}


def main(argv) -> None:
  del argv
  rates = measure(_SIZE.value, _BATCH.value, _DIM.value, _REPEATS.value)
  print(f"{jax.devices()[0].device_kind}: {_SIZE.value}x{_SIZE.value} pictures, batch "
        f"{_BATCH.value}: forward {rates['forward']:,.0f}/s, forward+backward "
        f"{rates['forward_backward']:,.0f}/s")


if __name__ == "__main__":
  app.run(main)
