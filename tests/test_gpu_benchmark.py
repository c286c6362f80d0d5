"""benchmarks/gpu.py: every section has rows, measured or skipped with a reason."""

import json
import math
import os

import jax
import pytest

from benchmarks import gpu


def test_datasheet_lookup():
  assert gpu.datasheet(jax.devices()[0].device_kind)["known"] is False  # the CPU
  assert math.isnan(gpu.datasheet("cpu")["bf16"])
  h200 = gpu.datasheet("NVIDIA H200")
  assert h200["known"] and h200["bf16"] == pytest.approx(989.4e12)
  assert h200["bandwidth"] == pytest.approx(4.8e12)
  assert gpu.datasheet("NVIDIA H100 80GB HBM3")["bandwidth"] == pytest.approx(3.35e12)
  assert gpu.datasheet("NVIDIA H100 PCIe")["name"] == "NVIDIA H100 PCIe"
  assert gpu.datasheet("NVIDIA H200 NVL")["name"] == "NVIDIA H200 NVL"


def test_runner_records_errors_and_the_budget():
  runner = gpu._Runner(budget_s=3600)

  def fail():
    raise RuntimeError("boom")

  runner.row("g", "bad", fail)
  runner.row("g", "good", lambda: {"name": "good", "median_s": 1.0, "throughput": 1.0,
                                    "throughput_unit": "seq/s"})
  runner.budget_s = -1.0
  runner.row("g", "late", fail)
  assert [(r["name"], r["status"]) for r in runner.rows] == [
      ("bad", "error"), ("good", "measured"), ("late", "skipped")]
  assert "boom" in runner.rows[0]["reason"] and "budget" in runner.rows[2]["reason"]


@pytest.mark.slow  # ~1.5-2.5 min on 2 shared CPU cores
def test_smoke_run_has_every_section(tmp_path):
  out = str(tmp_path)
  gpu.run(out, smoke=True, budget_s=3600)  # no budget skips: every row must run
  with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
    results = json.load(f)  # strict JSON
  assert results["smoke"] is True and results["datasheet"]["known"] is False
  assert results["peaks"]["flops_per_s"] > 0 and results["peaks"]["bytes_per_s"] > 0
  rows = results["rows"]
  assert {r["group"] for r in rows} == set(gpu.SECTIONS)
  for row in rows:
    if row["status"] == "measured":
      assert row["median_s"] > 0 and row["throughput"] > 0, row["name"]
    else:
      # Only Pallas rows may be missing (skipped if its module does not import,
      # an error if a kernel fails; tests/test_pallas_attention.py tests it).
      assert row["group"] == "attention" and row["name"].startswith("pallas_"), row
      assert row["status"] in ("skipped", "error") and row["reason"], row
  attention = {r["name"] for r in rows if r["group"] == "attention"}
  assert len(attention) == 16 and "xla_additive_bert4rec_L16_fwd+bwd" in attention
  markdown = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "## train_step_x10" in markdown and "## Against the datasheet" in markdown
