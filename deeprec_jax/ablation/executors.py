"""Where the runs of a sweep train: here, in SLURM jobs (submitit) or Ray tasks.

Every executor keeps the runner's guarantees: each run trains in its own
sub-workdir through ``run.run_point`` (so a finished run is skipped and a
failed one recorded with its error), runs that finished before never start a
job, and a job or task that dies without recording itself becomes a
``failed`` row while the others finish. The report reads everything back
from the run directories, so the tables do not depend on the executor.

  executor = executors.SubmititExecutor(folder, SlurmOptions(partition="gpu"))
  run.run_ablation(ablation_config, workdir, executor=executor)

``LocalExecutor`` is ``run.execute`` (in this process or ``parallel`` spawned
processes). submitit and Ray are imported only when their executor is used.
"""

import dataclasses
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from absl import logging

from deeprec_jax.ablation import plan, run

EXECUTORS = ("local", "submitit", "ray")
# Environment variables a job or task inherits from the driver (compilation
# cache, data locations, XLA flags), on top of what the scheduler passes.
_ENV_PREFIXES = ("JAX_", "XLA_", "DEEPREC_", "TF_CPP_")


class Executor(Protocol):
  """Trains the unfinished runs; returns ``run.run_point``'s result per run."""

  def execute(self, runs: Sequence[plan.Run], train_fn: run.TrainFn | None = None,
              train_fns: Sequence[run.TrainFn | None] | None = None
              ) -> list[dict[str, Any]]:
    ...


def forwarded_env() -> dict[str, str]:
  """The driver's variables that a job or task needs to behave the same."""
  return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def run_job(config: Any, workdir: str, info: Mapping[str, Any], train_fn: run.TrainFn | None,
            env: Mapping[str, str], distributed: bool = False) -> dict[str, Any]:
  """The body of one job or task: ``run.run_point`` with the driver's environment.

  Args:
    config: the run's experiment config.
    workdir: its directory.
    info: its point.json fields.
    train_fn: see ``run.run_point``.
    env: from ``forwarded_env``, set before JAX is imported.
    distributed: one run spans several processes (SLURM tasks): each joins
      ``jax.distributed`` (``sharding.initialize_distributed`` with
      ``DEEPREC_DISTRIBUTED=auto``); only process 0 records the run.

  Returns:
    ``run.run_point``'s result (process 0's for a distributed run).
  """
  os.environ.update(env)
  if not distributed:
    return run.run_point(config, workdir, info, train_fn)
  os.environ["DEEPREC_DISTRIBUTED"] = "auto"
  import jax  # noqa: PLC0415  (after the environment is set)

  from deeprec_jax import sharding  # noqa: PLC0415
  sharding.initialize_distributed()
  if jax.process_index() == 0 or plan.run_status(workdir) == "ok":
    return run.run_point(config, workdir, info, train_fn)
  if train_fn is None:
    from deeprec_jax import train  # noqa: PLC0415
    train_fn = train.train_and_evaluate
  train_fn(config, workdir)  # the other processes train; process 0 writes
  return {"status": "ok", "skipped": False, "error": ""}


def _split(runs: Sequence[plan.Run], train_fn: run.TrainFn | None,
           train_fns: Sequence[run.TrainFn | None] | None
           ) -> tuple[list[dict[str, Any] | None], list[int], list[run.TrainFn | None]]:
  """Results of the finished runs (skipped here, no job), the indices still to train."""
  fns = list(train_fns) if train_fns is not None else [train_fn] * len(runs)
  results: list[dict[str, Any] | None] = [None] * len(runs)
  pending = []
  for i, r in enumerate(runs):
    if plan.run_status(r.workdir) == "ok":
      results[i] = run.run_point(r.config, r.workdir, run.run_info(r), fns[i])
      run.log_run_result(r, i, len(runs), results[i])
    else:
      pending.append(i)
  return results, pending, fns


@dataclasses.dataclass
class LocalExecutor:
  """``run.execute``: in this process (``parallel=1``) or a spawned process pool."""
  parallel: int = 1

  def execute(self, runs: Sequence[plan.Run], train_fn: run.TrainFn | None = None,
              train_fns: Sequence[run.TrainFn | None] | None = None
              ) -> list[dict[str, Any]]:
    return run.execute(runs, parallel=self.parallel, train_fn=train_fn, train_fns=train_fns)


