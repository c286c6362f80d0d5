"""Variants of the SASRec ML-1M train step: what each piece of the library buys.

Every variant trains the same model on the same batch with the same loss,
dropout rate and optimizer unless its row says ``same_math: False``; what
changes is how the step is generated or compiled:

* dropout: the library's ``layers.Dropout`` (16 random bits per element, four
  elements per Threefry hash) against ``flax.linen.Dropout``
  (``jax.random.bernoulli``: a float32 uniform per element) with the dropout
  key as ``rbg`` (the library's key) or ``threefry2x32`` (jax's default).
  These change *which* masks are drawn, not their distribution;
* causal attention in one block of queries instead of the library's ~50-row
  blocks that skip the keys after them (``layers.query_blocks``; same
  outputs);
* one user per row (``train.pack=False``) instead of the library's packed
  rows (``packing.pack_batch``: about 80 rows instead of 128 at ML-1M's
  lengths; same loss);
* ``previous_library``: all three of the above, i.e. the step as it was
  before those changes;
* the loss: full softmax cross-entropy (``train.loss='softmax'``), once with
  the library's streamed log-sum-exp (``losses.catalogue_logsumexp``) and once
  as plain autodiff of ``logsumexp(hidden @ table.T)`` (same loss; the
  ``softmax_autodiff`` row's speedup is against the ``softmax`` row);
* additive attention (``model.attention='additive'``), once with the
  library's ``layers.additive_scores`` (a scan over the hidden features, a
  recomputing custom VJP) and once as the direct ``tanh`` of the
  ``[batch, q, k, d_att]`` sum under autodiff, the library before that change
  (same scores; the ``additive_direct`` row's speedup is against ``additive``);
* gSASRec's loss, gBCE over 256 negatives per position, once with the
  negatives scored through the catalogue (``catalogue_scores``, the
  library's choice at that many) and once with their rows gathered (the
  ``gbce_256_gathered`` row's speedup is against ``gbce_256``);
* the compute dtype (bfloat16 matmuls, float32 statistics);
* buffer donation of the train state;
* the process set-up, each in a fresh process (``benchmarks.subproc``): XLA
  CPU flags, and the memory allocator (``LD_PRELOAD`` of tcmalloc or jemalloc,
  where installed), which decides whether each step's ~400 MB of temporaries
  are page-faulted in afresh.

The library is not modified: ``layers.Dropout``, ``layers._MAX_QUERY_BLOCKS``,
``layers.additive_scores``, ``train.DROPOUT_RNG_IMPL``, ``losses.LOSSES`` and
``catalogue_scores.MIN_FRACTION_INVERSE`` are patched only while a variant is traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import harness, kernels, subproc
from deeprec_jax import catalogue_scores, losses, train
from deeprec_jax.models import layers

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


class FlaxDropout(nn.Module):
  """``flax.linen.Dropout`` behind ``layers.Dropout``'s interface (a Bernoulli per element)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    return nn.Dropout(self.rate)(x, deterministic=deterministic)


def autodiff_softmax_ce(hidden: jax.Array, item_table: jax.Array, targets: jax.Array,
                       negatives: jax.Array | None = None) -> jax.Array:
  """``losses.softmax_ce`` as plain autodiff: the ``[B, L, N + 1]`` logits at once."""
  del negatives
  hidden = hidden.astype(jnp.float32)
  table = item_table.astype(jnp.float32)
  logits = jnp.einsum("bld,nd->bln", hidden, table)
  logits = jnp.where(jnp.arange(table.shape[0]) == 0, -jnp.inf, logits)
  pos = jnp.sum(hidden * jnp.take(table, targets, axis=0), axis=-1)
  mask = targets > 0
  per_target = jnp.where(mask, jax.nn.logsumexp(logits, axis=-1) - pos, 0.0)
  return jnp.sum(per_target) / jnp.maximum(jnp.sum(mask), 1)


def direct_additive_scores(query: jax.Array, key: jax.Array, bias: jax.Array,
                           v: jax.Array) -> jax.Array:
  """``layers.additive_scores`` as plain autodiff: the ``[b, q, k, h, d]`` tanh at once."""
  hidden = jnp.tanh(query[:, :, None] + key[:, None] + bias)
  return jnp.einsum("bqkhd,hd->bhqk", hidden, v)


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
  """Sets ``module.name = value`` for the duration of the context."""
  previous = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, previous)


