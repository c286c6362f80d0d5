"""Variants of the SASRec ML-1M train step: what makes it faster with the same math.

Every variant trains the same model on the same batch with the same loss,
dropout rate and optimizer unless its row says ``same_math: False``; what
changes is how the step is generated or compiled:

* dropout random numbers: the PRNG implementation of the step's dropout key
  (``train.DROPOUT_RNG_IMPL``; ``threefry2x32``, ``philox4x32``, ``rbg``,
  ``unsafe_rbg``), the ``jax_threefry_partitionable`` flag, and drawing 16
  random bits per element instead of a 32-bit uniform (keep-probability
  quantised to 2^-16 instead of 2^-23: 0.8 becomes 0.800003). These change
  *which* masks are drawn, not their distribution;
* attention by blocks of queries, skipping the causal mask's upper triangle
  (``benchmarks.attention_variants``: same outputs, fewer FLOPs);
* the compute dtype (bfloat16 matmuls, float32 statistics);
* buffer donation of the train state;
* the process set-up, each in a fresh process (``benchmarks.subproc``): XLA
  CPU flags, and the memory allocator (``LD_PRELOAD`` of tcmalloc, where
  installed), which decides whether each step's ~400 MB of temporaries are
  page-faulted in afresh.

The library is not modified: ``train.DROPOUT_RNG_IMPL`` and the Bernoulli
draw of ``flax.linen.Dropout`` are patched only for the duration of a
measurement, to show what the change would buy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import stochastic

from benchmarks import attention_variants, harness, kernels, subproc
from deeprec_jax import train

# Allocators that keep freed memory mapped (glibc returns large blocks to the
# OS with munmap, so every step faults its temporaries in again).
ALLOCATORS = {
    "tcmalloc": ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                 "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"),
    "jemalloc": ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",),
}
# jemalloc returns dirty pages after 10 s by default; keep them.
_JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"

# Flags that the jaxlib 0.10 CPU backend accepts and that could change the
# speed of this step (unknown flags abort the process, so only known ones).
XLA_FLAG_VARIANTS = (
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_use_fusion_emitters=false",
    # jaxlib 0.10 hands dots, element-wise ops and reductions to YNNPACK
    # ("ynn_fusion" in profiles); these restrict it (empty = none).
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
)


class _Bits16Random:
  """``jax.random`` with a ``bernoulli`` that compares 16 random bits to a threshold."""

  def __getattr__(self, name: str) -> Any:
    return getattr(jax.random, name)

  @staticmethod
  def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    threshold = round(float(p) * 2**16)
    if threshold >= 2**16:
      return jnp.ones(shape, bool)
    return jax.random.bits(key, shape, jnp.uint16) < jnp.uint16(threshold)


@contextlib.contextmanager
def bits16_dropout() -> Iterator[None]:
  """Within the context, ``nn.Dropout`` draws 16-bit masks (see the module docstring)."""
  original = stochastic.random
  stochastic.random = _Bits16Random()
  try:
    yield
  finally:
    stochastic.random = original


@contextlib.contextmanager
def threefry_partitionable(value: bool) -> Iterator[None]:
  """Sets ``jax_threefry_partitionable`` (part of the jit cache key) temporarily."""
  previous = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", value)
  try:
    yield
  finally:
    jax.config.update("jax_threefry_partitionable", previous)


@contextlib.contextmanager
def dropout_rng_impl(impl: str) -> Iterator[None]:
  """Makes the library's train step wrap its key as ``impl`` (if it has the constant)."""
  if kernels.dropout_rng_impl() is None:
    yield
    return
  previous = train.DROPOUT_RNG_IMPL
  train.DROPOUT_RNG_IMPL = impl
  try:
    yield
  finally:
    train.DROPOUT_RNG_IMPL = previous


@dataclasses.dataclass
class Variant:
  """One way to build and compile the SASRec train step."""

  name: str
  note: str
  same_math: bool = True
  prng_impl: str | None = None  # None: the library's choice
  dtype: str = "float32"
  dropout_rate: float | None = None
  donate: bool = True
  attention_chunks: int = 0  # > 0: attention_variants.ChunkedDotProductAttention
  bits16: bool = False
  threefry_partitionable: bool | None = None  # None: jax's setting

  def context(self) -> contextlib.AbstractContextManager:
    """The jit-time switches of this variant, active while it is traced."""
    stack = contextlib.ExitStack()
    if self.attention_chunks:
      stack.enter_context(attention_variants.patched_attention(self.attention_chunks))
    if self.bits16:
      stack.enter_context(bits16_dropout())
    if self.threefry_partitionable is not None:
      stack.enter_context(threefry_partitionable(self.threefry_partitionable))
    return stack


