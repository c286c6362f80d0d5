r"""Hyperparameter search with Optuna; the best config then trained with seeds.

  python -m experiments.search --config=experiments/configs/sasrec.py:ml-100k \
      --space=experiments/configs/ablations/search_sasrec.py \
      --workdir=/tmp/search_sasrec --trials=12

Each trial trains in <workdir>/trials/trial_<n>; the objective is the space's
validation metric (never a test metric) and the median pruner stops a trial
at a validation evaluation. The study lives in --storage (default
sqlite:///<workdir>/study.db), so rerunning the same command resumes a killed
search: running trials are finished from their checkpoints, then new ones
asked for until --trials. Finally the best trial's config is trained with the
space's final_seeds in <workdir>/final (results.csv, table.md/.tex: the only
test metrics), and <workdir>/search.md states the budget and every trial.
Trials go through the same executors as experiments.ablate
(--executor=local|submitit|ray, see docs/sweeps.md).
"""

from absl import flags

from deeprec_jax.ablation import executors, search
from experiments import cli

_CONFIG = flags.DEFINE_string("config", None, "Base experiment config file[:dataset].",
                              required=True)
cli.define_config_file("space", None, "Search-space file (experiments/configs/ablations/"
                       "search_*.py); --space.<key>=value overrides it.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Search directory: study.db, trials/, final/.",
                               required=True)
_TRIALS = flags.DEFINE_integer("trials", None, "Total trials of the study (a rerun continues "
                               "up to this number).", lower_bound=1, required=True)
_STORAGE = flags.DEFINE_string("storage", None, "SQLAlchemy URL of the Optuna storage "
                               "(default sqlite:///<workdir>/study.db).")
_STUDY = flags.DEFINE_string("study_name", "search", "Study name in the storage.")
_CONCURRENT = flags.DEFINE_integer("concurrent_trials", 1, "Trials asked for and trained at "
                                   "once (set it to the executor's parallelism).", lower_bound=1)
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Persistent JAX compilation cache in "
                           "<workdir>/jax_cache.")
flags.mark_flags_as_required(["space"])
executors.define_flags()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
  workdir = _WORKDIR.value
  if _CACHE.value:
    import os  # noqa: PLC0415

    from deeprec_jax.ablation import run  # noqa: PLC0415
    os.makedirs(workdir, exist_ok=True)
    run.use_compilation_cache(os.path.join(workdir, "jax_cache"))
  executor = executors.from_flags(workdir, flags.FLAGS.space)
  outcome = search.run_search(_CONFIG.value, flags.FLAGS.space, workdir, _TRIALS.value,
                              executor=executor, storage=_STORAGE.value,
                              study_name=_STUDY.value, concurrent=_CONCURRENT.value)
  print(outcome.text)


if __name__ == "__main__":
  cli.run(main)
