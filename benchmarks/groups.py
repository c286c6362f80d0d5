"""The benchmark groups of ``--only``: each one turns kernels into result rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from benchmarks import fast_eval, harness, inputs, kernels, opprofile, scaling, subproc, variants
from deeprec_jax import evaluate

Rows = list[dict[str, Any]]


def _measure(kernel: harness.Kernel, quick: bool, repeats: int,
             peaks: harness.Peaks) -> dict[str, Any]:
  # The first call after compiling is already a warm-up; --quick stops there.
  return harness.measure(kernel, peaks=peaks, repeats=repeats, warmup=1 if quick else 2)


def _measured(builder: Callable[[bool], list[harness.Kernel]]) -> Callable[..., Rows]:
  def run(quick: bool, repeats: int, peaks: harness.Peaks) -> Rows:
    return [_measure(k, quick, repeats, peaks) for k in builder(quick)]

  return run


# Evaluation passes of SASRec timed in --quick (all of fast_eval's otherwise).
QUICK_EVAL_PASSES = ("library",)


def _pass_row(name: str, step: Any, params: Any, batches: list, *, batch_size: int,
              step_row: dict[str, Any], repeats: int, peaks: harness.Peaks, note: str,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Times ``evaluate.evaluate`` over ``batches`` (one pass over every user)."""
  shapes = sorted({b["item_seq"].shape[1] for b in batches})
  return harness.measure_loop(
      "eval", name, lambda: evaluate.evaluate(step, params, batches),
      items=inputs.ML1M_USERS, unit="users/s", repeats=repeats,
      params={"batch": batch_size, "num_batches": len(batches), "seq_lens": shapes,
              "num_items": inputs.ML1M_ITEMS, **(extra or {})},
      # FLOPs/bytes scale with the sequence length: only exact at one shape.
      cost_per_call=step_row if shapes == [step_row["params"].get("max_len")] else None,
      calls=len(batches), peaks=peaks, note=note)


def eval_rows(quick: bool, repeats: int, peaks: harness.Peaks) -> Rows:
  """Eval steps per model, then whole passes over the 6,040 ML-1M users."""
  rows = []
  pass_repeats = 1 if quick else max(2, repeats // 2)
  batch_size = kernels.EVAL_BATCH
  for name in ("sasrec",) if quick else kernels.EVAL_MODELS:
    step_row = _measure(kernels.eval_kernel(name, batch_size), quick, repeats, peaks)
    rows.append(step_row)
    if name == "sasrec":
      setups, meta = fast_eval.eval_setups(batch_size)
      for variant, setup in setups.items():
        if quick and variant not in QUICK_EVAL_PASSES:
          continue
        rows.append(_pass_row(
            f"sasrec_full_ranking_{variant}", setup["step"], meta["params"], setup["batches"],
            batch_size=batch_size, step_row=step_row, repeats=pass_repeats, peaks=peaks,
            note=setup["note"] + "; the <= 2 s target",
            extra={"model": name, "users_per_length": meta["users_per_length"]}))
      if not quick:
        rows += _eval_process_rows(pass_repeats, peaks)
    else:
      setup = kernels.full_eval_pass(name, batch_size)
      rows.append(_pass_row(f"{name}_full_ranking", setup["step"], setup["params"],
                            setup["batches"], batch_size=batch_size, step_row=step_row,
                            repeats=pass_repeats, peaks=peaks, note="library eval step",
                            extra={"model": name}))
  return rows


def _eval_process_rows(repeats: int, peaks: harness.Peaks) -> Rows:
  """The SASRec passes again in fresh processes, with glibc and with each allocator.

  Every eval batch allocates ~190 MB of temporaries; glibc hands them back to
  the OS and page-faults them in again at the next batch.
  """
  rows = []
  envs = {"glibc": {}, **variants.available_allocators()}
  for variant in QUICK_EVAL_PASSES:
    for allocator, env in envs.items():
      row = subproc.run({"task": "eval_pass", "variant": variant, "env": env,
                         "repeats": repeats, "group": "eval",
                         "name": f"process: {allocator}, sasrec_full_ranking_{variant}"})
      rows.append(harness.attach_peaks(row, peaks))
  return rows


def breakdown_rows(quick: bool, repeats: int, peaks: harness.Peaks) -> Rows:
  """The SASRec step's pieces timed alone, and a per-op profile of the whole step."""
  rows = [_measure(k, quick, repeats, peaks) for k in kernels.breakdown_kernels(quick)]
  full = next(r for r in rows if r["name"] == "full_train_step")
  for row in rows:
    row["share_of_step"] = row["median_s"] / full["median_s"]
  full["profile"] = profile_step(kernels.train_step_kernel("sasrec"))
  return rows


def profile_step(kernel: harness.Kernel) -> dict[str, Any]:
  """``opprofile.profile`` of a compiled ``kernel`` (after one warm-up call)."""
  args = jax.device_put(kernel.args, may_alias=False)
  compiled = jax.jit(kernel.fn, donate_argnums=kernel.donate_argnums).lower(*args).compile()
  out = compiled(*args)
  if kernel.carry:
    args = (out[0],) + tuple(args[1:])
  return opprofile.profile(compiled, args, carry=kernel.carry)


def variant_rows(quick: bool, repeats: int, peaks: harness.Peaks) -> Rows:
  return variants.variant_rows(quick, repeats, peaks)


def scaling_group(quick: bool, repeats: int, peaks: harness.Peaks) -> Rows:
  return [harness.attach_peaks(r, peaks) for r in scaling.scaling_rows(quick, repeats)]


GROUPS: dict[str, Callable[[bool, int, harness.Peaks], Rows]] = {
    "attention": _measured(kernels.attention_kernels),
    "rnn": _measured(kernels.rnn_kernels),
    "caser": _measured(kernels.caser_kernels),
    "scoring": _measured(kernels.scoring_kernels),
    "train_step": _measured(kernels.train_step_kernels),
    "eval": eval_rows,
    "breakdown": breakdown_rows,
    "variants": variant_rows,
    "scaling": scaling_group,
}
# 'peaks' is measured first in every run (the other groups need it); naming it
# in --only just keeps its rows when nothing else is asked for.
ALL_GROUPS = ("peaks",) + tuple(GROUPS)
