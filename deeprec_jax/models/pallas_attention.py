"""Self-attention as Pallas kernels, beside the XLA versions of ``layers``.

Both forms run one fused kernel per (batch, head, query block): an online
(flash-attention style) softmax over key blocks with float32 statistics, so
neither the ``[batch, heads, q_len, k_len]`` weights nor, for the additive
form, the ``[batch, q_len, k_len, head_hidden]`` tanh tensor is ever written
to memory. Rows with no allowed key return 0, as ``layers.masked_softmax``.

Masking (True = query ``i`` may attend to key ``j``), either

* dense: ``mask bool[batch or 1, 1 or heads, q_len or 1, k_len]`` (what the
  models pass), or
* per tile, built inside the kernel: ``key_valid bool[batch, k_len]`` (None =
  all valid), optional ``segment_ids int[batch, k_len]`` (packed rows attend
  within their segment) and the static ``causal`` flag.

Queries are the last ``q_len`` of the ``k_len`` positions. ``causal`` is
applied in both modes (with a dense mask it promises the mask is causal) and
lets a query block skip the key blocks after its last query.

Gradients: a ``jax.custom_vjp`` whose backward pass recomputes the attention
through the XLA reference path (``jax.vjp`` of ``_reference``, which uses
``layers.masked_softmax`` and ``layers.additive_scores``), so it costs and
stores what the XLA path does. A Pallas backward kernel is future work.

Backends: ``interpret=None`` runs Pallas interpret mode on CPU and the compiled
Triton kernel otherwise. Inputs are zero-padded to whole blocks and the head
dims to powers of 2 (Triton's requirement), then sliced back. Block sizes
must be powers of 2 (>= 16 on GPU, for Triton's dot). The compiled GPU path
has not been run yet (no GPU was available when this was written).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from deeprec_jax.models import layers

Array = jax.Array

# Fill of a masked logit and the initial running max: far below any real
# logit, yet finite, so running-max corrections never compute inf - inf.
_NEG_LARGE = -1e30


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one attention call."""

  form: str  # 'dot' | 'additive'
  causal: bool
  block_q: int
  block_k: int
  interpret: bool


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_axis(x: Array, axis: int, size: int) -> Array:
  """``x`` zero-padded at the end of ``axis`` to ``size``."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


# ----------------------------------------------------------------------------
# Kernel.
# ----------------------------------------------------------------------------


def _dot_tile(q_ref, k_ref, k_start: Array, *, block_k: int) -> Array:
  """``q @ k^T`` of one tile: ``float32[block_q, block_k]``."""
  q = q_ref[...]  # [block_q, head_dim]
  k = k_ref[pl.ds(k_start, block_k), :]  # [block_k, head_dim]
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _additive_tile(q_ref, k_ref, w_ref, k_start: Array, *, block_k: int) -> Array:
  """``sum_d w_d tanh(q_id + k_jd)`` of one tile, one feature at a time."""
  block_q = q_ref.shape[1]

  def add_feature(d, scores):
    q_d = q_ref[d, :].astype(jnp.float32)  # [block_q] (bias folded in)
    k_d = k_ref[d, pl.ds(k_start, block_k)].astype(jnp.float32)  # [block_k]
    return scores + w_ref[d].astype(jnp.float32) * jnp.tanh(q_d[:, None] + k_d[None, :])

  scores = jnp.zeros((block_q, block_k), jnp.float32)
  return lax.fori_loop(0, q_ref.shape[0], add_feature, scores)


def _tile_mask(mask_refs, k_start: Array, q_start: Array, *, dense: bool, segments: bool,
               causal: bool, offset: int, block_q: int, block_k: int) -> Array:
  """``bool[block_q, block_k]``: which (query, key) pairs of the tile may attend."""
  if dense:
    allowed = mask_refs[0][:, pl.ds(k_start, block_k)] != 0
  else:
    allowed = jnp.broadcast_to(mask_refs[0][pl.ds(k_start, block_k)][None, :] != 0,
                               (block_q, block_k))
    if segments:
      q_seg = mask_refs[1][...]  # [block_q]
      k_seg = mask_refs[2][pl.ds(k_start, block_k)]  # [block_k]
      allowed = allowed & (q_seg[:, None] == k_seg[None, :])
  if causal:
    q_pos = offset + q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    allowed = allowed & (q_pos >= k_pos)
  return allowed


def _attention_kernel(*refs, num_score_refs: int, dense: bool, segments: bool, cfg: _Config,
                      offset: int, num_k_blocks: int) -> None:
  """One (batch, head, query block): online softmax over the key blocks."""
  score_refs = refs[:num_score_refs]
  value_ref = refs[num_score_refs]
  mask_refs = refs[num_score_refs + 1:-1]
  out_ref = refs[-1]
  block_q, block_k = cfg.block_q, cfg.block_k
  q_start = pl.program_id(2) * block_q
  tile = _dot_tile if cfg.form == "dot" else _additive_tile
  tile_mask = functools.partial(_tile_mask, dense=dense, segments=segments, causal=cfg.causal,
                                offset=offset, block_q=block_q, block_k=block_k)

  def key_block(kb, carry):
    acc, row_max, row_sum = carry
    k_start = pl.multiple_of(kb * block_k, block_k)
    allowed = tile_mask(mask_refs, k_start, q_start)
    scores = jnp.where(allowed, tile(*score_refs, k_start, block_k=block_k), _NEG_LARGE)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
    correction = jnp.exp(row_max - new_max)
    # The `where` keeps rows with no allowed key so far at exactly 0.
    probs = jnp.where(allowed, jnp.exp(scores - new_max[:, None]), 0.0)
    value = value_ref[pl.ds(k_start, block_k), :]
    acc = correction[:, None] * acc + lax.dot_general(
        probs.astype(value.dtype), value, (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    return acc, new_max, correction * row_sum + jnp.sum(probs, axis=1)

  num_blocks = num_k_blocks
  if cfg.causal:  # key blocks up to the block's last query
    last_query = offset + q_start + block_q - 1
    num_blocks = jnp.minimum(num_k_blocks, lax.div(last_query, block_k) + 1)
  init = (jnp.zeros((block_q, out_ref.shape[-1]), jnp.float32),
          jnp.full((block_q,), _NEG_LARGE, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, _, row_sum = lax.fori_loop(0, num_blocks, key_block, init)
  has_keys = row_sum > 0
  out = jnp.where(has_keys[:, None], acc / jnp.where(has_keys, row_sum, 1.0)[:, None], 0.0)
  out_ref[...] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _pallas_forward(score_args: tuple[Array, ...], value: Array,
                    masks: tuple[Array | None, Array | None, Array | None],
                    cfg: _Config) -> Array:
  """Pads to whole blocks, runs the kernel, slices the padding off."""
  mask, key_valid, segment_ids = masks
  batch, k_len, heads, head_dim = value.shape
  q_len = score_args[0].shape[1]
  q_pad, k_pad = _round_up(q_len, cfg.block_q), _round_up(k_len, cfg.block_k)
  v_dim = pl.next_power_of_2(head_dim)
  grid = (batch, heads, q_pad // cfg.block_q)
  rows = lambda d: pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0))
  whole = lambda d: pl.BlockSpec((None, k_pad, None, d), lambda b, h, i: (b, 0, h, 0))

  if cfg.form == "dot":
    query, key = score_args
    s_dim = pl.next_power_of_2(query.shape[-1])
    score_inputs = [_pad_axis(_pad_axis(query, 3, s_dim), 1, q_pad),
                    _pad_axis(_pad_axis(key, 3, s_dim), 1, k_pad)]
    score_specs = [rows(s_dim), whole(s_dim)]
  else:  # feature-major [batch, heads, head_hidden, len]: contiguous rows per feature
    query, key, bias, w = score_args
    s_dim = pl.next_power_of_2(query.shape[-1])
    to_rows = lambda x, size: _pad_axis(_pad_axis(jnp.transpose(x, (0, 2, 3, 1)), 2, s_dim),
                                        3, size)
    score_inputs = [to_rows(query + bias, q_pad), to_rows(key, k_pad), _pad_axis(w, 1, s_dim)]
    score_specs = [
        pl.BlockSpec((None, None, s_dim, cfg.block_q), lambda b, h, i: (b, h, 0, i)),
        pl.BlockSpec((None, None, s_dim, k_pad), lambda b, h, i: (b, h, 0, 0)),
        pl.BlockSpec((None, s_dim), lambda b, h, i: (h, 0))]

  if mask is not None:
    mask_b, mask_h = mask.shape[0], mask.shape[1]
    mask = jnp.broadcast_to(mask, (mask_b, mask_h, q_len, k_len)).astype(jnp.int8)
    mask_inputs = [_pad_axis(_pad_axis(mask, 2, q_pad), 3, k_pad)]
    mask_specs = [pl.BlockSpec(
        (None, None, cfg.block_q, k_pad),
        lambda b, h, i: (b if mask_b > 1 else 0, h if mask_h > 1 else 0, i, 0))]
  else:
    if key_valid is None:
      key_valid = jnp.ones((batch, k_len), jnp.bool_)
    mask_inputs = [_pad_axis(key_valid.astype(jnp.int32), 1, k_pad)]
    mask_specs = [pl.BlockSpec((None, k_pad), lambda b, h, i: (b, 0))]
    if segment_ids is not None:
      segment_ids = segment_ids.astype(jnp.int32)
      mask_inputs += [_pad_axis(segment_ids[:, k_len - q_len:], 1, q_pad),
                      _pad_axis(segment_ids, 1, k_pad)]
      mask_specs += [pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
                     pl.BlockSpec((None, k_pad), lambda b, h, i: (b, 0))]

  kernel = functools.partial(
      _attention_kernel, num_score_refs=len(score_inputs), dense=mask is not None,
      segments=mask is None and segment_ids is not None, cfg=cfg, offset=k_len - q_len,
      num_k_blocks=k_pad // cfg.block_k)
  compiler_params = None
  if not cfg.interpret and jax.default_backend() == "gpu":
    from jax.experimental.pallas import triton as pl_triton  # GPU only
    compiler_params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
  out = pl.pallas_call(
      kernel, grid=grid, in_specs=[*score_specs, whole(v_dim), *mask_specs],
      out_specs=rows(v_dim),
      out_shape=jax.ShapeDtypeStruct((batch, q_pad, heads, v_dim), value.dtype),
      interpret=cfg.interpret, compiler_params=compiler_params,
      name=f"{cfg.form}_attention",
  )(*score_inputs, _pad_axis(_pad_axis(value, 3, v_dim), 1, k_pad), *mask_inputs)
  return out[:, :q_len, :, :head_dim]


# ----------------------------------------------------------------------------
# Reference path (backward pass) and the custom VJP.
# ----------------------------------------------------------------------------


def dense_mask(q_len: int, key_valid: Array, *, segment_ids: Array | None = None,
               causal: bool = False) -> Array:
  """``bool[batch, 1, q_len, k_len]``: the per-tile masking rules, as one dense mask."""
  k_len = key_valid.shape[1]
  mask = jnp.broadcast_to(key_valid[:, None, None, :], (key_valid.shape[0], 1, q_len, k_len))
  if causal:
    mask = mask & (jnp.arange(k_len)[None, :] <= jnp.arange(k_len - q_len, k_len)[:, None])
  if segment_ids is not None:
    mask = mask & (segment_ids[:, None, k_len - q_len:, None] == segment_ids[:, None, None, :])
  return mask


def _reference(score_args: tuple[Array, ...], value: Array,
               masks: tuple[Array | None, Array | None, Array | None], cfg: _Config) -> Array:
  """The kernel's math in plain XLA: ``masked_softmax(scores) @ value``."""
  mask, key_valid, segment_ids = masks
  batch, k_len = value.shape[:2]
  q_len = score_args[0].shape[1]
  if mask is None:
    if key_valid is None:
      key_valid = jnp.ones((batch, k_len), jnp.bool_)
    mask = dense_mask(q_len, key_valid, segment_ids=segment_ids, causal=cfg.causal)
  elif cfg.causal:
    mask = mask & dense_mask(q_len, jnp.ones((1, k_len), jnp.bool_), causal=True)
  if cfg.form == "dot":
    query, key = score_args
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key)
  else:
    scores = layers.additive_scores(*score_args)
  weights = layers.masked_softmax(scores, mask)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(score_args, value, masks, cfg):
  return _pallas_forward(score_args, value, masks, cfg)


