r"""Times the XLA-compiled kernels and train steps against this device's own peaks.

Usage:

  python -m benchmarks.run --out=/tmp/bench [--quick] \
      [--only=attention,rnn,caser,scoring,train_step,eval,breakdown,variants,scaling,peaks] \
      [--profile_dir=/tmp/bench/trace] [--repeats=N]

Writes ``<out>/results.json`` (every figure, the environment and a summary
against the targets) and ``<out>/results.md`` (one Markdown table per group).
See benchmarks/README.md for what each column means.
"""

from collections.abc import Sequence

from absl import app, flags, logging

from benchmarks import environment as env_info
from benchmarks import groups, harness, report

_OUT = flags.DEFINE_string("out", None, "Directory for results.json and results.md.",
                           required=True)
_QUICK = flags.DEFINE_bool("quick", False,
                           "Smallest size of every kernel and few repeats (~3 min on 2 cores).")
_ONLY = flags.DEFINE_list("only", [],
                          f"Groups to run (default all): {', '.join(groups.ALL_GROUPS)}.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None,
                                   "Write a jax.profiler trace of each timed region here.")
_REPEATS = flags.DEFINE_integer("repeats", 0,
                                "Timed samples per kernel (0: 10, or 3 with --quick).")


def run(out: str, *, quick: bool = False, only: Sequence[str] = (), repeats: int = 0,
        profile_dir: str | None = None) -> dict:
  """Runs the selected groups and writes the results; returns them."""
  unknown = sorted(set(only) - set(groups.ALL_GROUPS))
  if unknown:
    raise ValueError(f"--only: unknown group(s) {', '.join(unknown)}; expected some of "
                     f"{', '.join(groups.ALL_GROUPS)}.")
  selected = [g for g in groups.ALL_GROUPS if not only or g in only]
  repeats = repeats or (3 if quick else 10)
  environment = env_info.collect()
  environment["load_average_start"] = environment.pop("load_average")
  harness.set_profile_dir(profile_dir)
  try:
    peaks, rows = harness.measure_peaks(quick, repeats)
    if "peaks" not in selected:
      rows = []
    for group in selected:
      if group == "peaks":
        continue
      logging.info("benchmark group %s", group)
      group_rows = groups.GROUPS[group](quick, repeats, peaks)
      for row in group_rows:
        logging.info("%s/%s: %s", row["group"], row["name"],
                     row.get("error") or f"{row['median_s'] * 1e3:.2f} ms, "
                     f"{row['throughput']:.1f} {row['throughput_unit']}")
      rows += group_rows
  finally:
    harness.set_profile_dir(None)
  environment["load_average_end"] = env_info.load_average()
  results = {
      "schema_version": 1,
      "quick": quick,
      "repeats": repeats,
      "groups": selected,
      "environment": environment,
      "peaks": {"flops_per_s": peaks.flops_per_s, "bytes_per_s": peaks.bytes_per_s},
      "rows": rows,
  }
  results["summary"] = report.summary(rows)
  json_path, md_path = report.write(out, results)
  logging.info("wrote %s and %s", json_path, md_path)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(_OUT.value, quick=_QUICK.value, only=_ONLY.value, repeats=_REPEATS.value,
      profile_dir=_PROFILE_DIR.value)


if __name__ == "__main__":
  app.run(main)
