"""Copies a sweep's report and its finished runs' small files into a results folder.

``results/<sweep>/`` is what a repository commits of a sweep: the tables and
plots ``report.write_report`` wrote, and per finished run
``runs/<run>/{config,final_metrics,point,status,train_time}.json`` and
``metrics.jsonl``; never checkpoints or event files. Files already in the
destination that this sweep does not write (e.g. superseded runs kept
beside it) are left alone. Nothing here needs JAX.
"""

import os
import shutil
from collections.abc import Sequence

from deeprec_jax.ablation import plan

# The report's files, as report.write_report names them.
REPORT_FILES = ("results.csv", "table.md", "table.tex")
# A finished run's files worth keeping (small; the checkpoints are not).
RUN_FILES = ("config.json", plan.FINAL_METRICS, "metrics.jsonl", plan.POINT_FILE,
             plan.STATUS_FILE, plan.TRAIN_TIME_FILE)


def publish(workdir: str, run_dirs: Sequence[str], dest: str) -> list[str]:
  """Copies the report in ``workdir`` and the finished runs among ``run_dirs`` to ``dest``.

  Args:
    workdir: the sweep's directory, after ``report.write_report``.
    run_dirs: the planned runs' directories (``plan.plan_runs``); only those
      with status 'ok' are copied, to ``dest/runs/<basename>/``.
    dest: the results folder (created if missing).

  Returns:
    The paths written, relative to ``dest``, sorted.

  Raises:
    FileNotFoundError: ``workdir`` has no report (``table.md``) yet.
  """
  if not os.path.exists(os.path.join(workdir, "table.md")):
    raise FileNotFoundError(f"{workdir}/table.md: no report to publish yet (run the sweep or "
                            "--report_only first).")
  if os.path.abspath(dest) == os.path.abspath(workdir):
    raise ValueError(f"--results_dir={dest}: must differ from the sweep's --workdir.")
  written = []

  def copy(src: str, rel: str) -> None:
    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
    shutil.copyfile(src, os.path.join(dest, rel))
    written.append(rel)

  for name in REPORT_FILES:
    if os.path.exists(os.path.join(workdir, name)):
      copy(os.path.join(workdir, name), name)
  plots = os.path.join(workdir, "plots")
  if os.path.isdir(plots):
    for name in sorted(os.listdir(plots)):
      if name.endswith(".png"):
        copy(os.path.join(plots, name), os.path.join("plots", name))
  for run_dir in run_dirs:
    if plan.run_status(run_dir) != "ok":
      continue
    for name in RUN_FILES:
      if os.path.exists(os.path.join(run_dir, name)):
        copy(os.path.join(run_dir, name), os.path.join("runs", os.path.basename(run_dir), name))
  return sorted(written)