def _attention_fwd(score_args, value, masks, cfg):
  return _pallas_forward(score_args, value, masks, cfg), (score_args, value, masks)


def _attention_bwd(cfg, residuals, grad):
  score_args, value, masks = residuals
  _, vjp = jax.vjp(lambda s, v: _reference(s, v, masks, cfg), score_args, value)
  grad_scores, grad_value = vjp(grad)
  return grad_scores, grad_value, None  # masks: integer inputs, no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def _call(form: str, score_args: tuple[Array, ...], value: Array, *, mask: Array | None,
          segment_ids: Array | None, key_valid: Array | None, causal: bool, block_q: int,
          block_k: int, interpret: bool | None, dropout_rate: float) -> Array:
  """Checks the arguments shared by both forms and runs ``_attention``."""
  if dropout_rate:
    raise ValueError(f"Pallas attention has no dropout on the attention weights (asked for "
                     f"dropout_rate={dropout_rate}); use the XLA implementation.")
  if mask is not None and (key_valid is not None or segment_ids is not None):
    raise ValueError("pass either a dense mask or key_valid/segment_ids, not both.")
  query, key = score_args[:2]
  batch, q_len, heads, _ = query.shape
  k_len = key.shape[1]
  if key.shape[0] != batch or key.shape[2] != heads or value.shape[:3] != key.shape[:3]:
    raise ValueError(f"shapes disagree: query {query.shape}, key {key.shape}, "
                     f"value {value.shape}.")
  if q_len > k_len:
    raise ValueError(f"queries are the last q_len of k_len positions: q_len={q_len} > "
                     f"k_len={k_len}.")
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < 1 or block & (block - 1):
      raise ValueError(f"{name}={block} must be a power of 2.")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  # Small inputs: one block as large as the (power-of-2 rounded) length.
  cfg = _Config(form, bool(causal), min(block_q, pl.next_power_of_2(q_len)),
                min(block_k, pl.next_power_of_2(k_len)), bool(interpret))
  return _attention(score_args, value, (mask, key_valid, segment_ids), cfg)


