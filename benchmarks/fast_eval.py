"""Same-result faster SASRec evaluation, measured without changing the library.

Full-ranking evaluation runs the SASRec forward pass over all ``L`` positions
of every user, then reads only the last one. Two exact savings:

* **Length buckets.** Outputs at real positions do not depend on how much
  left padding precedes them (positions are right-aligned, padding keys are
  masked), so a user whose history has ``n <= L'`` items gives the same last
  hidden state from ``item_seq[:, -L']``. Sorting users by history length and
  running each bucket at the smallest ``L'`` in ``BUCKETS`` that holds it cuts
  the ``O(L)`` projections and the ``O(L^2)`` attention of the short users.
  On ML-1M half the users have at most ~100 items.
* **Last query only in the last block.** Every block but the last must run
  all positions (they are the next block's keys), but the last block's
  output is read at one position: its query, softmax, output projection and
  FFN are needed for that position only (keys and values still cover all).

``LastPositionSASRec`` has the parameter tree of ``sasrec.Model`` (same
submodule names), built from the library's own layers, and is checked
against the library's scores before it is timed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import inputs, kernels
from deeprec_jax import evaluate, models
from deeprec_jax.models import layers

BUCKETS = (25, 50, 100, 200)


class _LastQueryBlock(nn.Module):
  """``layers.SelfAttentionBlock`` (causal) evaluated at the last position only."""

  num_heads: int = 1
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    layer_norm = lambda name: nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=self.dtype,
                                           use_fast_variance=False, name=name)
    x = x.astype(self.dtype)
    mask = layers.attention_mask(valid, causal=True)[:, :, -1:, :]
    q = layer_norm("ln_attention")(x[:, -1:])
    attend = layers.DotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        kernel_init=self.kernel_init, name="attention")
    h = q + attend(q, x, mask)
    f = layer_norm("ln_ffn")(h)
    y = f + layers.PointwiseFeedForward(activation=nn.relu, dtype=self.dtype,
                                        kernel_init=self.kernel_init, name="ffn")(f)
    return y * valid[:, -1:, None].astype(y.dtype)


class LastPositionSASRec(nn.Module):
  """SASRec's inference pass, returning ``[batch, 1, dim]``: the last position only.

  Same fields and parameter names as ``sasrec.Model``; dot-product attention
  and inference mode only.
  """

  num_items: int
  num_users: int
  max_len: int
  dim: int = 50
  num_blocks: int = 2
  num_heads: int = 1
  dropout_rate: float = 0.2
  attention: str = "dot_product"
  positional: bool = True
  dtype: str = "float32"

  @nn.compact
  def __call__(self, item_seq: jax.Array, *, user: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    del user
    if train or self.attention != "dot_product" or self.num_blocks < 1:
      raise ValueError("LastPositionSASRec covers inference with dot-product attention.")
    dtype = layers.compute_dtype(self.dtype)
    init = nn.initializers.xavier_uniform()
    valid = item_seq != 0
    x = nn.Embed(self.num_items + 1, self.dim, embedding_init=init, name="item_embed")(item_seq)
    x = x * (self.dim**0.5)
    if self.positional:
      x = x + layers.PositionalEmbedding(self.max_len, self.dim, embedding_init=init,
                                         name="pos_embed")(item_seq.shape[1])
    x = x.astype(dtype) * valid[..., None].astype(dtype)
    for i in range(self.num_blocks - 1):
      x = layers.SelfAttentionBlock(attention="dot_product", num_heads=self.num_heads,
                                    dtype=dtype, causal=True, activation=nn.relu,
                                    kernel_init=init, name=f"block_{i}")(x, valid)
    x = _LastQueryBlock(num_heads=self.num_heads, dtype=dtype, kernel_init=init,
                        name=f"block_{self.num_blocks - 1}")(x, valid)
    x = nn.LayerNorm(epsilon=layers.LAYER_NORM_EPSILON, dtype=dtype, use_fast_variance=False,
                     name="final_ln")(x)
    return (x * valid[:, -1:, None].astype(x.dtype)).astype(jnp.float32)


def check_same_scores(model: nn.Module, fast: nn.Module, params: Any, item_seq: np.ndarray,
                      num_items: int) -> float:
  """Max |score difference| between the library model and ``fast`` on ``item_seq``."""
  ref = evaluate.score_items(model, params, num_items, jnp.asarray(item_seq))
  out = evaluate.score_items(fast, params, num_items, jnp.asarray(item_seq))
  return float(jnp.max(jnp.abs(ref - out)))


def bucketed_batches(batch: dict[str, np.ndarray], lengths: np.ndarray, batch_size: int,
                     buckets: tuple[int, ...] = BUCKETS) -> list[dict[str, Any]]:
  """Users sorted by history length, cut to the smallest bucket length that holds them.

  Args:
    batch: one eval batch with a row per user (all users), ``item_seq [U, L]``.
    lengths: ``int[U]`` history length of each user.
    batch_size: rows per batch; each bucket's last batch is padded with
      ``weight = 0`` rows.
    buckets: increasing sequence lengths, the last one ``>= max(lengths)``.

  Returns:
    Device-resident batches, a few compiled shapes (one per bucket).
  """
  order = np.argsort(lengths, kind="stable")
  bucket_of = np.searchsorted(np.asarray(buckets), np.minimum(lengths, buckets[-1]))
  out = []
  for b, seq_len in enumerate(buckets):
    users = order[bucket_of[order] == b]
    for start in range(0, len(users), batch_size):
      rows = users[start:start + batch_size]
      pad = batch_size - len(rows)
      chunk = {k: np.concatenate([v[rows], np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
      chunk["item_seq"] = np.ascontiguousarray(chunk["item_seq"][:, -seq_len:])
      chunk["weight"] = (np.arange(batch_size) < len(rows)).astype(np.float32)
      out.append(jax.device_put(chunk))
  return out


def eval_setups(batch_size: int) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
  """The evaluation passes to time, over every ML-1M user (synthetic histories).

  Returns:
    ``({name: {'step', 'batches', 'note'}}, meta)`` where ``meta`` holds the
    ``params``, ``max_abs_score_diff`` (fast model vs library) and
    ``bucket_sizes`` (users per bucket length).
  """
  config = kernels.ml1m_config("sasrec")
  kwargs = dict(num_items=inputs.ML1M_ITEMS, num_users=inputs.ML1M_USERS,
                max_len=config.data.max_len)
  model = models.create_model(config.model, **kwargs)
  model_kwargs = {k: v for k, v in config.model.items() if k != "name"}
  fast = LastPositionSASRec(**kwargs, **model_kwargs)
  everyone = inputs.eval_batch(batch=inputs.ML1M_USERS, max_len=config.data.max_len,
                               num_items=inputs.ML1M_ITEMS, num_users=inputs.ML1M_USERS,
                               exclude_width=kernels.EVAL_EXCLUDE_WIDTH,
                               num_sampled_negatives=config.eval.num_sampled_negatives)
  lengths = (everyone["item_seq"] > 0).sum(axis=1)
  params = jax.device_put(model.init(jax.random.PRNGKey(0), everyone["item_seq"][:1])["params"])
  diff = check_same_scores(model, fast, params, everyone["item_seq"][:64], inputs.ML1M_ITEMS)
  plain = bucketed_batches(everyone, np.full_like(lengths, config.data.max_len), batch_size,
                           (config.data.max_len,))
  bucketed = bucketed_batches(everyone, lengths, batch_size)
  step = lambda m: jax.jit(evaluate.make_eval_step(m, inputs.ML1M_ITEMS, tuple(config.eval.ks),
                                                   exclude_history=config.eval.exclude_history))
  setups = {
      "library": dict(step=step(model), batches=plain, note="library eval step, all at L=200"),
      "length_buckets": dict(step=step(model), batches=bucketed,
                             note=f"library eval step, users bucketed by length {BUCKETS}"),
      "last_query": dict(step=step(fast), batches=plain,
                         note="last block at the last position only, L=200"),
      "last_query+length_buckets": dict(step=step(fast), batches=bucketed,
                                        note="both (same scores as the library)"),
  }
  meta = dict(params=params, max_abs_score_diff=diff,
              bucket_sizes=[int(np.sum(np.searchsorted(BUCKETS, lengths) == b))
                            for b in range(len(BUCKETS))])
  return setups, meta