@dataclasses.dataclass
class Variant:
  """One way to build and compile the SASRec train step."""

  name: str
  note: str
  same_math: bool = True
  prng_impl: str | None = None  # None: the library's train.DROPOUT_RNG_IMPL
  flax_dropout: bool = False  # flax.linen.Dropout instead of layers.Dropout
  one_query_block: bool = False  # causal attention without query blocks
  pack: bool = True  # train.pack: several users per row (packing.pack_batch)
  dtype: str = "float32"
  dropout_rate: float | None = None
  donate: bool = True
  loss: str = "bce"  # train.loss
  num_negatives: int | None = None  # train.num_negatives (None: the config's 1)
  gather_negatives: bool = False  # negatives always gathered (no catalogue_scores)
  autodiff_ce: bool = False  # the 'softmax' loss as plain autodiff (no streaming)
  attention: str = "dot_product"  # model.attention
  direct_additive: bool = False  # additive scores as plain autodiff (no scan, no VJP)
  reference: str = "baseline"  # the row that `speedup` divides by

  def context(self) -> contextlib.AbstractContextManager:
    """The jit-time switches of this variant, active while it is traced."""
    stack = contextlib.ExitStack()
    if self.flax_dropout:
      stack.enter_context(patched(layers, "Dropout", FlaxDropout))
    if self.one_query_block:
      stack.enter_context(patched(layers, "_MAX_QUERY_BLOCKS", 1))
    if self.prng_impl:
      stack.enter_context(patched(train, "DROPOUT_RNG_IMPL", self.prng_impl))
    if self.direct_additive:
      stack.enter_context(patched(layers, "additive_scores", direct_additive_scores))
    if self.gather_negatives:
      stack.enter_context(patched(catalogue_scores, "MIN_FRACTION_INVERSE", 0))
    if self.autodiff_ce:
      table = {**losses.LOSSES, "softmax": autodiff_softmax_ce}
      stack.enter_context(patched(losses, "LOSSES", table))
    return stack


def in_process_variants(quick: bool) -> list[Variant]:
  """The variants that one process can build (jit-time switches only)."""
  variants = [
      Variant("baseline", "the library's train step as it is"),
      Variant("flax_dropout_rbg", "flax.linen.Dropout (float32 uniform per element), rbg key",
              flax_dropout=True),
      Variant("flax_dropout_threefry", "flax.linen.Dropout, threefry2x32 key (jax default)",
              flax_dropout=True, prng_impl="threefry2x32"),
      Variant("one_query_block", "causal attention over all keys at once (no query blocks)",
              one_query_block=True),
      Variant("unpacked", "one user per row (train.pack=False): 128 rows of 200",
              pack=False),
      Variant("previous_library", "unpacked + flax dropout (rbg) + one query block: the step "
              "before the three changes", flax_dropout=True, one_query_block=True, pack=False),
      Variant("bfloat16", "model.dtype='bfloat16' (matmuls in bf16, stats in f32)",
              dtype="bfloat16", same_math=False),
      Variant("no_donation", "state not donated (params and Adam moments copied)",
              donate=False),
      Variant("no_dropout", "dropout_rate=0: the floor for any dropout speed-up",
              dropout_rate=0.0, same_math=False),
      Variant("softmax", "train.loss='softmax': full cross-entropy, streamed log-sum-exp",
              loss="softmax", same_math=False),
      Variant("softmax_autodiff", "the same loss as plain autodiff of [B, L, N + 1] logits "
              "(speedup vs 'softmax')", loss="softmax", autodiff_ce=True, reference="softmax"),
      Variant("additive", "model.attention='additive' (layers.additive_scores)",
              attention="additive", same_math=False),
      Variant("additive_direct", "the same additive scores as plain autodiff of the "
              "[b, q, k, d_att] tanh (speedup vs 'additive')", attention="additive",
              direct_additive=True, reference="additive"),
      Variant("gbce_256", "train.loss='gbce', 256 negatives per position (gSASRec's "
              "loss at d 50): negatives scored through the catalogue (catalogue_scores)",
              loss="gbce", num_negatives=256, same_math=False),
      Variant("gbce_256_gathered", "the same loss with the 256 x 50 rows per position "
              "gathered (speedup vs 'gbce_256')", loss="gbce", num_negatives=256,
              gather_negatives=True, reference="gbce_256"),
  ]
  if quick:
    keep = {"baseline", "previous_library", "softmax", "softmax_autodiff", "additive",
            "additive_direct", "gbce_256", "gbce_256_gathered"}
    variants = [v for v in variants if v.name in keep]
  return variants


def variant_kernel(variant: Variant) -> harness.Kernel:
  config = kernels.ml1m_config("sasrec")
  config.model.dtype = variant.dtype
  config.train.pack = variant.pack
  config.train.loss = variant.loss
  if variant.num_negatives is not None:
    config.train.num_negatives = variant.num_negatives
  config.model.attention = variant.attention
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
    with variant.context():
      row = harness.measure(variant_kernel(variant), peaks=peaks, repeats=repeats,
                            warmup=1 if quick else 2)
    row["params"]["dropout_rng"] = variant.prng_impl or train.DROPOUT_RNG_IMPL
    row["params"]["dropout"] = "flax.linen.Dropout" if variant.flax_dropout else "layers.Dropout"
    row["same_math"] = variant.same_math
    rows.append(row)
  medians = {row["name"]: row["median_s"] for row in rows}
  for variant, row in zip(in_process_variants(quick), rows, strict=True):
    row["speedup"] = medians[variant.reference] / row["median_s"]
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


def process_rows(repeats: int) -> list[dict[str, Any]]:
  """Process-level set-ups, each in a fresh process, against a fresh-process baseline.

  XLA flags one at a time, then each installed allocator, then the best of
  each together, as one combined row.
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
  row = subproc.run({**spec, "name": "process: combined",
                     "xla_flags": best_flag, "env": best_env})
  if "median_s" in row:
    row.update(same_math=True, speedup=base["median_s"] / row["median_s"],
               note=f"best flag ({best_flag or 'none'}) and allocator {best_env or 'glibc'}")
  rows.append(row)
  return rows