def dot_product_attention(query: Array, key: Array, value: Array, *, mask: Array | None = None,
                          segment_ids: Array | None = None, key_valid: Array | None = None,
                          causal: bool = False, block_q: int = 64, block_k: int = 64,
                          interpret: bool | None = None, dropout_rate: float = 0.0) -> Array:
  """``masked_softmax(query key^T) value`` per head, as one Pallas kernel.

  Args:
    query: ``[batch, q_len, heads, head_dim]``, already scaled by
      ``head_dim**-0.5``.
    key: ``[batch, k_len, heads, head_dim]``.
    value: ``[batch, k_len, heads, value_dim]``.
    mask: dense ``bool[batch or 1, 1 or heads, q_len or 1, k_len]``, or None.
    segment_ids: ``int[batch, k_len]``; only without ``mask``.
    key_valid: ``bool[batch, k_len]``, None = all keys real; only without ``mask``.
    causal: query ``i`` (position ``k_len - q_len + i``) sees keys ``j <= i``
      only; key blocks after a query block are skipped.
    block_q: query rows per kernel instance (a power of 2).
    block_k: keys per step of the online softmax (a power of 2).
    interpret: Pallas interpret mode; None = on CPU only.
    dropout_rate: must be 0 (no dropout in the kernel): a ValueError otherwise.

  Returns:
    ``[batch, q_len, heads, value_dim]`` in ``value``'s dtype; 0 for rows
    without an allowed key.
  """
  return _call("dot", (query, key), value, mask=mask, segment_ids=segment_ids,
               key_valid=key_valid, causal=causal, block_q=block_q, block_k=block_k,
               interpret=interpret, dropout_rate=dropout_rate)


