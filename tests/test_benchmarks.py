"""The benchmark harness: schema and sanity of its output (never timing thresholds)."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import fast_eval, harness, kernels, opprofile, run, subproc, variants
from deeprec_jax import catalogue_scores, losses
from deeprec_jax.models import layers

ROW_NUMBERS = ("compile_s", "median_s", "p10_s", "p90_s", "min_s", "throughput", "flops",
               "bytes_accessed", "flops_per_s", "bytes_per_s", "fraction_of_peak_flops",
               "fraction_of_peak_bandwidth", "peak_memory_bytes")


def _positive_finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def caser_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bench"))
  results = run.run(out, quick=True, only=["caser"], repeats=2,
                    profile_dir=os.path.join(out, "trace"))
  return out, results


def test_smoke_run_writes_json_and_markdown(caser_run):
  out, results = caser_run
  with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
    written = json.load(f)  # strict JSON: NaN would not parse back as a number
  assert written["schema_version"] == 1 and written["quick"] is True
  assert written["groups"] == ["caser"]
  for key in ("device_kind", "platform", "jax", "jaxlib", "flax", "xla_flags", "cpu_count",
              "date", "git_commit", "load_average_start", "load_average_end"):
    assert key in written["environment"], key
  assert _positive_finite(written["peaks"]["flops_per_s"])
  assert _positive_finite(written["peaks"]["bytes_per_s"])
  rows = written["rows"]
  assert [r["name"] for r in rows] == ["caser_L5_fwd", "caser_L5_fwd+bwd"]
  for row in rows:
    assert row["group"] == "caser" and row["throughput_unit"] == "seq/s"
    for key in ROW_NUMBERS:
      assert _positive_finite(row[key]), (row["name"], key, row[key])
    assert row["p10_s"] <= row["median_s"] <= row["p90_s"]
    assert row["params"]["batch"] == row["items"]
  markdown = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "| caser_L5_fwd |" in markdown and "measured peaks" in markdown
  assert results["rows"][0]["name"] == "caser_L5_fwd"
  traces = [f for _, _, files in os.walk(os.path.join(out, "trace", "caser")) for f in files]
  assert any(f.endswith(".xplane.pb") for f in traces)


def test_unknown_group_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown group"):
    run.run(str(tmp_path), quick=True, only=["nope"])


def test_carry_kernel_feeds_donated_state_back():
  kernel = harness.Kernel("t", "counter", lambda s, x: (s + x, jnp.sum(s)),
                          (jnp.zeros(4), jnp.ones(4)), items=1, carry=True,
                          donate_argnums=(0,))
  first = harness.measure(kernel, repeats=2, warmup=1)
  second = harness.measure(kernel, repeats=2, warmup=1)  # the kernel's args survive
  assert _positive_finite(first["median_s"]) and _positive_finite(second["median_s"])


def test_variants_patch_only_while_traced():
  """A variant swaps the library's dropout / query blocks during its context only."""
  variant = variants.Variant("t", "", flax_dropout=True, one_query_block=True,
                             prng_impl="threefry2x32", loss="softmax", autodiff_ce=True,
                             gather_negatives=True)
  with variant.context():
    assert layers.Dropout is variants.FlaxDropout and layers._MAX_QUERY_BLOCKS == 1
    assert losses.loss_fn("softmax") is variants.autodiff_softmax_ce
    assert not catalogue_scores.prefers_catalogue(256, 3417)
  assert layers.Dropout is not variants.FlaxDropout and layers._MAX_QUERY_BLOCKS > 1
  assert catalogue_scores.prefers_catalogue(256, 3417)
  assert losses.loss_fn("softmax") is losses.softmax_ce
  assert kernels.dropout_rng_impl() == "rbg"