@dataclasses.dataclass
class SlurmOptions:
  """Resources of each run's SLURM job (one array task per run).

  Attributes:
    partition: ``--partition``; None = the cluster's default.
    time_min: ``--time`` in minutes (also the local executor's timeout).
    gpus_per_run: GPUs per node of each run's job (``--gpus-per-node``).
    cpus_per_task: ``--cpus-per-task``.
    mem_gb: ``--mem`` in GB per node; None = the partition's default.
    nodes: nodes per run (> 1 only for multi-host runs).
    tasks_per_node: processes per node, one per GPU for multi-host runs;
      each becomes a ``jax.distributed`` process.
    array_parallelism: array tasks running at once (``--array=0-N%P``); the
      local cluster starts this many processes at a time.
    job_name: ``--job-name``.
    sbatch: extra sbatch options, e.g. ``{'account': 'abc', 'qos': 'high'}``.
    setup: shell lines run before the job (``module load ...``, ``source venv``).
  """
  partition: str | None = None
  time_min: int = 60
  gpus_per_run: int = 0
  cpus_per_task: int | None = None
  mem_gb: float | None = None
  nodes: int = 1
  tasks_per_node: int = 1
  array_parallelism: int = 64
  job_name: str = "deeprec"
  sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)
  setup: tuple[str, ...] = ()

  @property
  def distributed(self) -> bool:
    return self.nodes * self.tasks_per_node > 1

  def parameters(self, cluster: str) -> dict[str, Any]:
    """``executor.update_parameters`` keywords for ``cluster`` (slurm | local)."""
    if cluster == "local":
      return {"timeout_min": self.time_min, "gpus_per_node": self.gpus_per_run,
              "tasks_per_node": self.tasks_per_node, "nodes": 1,
              "setup": list(self.setup)}
    params: dict[str, Any] = {
        "job_name": self.job_name, "time": self.time_min, "nodes": self.nodes,
        "ntasks_per_node": self.tasks_per_node, "array_parallelism": self.array_parallelism,
        "setup": list(self.setup),
        # The job runs where the driver runs, so relative data paths match.
        "additional_parameters": {"chdir": os.getcwd(), **self.sbatch}}
    if self.partition:
      params["partition"] = self.partition
    if self.gpus_per_run:
      params["gpus_per_node"] = self.gpus_per_run
    if self.cpus_per_task:
      params["cpus_per_task"] = self.cpus_per_task
    if self.mem_gb:
      params["mem"] = f"{int(self.mem_gb)}GB" if float(self.mem_gb).is_integer() else \
          f"{int(self.mem_gb * 1024)}MB"
    return params


def slurm_options(ablation_config: Any, **flag_values: Any) -> SlurmOptions:
  """SlurmOptions from the config's optional ``slurm`` block, then non-None flags."""
  block = dict((ablation_config.get("slurm") or {}) if ablation_config is not None else {})
  fields = {f.name for f in dataclasses.fields(SlurmOptions)}
  unknown = sorted(set(block) - fields)
  if unknown:
    raise ValueError(f"slurm: unknown option(s) {unknown}; expected some of {sorted(fields)}.")
  block.update({k: v for k, v in flag_values.items() if v is not None})
  if "sbatch" in block:
    block["sbatch"] = dict(block["sbatch"])
  if "setup" in block:
    block["setup"] = tuple(block["setup"])
  return SlurmOptions(**block)


def parse_sbatch(items: Sequence[str]) -> dict[str, str]:
  """['account=abc', 'qos=high', 'exclusive'] -> {'account': 'abc', ...}."""
  options = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not key.strip():
      raise ValueError(f"--slurm_sbatch: expected key=value, got {item!r}.")
    options[key.strip().lstrip("-")] = value.strip() if eq else True
  return options