def additive_attention(query: Array, key: Array, value: Array, bias: Array, v: Array, *,
                       mask: Array | None = None, segment_ids: Array | None = None,
                       key_valid: Array | None = None, causal: bool = False,
                       block_q: int = 32, block_k: int = 32, interpret: bool | None = None,
                       dropout_rate: float = 0.0) -> Array:
  """``masked_softmax(a) value`` with ``a_ij = tanh(query_i + key_j + bias) . v``, fused.

  Args:
    query: ``[batch, q_len, heads, head_hidden]`` (``W_q Q``).
    key: ``[batch, k_len, heads, head_hidden]`` (``W_k K``).
    value: ``[batch, k_len, heads, value_dim]``.
    bias: ``[heads, head_hidden]``.
    v: ``[heads, head_hidden]``.
    mask, segment_ids, key_valid, causal, block_q, block_k, interpret,
      dropout_rate: as ``dot_product_attention``.

  Returns:
    ``[batch, q_len, heads, value_dim]`` in ``value``'s dtype. The scores
    run one hidden feature at a time over a ``[block_q, block_k]`` tile.
  """
  heads, head_hidden = query.shape[2:]
  if bias.shape != (heads, head_hidden) or v.shape != (heads, head_hidden):
    raise ValueError(f"bias {bias.shape} and v {v.shape} must be {(heads, head_hidden)}.")
  return _call("additive", (query, key, bias, v), value, mask=mask, segment_ids=segment_ids,
               key_valid=key_valid, causal=causal, block_q=block_q, block_k=block_k,
               interpret=interpret, dropout_rate=dropout_rate)
