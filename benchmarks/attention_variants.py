"""A query-chunked causal attention, to measure what it would buy the library.

``layers.DotProductAttention`` materialises ``[batch, heads, L, L]`` logits
and pushes them through mask, softmax, dropout and a matmul, forward and
backward: at SASRec's ML-1M setting (batch 128, L = 200) each such tensor is
20 MB, far larger than a core's L2 cache, so the step streams them through
memory a few dozen times per block.

``ChunkedDotProductAttention`` computes the same function (same parameters,
same names, same mask and dropout semantics) in ``num_chunks`` static blocks
of queries. Each query row's softmax only involves its own row, so splitting
the rows changes nothing; and with a causal mask, queries ``< stop`` never see
keys ``>= stop``, so block ``[start, stop)`` only needs keys ``[0, stop)``.
That skips the upper triangle (about ``(c - 1) / 2c`` of the attention FLOPs
and bytes for ``c`` chunks) and keeps each block's tensors smaller. The only
observable difference is which dropout masks are drawn (one draw per block),
not their distribution.

``patched_attention`` swaps it into ``layers`` for the duration of a trace;
the library itself is not modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from deeprec_jax.models import layers


def chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
  """``num_chunks`` contiguous ``[start, stop)`` blocks covering ``range(length)``."""
  num_chunks = max(1, min(num_chunks, length))
  edges = [round(i * length / num_chunks) for i in range(num_chunks + 1)]
  return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


class ChunkedDotProductAttention(layers.DotProductAttention):
  """``layers.DotProductAttention`` by blocks of queries, skipping masked-out keys.

  Only valid with a causal mask (query ``i`` never attends to key ``j > i``):
  block ``[start, stop)`` reads keys ``[0, stop)`` only.

  Attributes:
    num_chunks: number of query blocks (1 = the library's computation).
  """

  num_chunks: int = 4

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, mask: jax.Array | None = None,
               *, deterministic: bool = True) -> jax.Array:
    features = inputs_q.shape[-1]
    head_dim = features // self.num_heads
    dense = lambda name, use_bias=True: nn.Dense(
        features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name=name)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, head_dim))
    # Projections exactly as the library's (no key bias: the softmax cancels it).
    query = split(dense("query")(inputs_q)) * head_dim**-0.5
    key = split(dense("key", use_bias=False)(inputs_kv))
    value = split(dense("value")(inputs_kv))
    outputs = []
    for start, stop in chunk_bounds(query.shape[1], self.num_chunks):
      logits = jnp.einsum("bqhd,bkhd->bhqk", query[:, start:stop], key[:, :stop])
      block_mask = None if mask is None else mask[:, :, start:stop, :stop]
      weights = layers.masked_softmax(logits, block_mask)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
      outputs.append(jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype),
                                value[:, :stop]))
    out = jnp.concatenate(outputs, axis=1)
    return dense("out")(out.reshape(out.shape[:-2] + (features,)))


@contextlib.contextmanager
def patched_attention(num_chunks: int) -> Iterator[None]:
  """Within the context, ``SelfAttentionBlock`` builds ``ChunkedDotProductAttention``.

  Only for causal models (SASRec). Models must be traced (lowered) inside the
  context; compiled executables keep working after it.
  """
  original = layers.DotProductAttention
  layers.DotProductAttention = _with_chunks(num_chunks)
  try:
    yield
  finally:
    layers.DotProductAttention = original


def _with_chunks(num_chunks: int) -> type[nn.Module]:
  """A subclass whose ``num_chunks`` field defaults to ``num_chunks``."""
  # Re-declaring the annotated field gives the (flax) dataclass a new default.
  return type(f"ChunkedDotProductAttention{num_chunks}", (ChunkedDotProductAttention,),
              {"__annotations__": {"num_chunks": int}, "num_chunks": num_chunks,
               "__module__": __name__})