class SubmititExecutor:
  """Each unfinished run becomes one task of a SLURM job array (submitit).

  ``cluster='local'`` uses submitit's LocalExecutor: real subprocesses from
  the same pickled job as on SLURM, without sbatch (for tests and laptops).
  """

  def __init__(self, folder: str, options: SlurmOptions | None = None,
               cluster: str = "slurm", poll_seconds: float = 1.0):
    if cluster not in ("slurm", "local"):
      raise ValueError(f"submitit cluster must be 'slurm' or 'local', got {cluster!r}.")
    self.folder, self.cluster = os.path.abspath(folder), cluster
    self.options = options or SlurmOptions()
    self.poll_seconds = poll_seconds
    if cluster == "local" and self.options.nodes > 1:
      raise ValueError("submitit's local cluster runs on one node; use nodes=1.")

  def make(self) -> Any:
    """The configured submitit executor (raises off-cluster for 'slurm')."""
    import submitit  # noqa: PLC0415  (optional dependency)
    cls = submitit.SlurmExecutor if self.cluster == "slurm" else submitit.LocalExecutor
    executor = cls(folder=os.path.join(self.folder, "%j"))
    executor.update_parameters(**self.options.parameters(self.cluster))
    return executor

  def sbatch_script(self, num_runs: int) -> str:
    """The sbatch file a ``num_runs``-task array submission writes (needs no SLURM)."""
    from submitit.slurm import slurm  # noqa: PLC0415
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(os.path.join(self.folder, "%j"))])
    params = self.options.parameters("slurm")
    return slurm._make_sbatch_string(command=command, folder=os.path.join(self.folder, "%j"),  # noqa: SLF001
                                     map_count=num_runs if num_runs > 1 else None, **params)

  def submit(self, runs: Sequence[plan.Run], fns: Sequence[run.TrainFn | None],
             executor: Any = None) -> list[Any]:
    """Submits one array (``map_array``) over ``runs``; returns the jobs."""
    executor = executor or self.make()
    env, n = forwarded_env(), len(runs)
    return executor.map_array(run_job, [r.config for r in runs], [r.workdir for r in runs],
                              [run.run_info(r) for r in runs], list(fns), [env] * n,
                              [self.options.distributed] * n)

  def execute(self, runs: Sequence[plan.Run], train_fn: run.TrainFn | None = None,
              train_fns: Sequence[run.TrainFn | None] | None = None
              ) -> list[dict[str, Any]]:
    results, pending, fns = _split(runs, train_fn, train_fns)
    if not pending:
      return results
    executor = self.make()
    # SLURM throttles the array itself (%P); the local cluster starts every
    # job at once, so it gets the array in waves of array_parallelism.
    wave = len(pending) if self.cluster == "slurm" else max(1, self.options.array_parallelism)
    for start in range(0, len(pending), wave):
      chunk = pending[start:start + wave]
      jobs = self.submit([runs[i] for i in chunk], [fns[i] for i in chunk], executor)
      logging.info("submitted %d runs as %s job(s) %s", len(chunk), self.cluster,
                   ", ".join(job.job_id for job in jobs[:4]) + (" ..." if len(jobs) > 4 else ""))
      for i, job in zip(chunk, jobs, strict=True):
        results[i] = self._wait(runs[i], job)
        run.log_run_result(runs[i], i, len(runs), results[i])
    return results

  def _wait(self, r: plan.Run, job: Any) -> dict[str, Any]:
    try:
      return job.result()
    except Exception as e:  # noqa: BLE001  (a job that died: time limit, memory, node)
      lines = [line for line in str(e).splitlines() if line.strip()]
      why = lines[-1] if lines else type(e).__name__
      return run.record_crash(r, f"{self.cluster} job {job.job_id} failed: {why} "
                                 f"(logs: {job.paths.stderr})")


@dataclasses.dataclass
class RayOptions:
  """Resources of each run's Ray task.

  Attributes:
    address: a running cluster ('auto', 'ray://host:10001'); None starts a
      local instance for this sweep (or uses the one ``ray.init`` started).
    cpus_per_run: ``num_cpus`` of each task (also how many run at once).
    gpus_per_run: ``num_gpus`` of each task.
    resources: custom resources per task, e.g. ``{'TPU': 4}``.
    num_cpus: CPUs of a local instance this executor starts (None = all).
    niceness: of the workers of a local instance it starts (Ray's default 15
      starves training on a busy machine).
  """
  address: str | None = None
  cpus_per_run: float = 1.0
  gpus_per_run: float = 0.0
  resources: dict[str, float] = dataclasses.field(default_factory=dict)
  num_cpus: int | None = None
  niceness: int = 0


class RayExecutor:
  """Each unfinished run is one Ray task in a fresh worker process (``max_calls=1``)."""

  def __init__(self, options: RayOptions | None = None):
    self.options = options or RayOptions()

  def execute(self, runs: Sequence[plan.Run], train_fn: run.TrainFn | None = None,
              train_fns: Sequence[run.TrainFn | None] | None = None
              ) -> list[dict[str, Any]]:
    results, pending, fns = _split(runs, train_fn, train_fns)
    if not pending:
      return results
    import ray  # noqa: PLC0415  (optional dependency)
    started = not ray.is_initialized()
    if started:
      # Ray starts workers at nice 15; runs should compete like local ones do.
      os.environ.setdefault("RAY_worker_niceness", str(self.options.niceness))
      ray.init(address=self.options.address, num_cpus=self.options.num_cpus,
               include_dashboard=False, log_to_driver=False)
    try:
      task = ray.remote(max_calls=1, max_retries=0)(run_job).options(
          num_cpus=self.options.cpus_per_run, num_gpus=self.options.gpus_per_run,
          resources=dict(self.options.resources) or None)
      env = forwarded_env()
      refs = {task.remote(runs[i].config, runs[i].workdir, run.run_info(runs[i]), fns[i], env):
              i for i in pending}
      remaining = list(refs)
      while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        i = refs[done[0]]
        try:
          results[i] = ray.get(done[0])
        except Exception as e:  # noqa: BLE001  (a worker that died)
          first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
          results[i] = run.record_crash(runs[i], f"ray task failed: {first}")
        run.log_run_result(runs[i], i, len(runs), results[i])
    finally:
      if started:
        ray.shutdown()
    return results