def test_autodiff_softmax_ce_is_the_library_loss():
  """The benchmark's plain-autodiff CE computes the same loss and gradients."""
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 7, 8)).astype(np.float32)
  table = rng.normal(size=(21, 8)).astype(np.float32)
  targets = rng.integers(0, 21, size=(3, 7)).astype(np.int32)
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda h, e: fn(h, e, targets), (0, 1)))
  want = grad(lambda h, e, t: losses.softmax_ce(h, e, t, row_chunk=4))(hidden, table)
  got = grad(variants.autodiff_softmax_ce)(hidden, table)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_direct_additive_scores_are_the_library_scores():
  """The ``additive_direct`` variant computes the same scores and gradients (rtol 1e-5)."""
  rng = np.random.default_rng(1)
  args = [rng.normal(size=s).astype(np.float32)
          for s in ((2, 3, 2, 4), (2, 5, 2, 4), (2, 4), (2, 4))]
  cotangent = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: (fn(*a) * cotangent).sum(),
                                               (0, 1, 2, 3)))
  want = grad(layers.additive_scores)(*args)
  got = grad(variants.direct_additive_scores)(*args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  with variants.patched(layers, "additive_scores", variants.direct_additive_scores):
    assert layers.additive_scores is variants.direct_additive_scores
  assert layers.additive_scores is not variants.direct_additive_scores


def test_dropout_shapes_follow_the_query_blocks():
  shapes = kernels.dropout_shapes(batch=2, seq_len=200, dim=50, num_blocks=1)
  assert shapes[0] == (2, 200, 50)
  assert shapes[1:5] == [(2, 1, 50, 50), (2, 1, 50, 100), (2, 1, 50, 150), (2, 1, 50, 200)]


def test_grouped_batches_cover_every_user_once():
  users, width = 10, 8
  batch = {"item_seq": np.arange(users * width, dtype=np.int32).reshape(users, width) + 1,
           "target": np.arange(users, dtype=np.int32), "weight": np.ones(users, np.float32)}
  lengths = np.array([1, 8, 3, 2, 8, 4, 1, 5, 2, 7])
  batches = fast_eval.grouped_batches(batch, lengths, batch_size=3, lengths=(2, 4, 8))
  seen = np.concatenate([np.asarray(b["target"])[np.asarray(b["weight"]) > 0] for b in batches])
  assert sorted(seen.tolist()) == list(range(users))
  assert {b["item_seq"].shape[1] for b in batches} == {2, 4, 8}
  for b in batches:  # each user's row is the right end of its full row
    for row in np.flatnonzero(np.asarray(b["weight"])):
      user = int(b["target"][row])
      np.testing.assert_array_equal(b["item_seq"][row],
                                    batch["item_seq"][user, -b["item_seq"].shape[1]:])


def test_opprofile_categories():
  assert opprofile.categorize(
      "jit(step)/jvp(Model)/block_0/attention/Dropout_0/jit(_bernoulli)/rng_bit_generator") == (
          "dropout RNG", "forward")
  assert opprofile.categorize("jit(step)/transpose(jvp(Model))/block_1/ffn/dense_in") == (
      "FFN", "backward")


def test_child_env_forces_devices_and_nproc(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --foo")
  monkeypatch.setenv("NPROC", "3")
  env = subproc.child_env(8, "--bar", {"LD_PRELOAD": "x.so"})
  flags = env["XLA_FLAGS"].split()
  assert flags.count("--xla_force_host_platform_device_count=8") == 1
  assert "--foo" in flags and "--bar" in flags and "=4" not in env["XLA_FLAGS"]
  assert int(env["NPROC"]) >= 16 and env["LD_PRELOAD"] == "x.so"


def test_flax_dropout_variant_is_a_drop_in():
  # The variant swaps layers.Dropout for flax's: same interface, same rate of zeros.
  x = jnp.ones((100, 1000))
  out = variants.FlaxDropout(0.2).apply({}, x, deterministic=False,
                                        rngs={"dropout": jax.random.PRNGKey(0)})
  assert abs(float(jnp.mean(out == 0)) - 0.2) < 0.01
  assert isinstance(variants.FlaxDropout(0.2), nn.Module)


def test_run_timing_takes_the_median_step_of_the_train_rows(tmp_path):
  from benchmarks import run_timing  # pylint: disable=g-import-not-at-top
  rows = [{"step": 1, "split": "train", "epoch": 0, "compile_seconds": 9.0},
          {"step": 2, "split": "train", "epoch": 0, "steps_per_sec": 2.0},
          {"step": 3, "split": "valid", "steps_per_sec": 100.0},  # not a train row
          {"step": 4, "split": "train", "epoch": 1, "steps_per_sec": 0.01},  # a paused interval
          {"step": 6, "split": "train", "epoch": 2, "steps_per_sec": 4.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = run_timing.run_timing(str(tmp_path))
  assert got["step_s"] == 0.5 and got["compile_s"] == 9.0 and got["steps"] == 6
  assert got["epoch_s"] == 0.5 * 6 / 3 and got["rows"] == 3