def in_process_variants(quick: bool) -> list[Variant]:
  """The variants that one process can build (jit-time switches only)."""
  variants = [
      Variant("baseline", "the library's train step as it is"),
      Variant("threefry2x32", "dropout key threefry2x32 (jax default), partitionable",
              prng_impl="threefry2x32"),
      Variant("threefry2x32_not_partitionable",
              "threefry2x32 with jax_threefry_partitionable=False",
              prng_impl="threefry2x32", threefry_partitionable=False),
      Variant("philox4x32", "dropout key philox4x32", prng_impl="philox4x32"),
      Variant("rbg", "dropout key rbg (XLA RngBitGenerator)", prng_impl="rbg"),
      Variant("unsafe_rbg", "dropout key unsafe_rbg", prng_impl="unsafe_rbg"),
      Variant("rbg+bits16", "rbg, 16-bit dropout masks", prng_impl="rbg", bits16=True),
      Variant("threefry2x32_not_partitionable+bits16",
              "threefry2x32, jax_threefry_partitionable=False, 16-bit dropout masks",
              prng_impl="threefry2x32", threefry_partitionable=False, bits16=True),
      Variant("attention_chunks4", "causal attention in 4 query blocks (skips the upper "
              "triangle)", attention_chunks=4),
      Variant("attention_chunks8", "causal attention in 8 query blocks", attention_chunks=8),
      Variant("best_in_process", "threefry2x32 not partitionable + bits16 + 4 query blocks",
              prng_impl="threefry2x32", threefry_partitionable=False, bits16=True,
              attention_chunks=4),
      Variant("bfloat16", "model.dtype='bfloat16' (matmuls in bf16, stats in f32)",
              dtype="bfloat16", same_math=False),
      Variant("no_donation", "state not donated (params and Adam moments copied)",
              donate=False),
      Variant("no_dropout", "dropout_rate=0: the floor for any dropout speed-up",
              dropout_rate=0.0, same_math=False),
  ]
  if quick:
    keep = {"baseline", "best_in_process"}
    variants = [v for v in variants if v.name in keep]
  return variants


def variant_kernel(variant: Variant) -> harness.Kernel:
  config = kernels.ml1m_config("sasrec")
  config.model.dtype = variant.dtype
  if variant.dropout_rate is not None:
    config.model.dropout_rate = variant.dropout_rate
  rng = None if variant.prng_impl is None else kernels.train_rng(impl=variant.prng_impl)
  return kernels.train_step_kernel("sasrec", config=config, rng=rng, group="variants",
                                   name=variant.name, donate=variant.donate, note=variant.note)


def variant_rows(quick: bool, repeats: int, peaks: harness.Peaks | None,
                 processes: bool = True) -> list[dict[str, Any]]:
  """Times every variant; rows carry ``speedup`` relative to the baseline."""
  rows = []
  for variant in in_process_variants(quick):
    impl = variant.prng_impl or kernels.dropout_rng_impl() or "threefry2x32"
    with variant.context(), dropout_rng_impl(impl):
      row = harness.measure(variant_kernel(variant), peaks=peaks, repeats=repeats,
                            warmup=1 if quick else 2)
    row["params"]["dropout_rng"] = impl
    row["same_math"] = variant.same_math
    rows.append(row)
  base = next(r for r in rows if r["name"] == "baseline")
  for row in rows:
    row["speedup"] = base["median_s"] / row["median_s"]
  if processes and not quick:
    rows += [harness.attach_peaks(r, peaks) for r in process_rows(repeats)]
  return rows


def available_allocators() -> dict[str, dict[str, str]]:
  """``{name: env}`` for the allocators installed here (LD_PRELOAD + settings)."""
  found = {}
  for name, paths in ALLOCATORS.items():
    path = next((p for p in paths if os.path.exists(p)), None)
    if path:
      env = {"LD_PRELOAD": path}
      if name == "jemalloc":
        env["MALLOC_CONF"] = _JEMALLOC_CONF
      found[name] = env
  return found


# The fastest same-math in-process set-up found on the 2-core CPU (see README).
BEST_IN_PROCESS = {"prng_impl": "threefry2x32", "threefry_partitionable": False, "bits16": True,
                   "attention_chunks": 4}


def process_rows(repeats: int) -> list[dict[str, Any]]:
  """Process-level set-ups, each in a fresh process, against a fresh-process baseline.

  XLA flags one at a time, then each installed allocator, then the best of
  each together with the fastest dropout-RNG set-up, as one combined row.
  """
  spec = {"devices": 1, "per_device_batch": 128, "repeats": repeats, "group": "variants"}
  rows = [subproc.run({**spec, "name": "process: baseline"})]
  for flag in XLA_FLAG_VARIANTS:
    rows.append(subproc.run({**spec, "name": f"process: XLA_FLAGS={flag}", "xla_flags": flag}))
  allocators = available_allocators()
  for name, env in allocators.items():
    rows.append(subproc.run({**spec, "name": f"process: {name}", "env": env}))
  base = rows[0]
  if "error" in base:
    return rows
  for row in rows:
    params = row.get("params", {})
    flag = params.get("xla_flags", "")
    row["same_math"] = "fast_math" not in flag
    row["note"] = "fresh process" + (f", XLA_FLAGS+={flag}" if flag else "") + (
        f", env {params['env']}" if params.get("env") else "")
    if "median_s" in row:
      row["speedup"] = base["median_s"] / row["median_s"]
  helped = lambda rows: [r for r in rows if r.get("speedup", 0) > 1.03 and r["same_math"]]
  flags = helped(r for r in rows if r.get("params", {}).get("xla_flags"))
  allocs = helped(r for r in rows if r.get("params", {}).get("env"))
  best_flag = max(flags, key=lambda r: r["speedup"])["params"]["xla_flags"] if flags else ""
  best_env = max(allocs, key=lambda r: r["speedup"])["params"]["env"] if allocs else {}
  row = subproc.run({**spec, **BEST_IN_PROCESS, "name": "process: combined",
                     "xla_flags": best_flag, "env": best_env})
  if "median_s" in row:
    row.update(same_math=True, speedup=base["median_s"] / row["median_s"],
               note=f"best flag ({best_flag or 'none'}), allocator {best_env or 'glibc'}, "
                    "and best_in_process")
  rows.append(row)
  return rows
