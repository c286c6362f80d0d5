r"""Runs a paper-style ablation: points x seeds, then tables and plots.

  python -m experiments.ablate \
      --config=experiments/configs/ablations/attention.py:ml-100k \
      --workdir=/tmp/ablate_attention --parallel=2

Writes results.csv, table.md, table.tex and plots/*.png to --workdir and
prints the markdown table; exits with status 1 if any run failed (its row and
runs/<run>/error.txt say why). Rerunning with the same --workdir trains only
the runs that have not finished. --results_dir=results/<sweep> then copies the
tables, plots and each finished run's small files (config, metrics; no
checkpoints) there, the folder a repository commits. --dry_run lists the runs without training.
--config.overrides.train.num_epochs=1 (any key under overrides) applies to
every point; --config.seeds='(0,)' narrows the seeds.

--executor=submitit submits the unfinished runs as one SLURM job array
(--slurm_partition, --slurm_time_min, --slurm_gpus_per_run, --slurm_mem_gb,
--slurm_sbatch=key=value, or the ablation config's optional `slurm` block;
--submitit_cluster=local runs the same jobs as local subprocesses);
--executor=ray sends each run as a Ray task (--ray_address). See
docs/sweeps.md.
"""

import sys

from absl import app, flags

from deeprec_jax.ablation import executors, publish, run
from experiments import cli

cli.define_config_file("config", None, "Ablation config file[:dataset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: runs/, results, tables, plots.",
                               required=True)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and their workdirs; train nothing.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Train nothing; write the table of the "
                                 "runs finished so far (the others are 'todo').")
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", None, "Copy the report and the finished runs' config and metrics files "
    "here (e.g. results/<sweep>; see deeprec_jax/ablation/publish.py).")
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Persistent JAX compilation cache in "
                           "<workdir>/jax_cache, so the seeds of a point compile once.")
flags.mark_flags_as_required(["config"])
executors.define_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = flags.FLAGS.config, _WORKDIR.value
  executor = executors.from_flags(workdir, config)
  if flags.FLAGS.slurm_print_script:
    if not isinstance(executor, executors.SubmititExecutor):
      raise ValueError("--slurm_print_script needs --executor=submitit.")
    runs = run.plan.plan_runs(config, workdir)
    print(executor.sbatch_script(sum(run.plan.run_status(r.workdir) != "ok" for r in runs)))
    return
  outcome = run.run_ablation(config, workdir, parallel=flags.FLAGS.parallel,
                             dry_run=_DRY_RUN.value, report_only=_REPORT_ONLY.value,
                             compilation_cache=_CACHE.value,
                             executor=None if flags.FLAGS.executor == "local" else executor)
  print(outcome.text)
  if _RESULTS_DIR.value and not _DRY_RUN.value:
    # The rows name every planned run's directory: no second planning pass.
    written = publish.publish(workdir, [row["workdir"] for row in outcome.rows],
                              _RESULTS_DIR.value)
    print(f"{len(written)} files copied to {_RESULTS_DIR.value}")
  failed = [row for row in outcome.rows if row["status"] not in ("ok", "todo")]
  if failed:
    sys.exit(f"{len(failed)} of {len(outcome.rows)} runs failed, e.g. {failed[0]['label']!r}: "
             f"{failed[0]['error']}")


if __name__ == "__main__":
  cli.run(main)
