r"""A prepared accelerator run: train steps, evaluation and attention against the peaks.

Usage:

  python -m benchmarks.gpu --out=DIR [--smoke] [--repeats=N] [--budget_s=S]

Sections (in this order, each row guarded: a failing row records its error and
the run goes on; once ``--budget_s`` has passed, the remaining rows are
recorded as skipped):

* ``peaks``: float32 matmul (default and highest precision) and bfloat16
  matmul of ``n x n`` (8192), a streaming ``x + 1`` over 1 GiB, and the vendor
  datasheet figures of the device kind (``DATASHEET``; unknown kinds say so).
* ``train_step``: ``kernels.train_step_kernels`` (every family) at ML-1M.
* ``train_step_x10``: the same steps at 10x ML-1M (``X10``): 34,160 items,
  60,400 users and 10x each config's batch; sequence lengths stay ML-1M's.
* ``attention``: the attention core (``[batch, L, heads, head_dim]`` in and
  out, no projections) of the library (XLA) against
  ``deeprec_jax.models.pallas_attention``, forward and forward+backward, at
  SASRec width (d 50, 1 head, causal) and BERT4Rec width (d 64, 2 heads),
  L 200, batch 128. Rows are skipped with the reason if the import fails.
* ``eval`` / ``eval_x10``: SASRec's full-ranking ``kernels.eval_kernel`` and a
  whole pass over every user (``groups.eval_rows``), at ML-1M and at 10x.

``--smoke`` shrinks every shape (L 16, tiny batches, 64 users), times only
``SMOKE_TRAIN_MODELS`` and takes one repeat; it runs on 2 CPU cores in under 2
minutes. Writes ``DIR/results.json`` and
``DIR/results.md`` (``report.write`` plus a table against the datasheet).
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import environment as env_info
from benchmarks import groups, harness, inputs, kernels, report, variants
from deeprec_jax.models import layers, validation


def _define_flags() -> None:
  """The binary's flags: defined only when run as one, since benchmarks.run (imported
  beside this module in the tests) defines an --out of its own."""
  flags.DEFINE_string("out", None, "Directory for results.json and results.md.", required=True)
  flags.DEFINE_bool("smoke", False, "Tiny shapes, 1 repeat (a CPU check of the script).")
  flags.DEFINE_integer("repeats", 0, "Timed samples per row (0: 10, or 1 with --smoke).")
  flags.DEFINE_float("budget_s", 0.0, "Start no row after this many seconds (0: 390, or 110 "
                     "smoke).")


SECTIONS = ("peaks", "train_step", "train_step_x10", "attention", "eval", "eval_x10")
DEFAULT_BUDGET_S, SMOKE_BUDGET_S = 390.0, 110.0
# --smoke builds only these train steps (building and compiling each takes
# ~10-20 s on 2 CPU cores); a full run times all of ``kernels.train_step_kernels``.
SMOKE_TRAIN_MODELS = {"train_step": ("sasrec",), "train_step_x10": ("caser",)}
X10 = {"num_items": 10 * inputs.ML1M_ITEMS, "num_users": 10 * inputs.ML1M_USERS,
       "batch_factor": 10}
X10_NOTE = ("10x ML-1M: 34,160 items (10x catalogue), 60,400 users (10x; only Caser embeds "
            "users, eval ranks every user), batch 10x the ML-1M config's; lengths as ML-1M")
SMOKE = {"max_len": 16, "batch": 8, "users": 64, "eval_batch": 16, "exclude_width": 16,
         "matmul_n": 256, "stream_elements": 2**20, "attention_len": 16, "attention_batch": 4}
FULL = {"matmul_n": 8192, "stream_elements": 2**28, "attention_len": 200,
        "attention_batch": kernels.ATTENTION_BATCH}

# Vendor datasheet peaks, dense (no sparsity): bf16 and f32 FLOP/s (tf32 tensor
# core where the vendor gives one), memory bandwidth in bytes/s. Matched by
# substring of ``device_kind``, first match wins (so "H100 PCIe" before "H100").
_T = 1e12
DATASHEET: tuple[tuple[str, dict[str, float | str]], ...] = (
    ("H200 NVL", {"name": "NVIDIA H200 NVL", "bf16": 835 * _T, "tf32": 417 * _T,
                  "f32": 60 * _T, "bandwidth": 4.8 * _T}),
    ("H200", {"name": "NVIDIA H200 SXM", "bf16": 989.4 * _T, "tf32": 494.7 * _T,
              "f32": 67 * _T, "bandwidth": 4.8 * _T}),
    ("H100 PCIe", {"name": "NVIDIA H100 PCIe", "bf16": 756 * _T, "tf32": 378 * _T,
                   "f32": 51 * _T, "bandwidth": 2.0 * _T}),
    ("H100", {"name": "NVIDIA H100 SXM", "bf16": 989.4 * _T, "tf32": 494.7 * _T,
              "f32": 67 * _T, "bandwidth": 3.35 * _T}),
    ("A100-SXM4-80GB", {"name": "NVIDIA A100 SXM 80GB", "bf16": 312 * _T, "tf32": 156 * _T,
                        "f32": 19.5 * _T, "bandwidth": 2.039 * _T}),
    ("A100", {"name": "NVIDIA A100 40GB", "bf16": 312 * _T, "tf32": 156 * _T,
              "f32": 19.5 * _T, "bandwidth": 1.555 * _T}),
    ("L4", {"name": "NVIDIA L4", "bf16": 121 * _T, "tf32": 60 * _T, "f32": 30.3 * _T,
            "bandwidth": 0.3 * _T}),
    ("TPU v4", {"name": "TPU v4", "bf16": 275 * _T, "bandwidth": 1.2 * _T}),
    ("TPU v5 lite", {"name": "TPU v5e", "bf16": 197 * _T, "bandwidth": 0.819 * _T}),
    ("TPU v6 lite", {"name": "TPU v6e", "bf16": 918 * _T, "bandwidth": 1.64 * _T}),
    ("TPU v5", {"name": "TPU v5p", "bf16": 459 * _T, "bandwidth": 2.765 * _T}),
)


def datasheet(device_kind: str) -> dict[str, Any]:
  """The datasheet peaks of ``device_kind`` (``known: False`` and NaNs if not listed)."""
  for key, entry in DATASHEET:
    if key.lower() in device_kind.lower():
      return {"known": True, "device_kind": device_kind, "tf32": math.nan, "f32": math.nan,
              **entry}
  return {"known": False, "device_kind": device_kind, "name": "unknown", "bf16": math.nan,
          "tf32": math.nan, "f32": math.nan, "bandwidth": math.nan}


class _Runner:
  """Guards rows: skipped past the budget, errors recorded, wall time kept."""

  def __init__(self, budget_s: float):
    self.start, self.budget_s, self.rows = time.monotonic(), budget_s, []
    self.extra_peaks = {"bf16_flops_per_s": math.nan, "f32_highest_flops_per_s": math.nan}

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def skip(self, group: str, name: str, reason: str) -> None:
    self.rows.append({"group": group, "name": name, "status": "skipped", "reason": reason,
                      "error": f"skipped: {reason}"})

  def row(self, group: str, name: str, fn: Callable[[], Any]) -> list[dict[str, Any]]:
    """Runs ``fn() -> row or [rows]`` unless over budget; returns the rows added."""
    if self.elapsed() > self.budget_s:
      self.skip(group, name, f"budget of {self.budget_s:.0f} s spent")
      return self.rows[-1:]
    start = time.monotonic()
    try:
      out = fn()
      out = out if isinstance(out, list) else [out]
      for r in out:
        r.setdefault("group", group)
        r.update(status="measured", row_wall_s=(time.monotonic() - start) / len(out))
    except Exception as e:  # noqa: BLE001  (one failing row must not end the run)
      logging.warning("%s/%s failed:\n%s", group, name, traceback.format_exc())
      out = [{"group": group, "name": name, "status": "error",
              "reason": " ".join(f"{type(e).__name__}: {e}".split())[:500],
              "row_wall_s": time.monotonic() - start}]
      out[0]["error"] = out[0]["reason"]
    self.rows += out
    for r in out:
      logging.info("%s/%s: %s", r["group"], r["name"], r.get("error") or
                   f"{r['median_s'] * 1e3:.3f} ms, {r['throughput']:.1f} {r['throughput_unit']}")
    return out


@contextlib.contextmanager
def _scale(smoke: bool, x10: bool) -> Iterator[None]:
  """Builds kernels at 10x ML-1M and/or smoke shapes (``kernels``' module constants)."""
  original = kernels.ml1m_config

  def config(model: str):
    c = original(model)
    if smoke:
      c.train.batch_size = SMOKE["batch"]
      c.data.max_len = min(c.data.max_len, SMOKE["max_len"])
    c.train.batch_size *= X10["batch_factor"] if x10 else 1
    return c

  users = (10 if x10 else 1) * (SMOKE["users"] if smoke else inputs.ML1M_USERS)
  with contextlib.ExitStack() as stack:
    stack.enter_context(variants.patched(kernels, "ml1m_config", config))
    stack.enter_context(variants.patched(inputs, "ML1M_USERS", users))
    if x10:
      stack.enter_context(variants.patched(inputs, "ML1M_ITEMS", X10["num_items"]))
    if smoke:
      stack.enter_context(variants.patched(kernels, "EVAL_BATCH", SMOKE["eval_batch"]))
      stack.enter_context(variants.patched(kernels, "EVAL_EXCLUDE_WIDTH",
                                           SMOKE["exclude_width"]))
    yield


def _matmul(n: int, dtype: Any, precision: str | None) -> harness.Kernel:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  name = f"matmul_{jnp.dtype(dtype).name}_{n}" + (f"_{precision.lower()}" if precision else "")
  return harness.Kernel("peaks", name, lambda a, b: jnp.matmul(a, b, precision=precision),
                        (a, b), items=1, unit="calls/s",
                        params={"n": n, "dtype": jnp.dtype(dtype).name,
                                "precision": precision or "default"},
                        note="peak FLOP/s: the best (min-time) sample")


def peak_rows(runner: _Runner, shapes: dict[str, Any], repeats: int) -> harness.Peaks:
  """Matmul (f32 default / highest, bf16) and streaming peaks; returns the f32 + stream peaks.

  The f32 default-precision matmul is the peak the other rows are reported
  against (the models run in float32 at default precision).
  """
  n, elements = shapes["matmul_n"], shapes["stream_elements"]
  stream = harness.Kernel(
      "peaks", f"stream_f32_{elements // 2**20}M", lambda x: (x + 1.0, ()),
      (jnp.zeros((elements,), jnp.float32),), items=1, unit="calls/s", carry=True,
      donate_argnums=(0,), params={"elements": elements, "dtype": "float32"},
      note="peak bytes/s: the best (min-time) sample, in place")
  best: dict[str, float] = {}
  for key, kernel in (("f32", _matmul(n, jnp.float32, None)),
                      ("f32_highest", _matmul(n, jnp.float32, "highest")),
                      ("bf16", _matmul(n, jnp.bfloat16, None)), ("stream", stream)):
    measure = lambda k=kernel: harness.measure(k, repeats=repeats)
    for r in runner.row("peaks", kernel.name, measure):
      if r["status"] == "measured":
        best[key] = (8.0 * elements if key == "stream" else 2.0 * n**3) / r["min_s"]
  peaks = harness.Peaks(best.get("f32", math.nan), best.get("stream", math.nan))
  runner.extra_peaks = {"bf16_flops_per_s": best.get("bf16", math.nan),
                        "f32_highest_flops_per_s": best.get("f32_highest", math.nan)}
  for r in runner.rows:
    if r["group"] == "peaks" and r["status"] == "measured":
      harness.attach_peaks(r, peaks)
  return peaks


def train_rows(runner: _Runner, peaks: harness.Peaks, repeats: int, smoke: bool,
               x10: bool) -> None:
  """``kernels.train_step_kernels`` at ML-1M (or 10x), one guarded row per step."""
  group = "train_step_x10" if x10 else "train_step"
  built: list[harness.Kernel] = []

  def build() -> list:
    with _scale(smoke, x10):
      built.extend([kernels.train_step_kernel(m) for m in SMOKE_TRAIN_MODELS[group]] if smoke
                   else kernels.train_step_kernels(False))
    return []

  if runner.row(group, "build", build) and not built:
    return
  for kernel in built:
    kernel.group = group
    if x10:
      kernel.name = kernel.name.replace("_ml1m", "_ml1m_x10")
      kernel.note = "; ".join(filter(None, [kernel.note, X10_NOTE]))
      kernel.params.update(num_items=X10["num_items"], num_users=X10["num_users"])
    runner.row(group, kernel.name, lambda k=kernel: harness.measure(
        k, peaks=peaks, repeats=repeats, warmup=1 if smoke else 2))
    kernel.args = ()  # frees the state and batch on the device


def eval_rows(runner: _Runner, peaks: harness.Peaks, repeats: int, smoke: bool,
              x10: bool) -> None:
  """SASRec's eval step and one whole full-ranking pass, as ``groups.eval_rows`` (quick)."""
  group = "eval_x10" if x10 else "eval"

  def measure() -> list[dict[str, Any]]:
    with _scale(smoke, x10):
      rows = groups.eval_rows(True, repeats, peaks)
    for r in rows:
      r["group"] = group
      if x10:
        r["name"] += "_x10"
        r["note"] = "; ".join(filter(None, [r.get("note"), X10_NOTE]))
    return rows

  runner.row(group, "sasrec_eval", measure)


class _XlaAttention(nn.Module):
  """The library's attention core (``layers.attend_by_blocks``), no projections, no scaling."""

  kind: str
  causal: bool

  @nn.compact
  def __call__(self, query, key, value, bias, v, mask):
    if self.kind == "dot_product":
      logits = lambda a, b, n: jnp.einsum("bqhd,bkhd->bhqk", query[:, a:b], key[:, :n])
    else:
      logits = lambda a, b, n: layers.additive_scores(query[:, a:b], key[:, :n], bias, v)
    return layers.attend_by_blocks(logits, value, mask, q_len=query.shape[1],
                                   causal=self.causal, dropout_rate=0.0, deterministic=True)


def attention_kernel(impl: str, kind: str, width: str, dim: int, heads: int, causal: bool,
                     seq_len: int, batch: int, backward: bool,
                     pallas: Any = None) -> harness.Kernel:
  """Attention core on ``q, k, v [batch, seq_len, heads, dim // heads]``, padded keys masked."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(max(seq_len // 4, 1), seq_len + 1, size=batch)
  valid = np.arange(seq_len)[None, :] >= (seq_len - lengths)[:, None]
  shape = (batch, seq_len, heads, dim // heads)
  q, k, v = (rng.normal(size=shape).astype(np.float32) * valid[..., None, None]
             for _ in range(3))
  bias, vec = (rng.normal(size=(heads, dim // heads)).astype(np.float32) for _ in range(2))
  xla = _XlaAttention(kind, causal)

  def apply(q, k, v, bias, vec, valid):
    q = q * q.shape[-1]**-0.5 if kind == "dot_product" else q  # as the layer scales it
    if impl == "xla":
      return xla.apply({}, q, k, v, bias, vec, layers.attention_mask(valid, causal=causal))
    if kind == "dot_product":
      return pallas.dot_product_attention(q, k, v, key_valid=valid, causal=causal)
    return pallas.additive_attention(q, k, v, bias, vec, key_valid=valid, causal=causal)

  argnums = (0, 1, 2) if kind == "dot_product" else (0, 1, 2, 3, 4)
  fn = kernels._grad_of_sum(apply, argnums) if backward else apply  # noqa: SLF001
  mode = "fwd+bwd" if backward else "fwd"
  return harness.Kernel(
      "attention", f"{impl}_{kind}_{width}_L{seq_len}_{mode}", fn, (q, k, v, bias, vec, valid),
      items=batch, params={"impl": impl, "attention": kind, "width": width, "dim": dim,
                           "heads": heads, "causal": causal, "seq_len": seq_len,
                           "batch": batch, "mode": mode})


def attention_rows(runner: _Runner, peaks: harness.Peaks, repeats: int,
                   shapes: dict[str, Any], smoke: bool) -> None:
  """XLA vs Pallas attention cores; Pallas rows skipped with the reason if it is missing."""
  try:
    from deeprec_jax.models import pallas_attention  # noqa: PLC0415  (may not exist yet)
    missing = None
  except Exception as e:  # noqa: BLE001
    pallas_attention, missing = None, f"no pallas_attention: {type(e).__name__}: {e}"[:300]
  seq_len, batch = shapes["attention_len"], shapes["attention_batch"]
  for width, dim, heads, causal in kernels.ATTENTION_WIDTHS:
    for kind in validation.ATTENTION_KINDS:
      for backward in (False, True):
        for impl in ("xla", "pallas"):
          name = f"{impl}_{kind}_{width}_L{seq_len}_{'fwd+bwd' if backward else 'fwd'}"
          if impl == "pallas" and missing:
            runner.skip("attention", name, missing)
            continue
          build = lambda i=impl, kd=kind, w=width, d=dim, h=heads, c=causal, b=backward: (
              attention_kernel(i, kd, w, d, h, c, seq_len, batch, b, pallas_attention))
          runner.row("attention", name, lambda f=build: harness.measure(
              f(), peaks=peaks, repeats=repeats, warmup=1 if smoke else 2))


def _against_datasheet(row: dict[str, Any], sheet: dict[str, Any], bf16_peak: float) -> None:
  if row.get("status") != "measured":
    return
  flops, moved = row.get("flops_per_s", math.nan), row.get("bytes_per_s", math.nan)
  row["fraction_of_measured_bf16_flops"] = flops / bf16_peak
  row["fraction_of_datasheet_bf16_flops"] = flops / sheet["bf16"]
  row["fraction_of_datasheet_f32_flops"] = flops / sheet["f32"]
  row["fraction_of_datasheet_bandwidth"] = moved / sheet["bandwidth"]


def _pct(x: Any) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _datasheet_markdown(results: dict[str, Any]) -> str:
  sheet, peaks = results["datasheet"], results["peaks"]
  tera = lambda x: "-" if x is None or not math.isfinite(x) else f"{x / _T:,.2f}"
  lines = [f"## Against the datasheet ({sheet['name']}, device kind `{sheet['device_kind']}`)",
           "", "| peak | measured T/s | datasheet T/s |", "|---|---|---|",
           f"| bf16 matmul FLOP/s | {tera(peaks['bf16_flops_per_s'])} | {tera(sheet['bf16'])} |",
           f"| f32 matmul FLOP/s, default precision | {tera(peaks['flops_per_s'])} | "
           f"{tera(sheet['tf32'])} (tf32) |",
           f"| f32 matmul FLOP/s, highest | {tera(peaks['f32_highest_flops_per_s'])} | "
           f"{tera(sheet['f32'])} |",
           f"| memory bytes/s | {tera(peaks['bytes_per_s'])} | {tera(sheet['bandwidth'])} |",
           "", "| group | name | status | throughput | TFLOP/s | % f32 peak | % bf16 peak | "
           "% datasheet bf16 | TB/s | % stream peak | % datasheet bandwidth |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    if r["group"] == "peaks":
      continue
    if r["status"] != "measured":
      lines.append(f"| {r['group']} | {r['name']} | {r['status']}: "
                   f"{r['reason'].replace('|', '/')} |" + " |" * 8)
      continue
    lines.append(
        f"| {r['group']} | {r['name']} | measured | {r['throughput']:,.0f} "
        f"{r['throughput_unit']} | {tera(r['flops_per_s'])} | "
        f"{_pct(r['fraction_of_peak_flops'])} | {_pct(r['fraction_of_measured_bf16_flops'])} | "
        f"{_pct(r['fraction_of_datasheet_bf16_flops'])} | {tera(r['bytes_per_s'])} | "
        f"{_pct(r['fraction_of_peak_bandwidth'])} | "
        f"{_pct(r['fraction_of_datasheet_bandwidth'])} |")
  return "\n".join(lines) + "\n"


def run(out: str, *, smoke: bool = False, repeats: int = 0,
        budget_s: float = 0.0) -> dict[str, Any]:
  """Runs every section within ``budget_s`` and writes the results; returns them."""
  repeats = repeats or (1 if smoke else 10)
  runner = _Runner(budget_s or (SMOKE_BUDGET_S if smoke else DEFAULT_BUDGET_S))
  shapes = {**FULL, **SMOKE} if smoke else FULL
  environment = env_info.collect()
  environment["load_average_start"] = environment.pop("load_average")
  sheet = datasheet(environment["device_kind"])
  peaks = peak_rows(runner, shapes, repeats)
  train_rows(runner, peaks, repeats, smoke, x10=False)
  train_rows(runner, peaks, repeats, smoke, x10=True)
  attention_rows(runner, peaks, repeats, shapes, smoke)
  eval_rows(runner, peaks, repeats, smoke, x10=False)
  eval_rows(runner, peaks, repeats, smoke, x10=True)
  for row in runner.rows:
    _against_datasheet(row, sheet, runner.extra_peaks["bf16_flops_per_s"])
  environment["load_average_end"] = env_info.load_average()
  results = {
      "schema_version": 1, "script": "benchmarks.gpu", "smoke": smoke, "quick": smoke,
      "repeats": repeats, "budget_s": runner.budget_s, "elapsed_s": runner.elapsed(),
      "suggested_dir": "benchmarks/results/" + "".join(  # e.g. h200-sxm
          c if c.isalnum() else "-" for c in sheet["name" if sheet["known"] else "device_kind"]
          .lower().replace("nvidia ", "")),
      "sections": list(SECTIONS), "scale_x10": {**X10, "note": X10_NOTE},
      "shapes": shapes, "environment": environment, "datasheet": sheet,
      "peaks": {"flops_per_s": peaks.flops_per_s, "bytes_per_s": peaks.bytes_per_s,
                **runner.extra_peaks},
      "rows": runner.rows, "summary": report.summary(runner.rows),
  }
  json_path, md_path = report.write(out, results)
  with open(md_path, "a", encoding="utf-8") as f:
    f.write("\n" + _datasheet_markdown(results))
  logging.info("wrote %s and %s in %.0f s", json_path, md_path, runner.elapsed())
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  run(f.out, smoke=f.smoke, repeats=f.repeats, budget_s=f.budget_s)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
