"""Tests for deeprec_jax.catalogue_scores against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deeprec_jax import catalogue_scores, losses


def _inputs(rows: int, items: int, dim: int, m: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(2, rows, dim)).astype(np.float32)
  table = rng.normal(size=(items + 1, dim)).astype(np.float32)
  picks = rng.integers(0, items + 1, size=(2, rows, m)).astype(np.int32)
  picks[0, 0, :2] = 3  # A repeated item: its gradient adds up.
  weights = rng.normal(size=picks.shape).astype(np.float32)
  return hidden, table, picks, weights


@pytest.mark.parametrize("row_chunk", [8, 16, 512])  # Ragged last block, several, one.
def test_values_and_gradients_match_numpy(row_chunk):
  hidden, table, picks, weights = _inputs(rows=9, items=10, dim=5, m=7)
  fn = jax.jit(jax.value_and_grad(
      lambda h, e: jnp.sum(catalogue_scores.gathered_logits(h, e, picks, row_chunk) * weights),
      argnums=(0, 1)))
  value, (grad_hidden, grad_table) = fn(hidden, table)
  h64, t64, w64 = np.float64(hidden), np.float64(table), np.float64(weights)
  scores = np.einsum("bld,blmd->blm", h64, t64[picks])
  want_table = np.zeros_like(t64)
  np.add.at(want_table, picks, w64[..., None] * h64[:, :, None, :])
  np.testing.assert_allclose(value, np.sum(scores * w64), rtol=1e-5)
  np.testing.assert_allclose(grad_hidden, np.einsum("blm,blmd->bld", w64, t64[picks]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_table, want_table, rtol=1e-5, atol=1e-6)
  direct = catalogue_scores.gathered_logits(hidden, table, picks, row_chunk)
  np.testing.assert_allclose(direct, scores, rtol=1e-5, atol=1e-6)


def test_the_switch_and_the_shape_check():
  assert catalogue_scores.prefers_catalogue(256, 3417)  # gSASRec at ML-1M.
  assert not catalogue_scores.prefers_catalogue(1, 3417)  # SASRec's one negative.
  hidden, table, picks, _ = _inputs(rows=4, items=6, dim=3, m=2)
  with pytest.raises(ValueError, match="same leading shape"):
    catalogue_scores.gathered_logits(hidden[:, :1], table, picks)


@pytest.mark.parametrize("name", ["bce", "gbce", "sampled_softmax"])
def test_losses_agree_through_both_paths(name, monkeypatch):
  """The same loss and gradients whether negatives are gathered or picked from the catalogue."""
  hidden, table, _, _ = _inputs(rows=9, items=40, dim=6, m=1, seed=3)
  rng = np.random.default_rng(3)
  targets = rng.integers(0, 41, size=(2, 9)).astype(np.int32)
  negatives = rng.integers(0, 41, size=(2, 9, 12)).astype(np.int32)

  def run(inverse):
    monkeypatch.setattr(catalogue_scores, "MIN_FRACTION_INVERSE", inverse)
    fn = jax.jit(jax.value_and_grad(
        lambda h, e: losses.compute(name, h, e, targets, negatives), argnums=(0, 1)))
    return fn(hidden, table)

  gathered, picked = run(0), run(10**6)  # Never / always through the catalogue.
  for got, want in zip(jax.tree.leaves(picked), jax.tree.leaves(gathered), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