def make_executor(kind: str, *, workdir: str, parallel: int = 1,
                  slurm: SlurmOptions | None = None, submitit_cluster: str = "slurm",
                  submitit_folder: str | None = None, ray_options: RayOptions | None = None
                  ) -> Executor:
  """The executor named ``kind`` (local | submitit | ray)."""
  if kind == "local":
    return LocalExecutor(parallel)
  if kind == "submitit":
    return SubmititExecutor(submitit_folder or os.path.join(workdir, "submitit"), slurm,
                            submitit_cluster)
  if kind == "ray":
    return RayExecutor(ray_options)
  raise ValueError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}.")


def define_flags() -> None:
  """The executor flags shared by experiments.ablate and experiments.search."""
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_enum("executor", "local", list(EXECUTORS), "Where runs train: local (this "
                    "process or --parallel processes), submitit (SLURM jobs) or ray (tasks).")
  flags.DEFINE_integer("parallel", 1, "local: runs trained at once in subprocesses "
                       "(1 = one after another in this process).", lower_bound=1)
  flags.DEFINE_enum("submitit_cluster", "slurm", ["slurm", "local"], "submitit: sbatch jobs, "
                    "or submitit's LocalExecutor (subprocesses, no SLURM).")
  flags.DEFINE_string("submitit_folder", None, "submitit: job files and logs "
                      "(default <workdir>/submitit; must be on a shared filesystem).")
  flags.DEFINE_string("slurm_partition", None, "SLURM --partition.")
  flags.DEFINE_integer("slurm_time_min", None, "SLURM --time per run, minutes (default 60).")
  flags.DEFINE_integer("slurm_gpus_per_run", None, "GPUs per node of each run's job.")
  flags.DEFINE_integer("slurm_cpus_per_task", None, "SLURM --cpus-per-task.")
  flags.DEFINE_float("slurm_mem_gb", None, "SLURM --mem per node, GB.")
  flags.DEFINE_integer("slurm_nodes", None, "Nodes per run (multi-host runs; docs/sweeps.md).")
  flags.DEFINE_integer("slurm_tasks_per_node", None, "Processes per node (one per GPU for "
                       "multi-host runs), each a jax.distributed process.")
  flags.DEFINE_integer("slurm_array_parallelism", None, "Array tasks running at once.")
  flags.DEFINE_multi_string("slurm_sbatch", [], "Extra sbatch option key=value (repeatable), "
                            "e.g. --slurm_sbatch=account=abc --slurm_sbatch=qos=high.")
  flags.DEFINE_multi_string("slurm_setup", [], "Shell line run before each job (repeatable).")
  flags.DEFINE_bool("slurm_print_script", False, "Print the sbatch script the submission "
                    "would use and exit (nothing is submitted).")
  flags.DEFINE_string("ray_address", None, "ray: cluster address ('auto', ray://host:10001); "
                      "unset = start a local instance.")
  flags.DEFINE_float("ray_cpus_per_run", 1.0, "ray: CPUs per task.")
  flags.DEFINE_float("ray_gpus_per_run", 0.0, "ray: GPUs per task.")
  flags.DEFINE_integer("ray_num_cpus", None, "ray: CPUs of the local instance (default all).")


def from_flags(workdir: str, ablation_config: Any = None) -> Executor:
  """The executor the flags of ``define_flags`` describe."""
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  slurm = slurm_options(
      ablation_config, partition=f.slurm_partition, time_min=f.slurm_time_min,
      gpus_per_run=f.slurm_gpus_per_run, cpus_per_task=f.slurm_cpus_per_task,
      mem_gb=f.slurm_mem_gb, nodes=f.slurm_nodes, tasks_per_node=f.slurm_tasks_per_node,
      array_parallelism=f.slurm_array_parallelism)
  if f.slurm_sbatch:
    slurm.sbatch.update(parse_sbatch(f.slurm_sbatch))
  if f.slurm_setup:
    slurm.setup = (*slurm.setup, *f.slurm_setup)
  ray_options = RayOptions(address=f.ray_address, cpus_per_run=f.ray_cpus_per_run,
                           gpus_per_run=f.ray_gpus_per_run, num_cpus=f.ray_num_cpus)
  return make_executor(f.executor, workdir=workdir, parallel=f.parallel, slurm=slurm,
                       submitit_cluster=f.submitit_cluster, submitit_folder=f.submitit_folder,
                       ray_options=ray_options)
