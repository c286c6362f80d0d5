"""Paper-style ablations: sweeps of configs x seeds, then tables and plots.

An ablation config (``experiments/configs/ablations/*.py``) names a ``base``
experiment config, the keys to vary (a grid of ``axes`` or explicit
``points``), the ``seeds`` and the ``metrics`` to report. One module a step:

  runs = plan.plan_runs(ablation_config, workdir)  # plan: configs -> runs, validated
  run.execute(runs, parallel=2)                    # run: trains them, skips finished ones
  rows = report.collect_results(workdir, "test", [r.workdir for r in runs])
  report.write_report(ablation_config, workdir, rows)  # report: csv, md, tex, png

``run.run_ablation`` does all three. ``executors`` trains the runs elsewhere
(SLURM jobs through submitit, Ray tasks) with the same guarantees, and
``search`` runs an Optuna search whose trials go through the same executors
(docs/sweeps.md).
"""
