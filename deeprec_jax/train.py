"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

The loop is deliberately flat: build data, model, optimizer and mesh; restore
the latest checkpoint if the workdir has one; then alternate jitted train
steps with evaluations, checkpointing after each evaluation. Everything random
is a pure function of ``config.seed`` and the step, so a resumed run computes
exactly what an uninterrupted one would.
"""

import collections
import concurrent.futures
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from deeprec_jax import (
  checkpoints,
  evaluate,
  losses,
  models,
  optimizers,
  row_sparse,
  run_config,
  sharding,
  writers,
)
from deeprec_jax import privacy as privacy_lib
from deeprec_jax import workdir as workdir_lib
from deeprec_jax.data import builders, cold_start, negatives, packing, pipeline
from deeprec_jax.data import images as images_lib
from deeprec_jax.models import validation

State = dict[str, Any]  # {'params', 'opt_state', 'step', 'rng'}
# Implementation of the dropout key. Masks are drawn by layers.Dropout (16-bit
# Threefry draws), which reads only two words from this key, so the choice
# costs nothing; 'rbg' keeps the key shape of existing checkpoints.
DROPOUT_RNG_IMPL = "rbg"
NEGATIVE_SAMPLING = ("uniform", "popularity", "in_batch")
# Evaluation batches are built once per split and kept (host memory) up to this
# many users: ~2 s of host work per ML-1M pass, ~60 MB.
_CACHED_EVAL_USERS = 200_000
# ... and kept across the Trainers of one process (an ablation's runs) for this
# many (dataset, split, settings) keys, most recent first.
_SHARED_EVAL_BATCHES: collections.OrderedDict[tuple, list] = collections.OrderedDict()
_SHARED_EVAL_KEYS = 4
# Beside final_metrics.json: the training loop's wall time over all resumes.
TRAIN_TIME_FILE = "train_time.json"


def make_train_step(model: nn.Module,
                    tx: optax.GradientTransformation | row_sparse.SparseOptimizer, *, loss: str,
                    num_items: int, temperature: float = 1.0, gbce_t: float = 0.75,
                    label_smoothing: float = 0.0, images: Any = None,
                    log_q: Any = None, log_k_offset: bool = False
                    ) -> Callable[[State, dict], tuple[State, dict]]:
  """Returns ``train_step(state, batch, images=None) -> (state, {'loss', 'grad_norm'})``.

  Dropout's RNG is ``fold_in(state['rng'], step)``, computed inside the step,
  so it depends on the step alone, not on how the run was split or resumed.
  The item pictures ``images`` (``uint8[N + 1, H, W, 3]``, image encoders
  only) are the step's third argument; ``make_train_step(images=)`` is the
  value used when the step is called without it (a constant of the compiled
  program, so the trainer passes them as an argument: a large catalogue's
  pictures then stay out of the HLO and the compilation cache). Each step
  encodes the pictures of the items its batch names (inputs, targets,
  negatives; ``models.item_vectors(ids=)``), or the whole catalogue for the
  full softmax, which scores every item. With a
  ``row_sparse.SparseOptimizer`` the model and loss run on the batch's rows
  of the item table only (``row_sparse.localize``), and only those rows change.
  ``log_q`` (``float[N + 1]``, ``sampled_softmax`` only) is the negative
  sampler's log-probability per item, subtracted from every logit (logQ).
  ``log_k_offset``: bce/gbce score ``s - log k`` (``losses.bce_sampled``).
  """
  loss_fn = losses.loss_fn(loss, temperature=temperature, gbce_t=gbce_t, num_items=num_items,
                           label_smoothing=label_smoothing, log_k_offset=log_k_offset)
  uses_images = models.item_encoder(model) != "id"
  default_images = jnp.asarray(images) if uses_images and images is not None else None
  sparse = isinstance(tx, row_sparse.SparseOptimizer)
  # Sampled losses score the batch's items only: encode just their pictures.
  # Not for BERT4Rec: renumbering the batch would hide its [mask] token (N + 1).
  tower_on_batch = (uses_images and loss != "softmax"
                    and getattr(model, "mask_token", None) is None)
  if sparse and getattr(model, "output_table", False):
    raise ValueError("config key train.item_optimizer: row-sparse updates cover the input "
                     "table only; model.output_table needs train.item_optimizer='dense'.")
  if sparse and uses_images:
    raise ValueError("config key train.item_optimizer: row-sparse updates need "
                     "model.item_encoder='id'; image encoders score every item through "
                     "the tower. Use train.item_optimizer='dense'.")

  def train_step(state: State, batch: dict[str, jax.Array],
                 images: jax.Array | None = None) -> tuple[State, dict]:
    if images is None:
      images = default_images
    if not uses_images:
      images = None
    dropout_rng = jax.random.fold_in(
        jax.random.wrap_key_data(state["rng"], impl=DROPOUT_RNG_IMPL), state["step"])

    def objective(params, batch, ids=None):
      vectors = models.item_vectors(model, params, num_items, images,
                                    rng=jax.random.fold_in(dropout_rng, 1), ids=ids)
      inputs = {"item_vectors": vectors} if uses_images else {}
      hidden = model.apply({"params": params}, batch["item_seq"], user=batch["user"],
                           deterministic=False, rngs={"dropout": dropout_rng},
                           **packing.packing_kwargs(batch), **packing.time_kwargs(batch),
                           **inputs)
      extra = {}
      if log_q is not None:  # indexed like the (possibly renumbered) batch
        extra["log_q"] = (jnp.asarray(log_q) if ids is None else
                          jnp.take(jnp.asarray(log_q), ids, mode="fill", fill_value=0.0))
      return loss_fn(hidden, vectors, batch["targets"], batch["negatives"], **extra)

    if sparse:
      rest, table = row_sparse.split_table(state["params"])
      ids, local = row_sparse.localize(batch, table.shape[0], all_rows=loss == "softmax")
      value, (rest_grads, row_grads) = jax.value_and_grad(
          lambda rest, rows: objective(row_sparse.join_table(rest, rows), local, ids),
          argnums=(0, 1))(rest, row_sparse.gather(table, ids))
      params, opt_state = tx.apply(state["params"], state["opt_state"], rest_grads, ids,
                                   row_grads)
      grad_norm = optax.global_norm((rest_grads, row_grads))
    else:
      # With pictures, the tower encodes those of the batch's items only.
      ids, inputs = (row_sparse.localize(batch, num_items + 1) if tower_on_batch
                     else (None, batch))
      value, grads = jax.value_and_grad(objective)(state["params"], inputs, ids)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      grad_norm = optax.global_norm(grads)
    new_state = dict(params=params, opt_state=opt_state, step=state["step"] + 1,
                     rng=state["rng"])
    return new_state, {"loss": value, "grad_norm": grad_norm}

  return train_step


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves))


class Trainer:
  """The pieces of one run that both training and evaluation need."""

  def __init__(self, config: ml_collections.ConfigDict, dataset: builders.Dataset):
    self.config = config
    # Cold-start items leave training here (data/cold_start.py); pictures
    # (data/images.py) only for models whose item encoder reads them.
    dataset = cold_start.split(dataset, config.data.get("cold_start_fraction", 0.0), config.seed,
                               task=models.spec(config.model.name).task)
    self.images = images_lib.for_model(config, dataset)
    self.dataset = dataset
    self.spec = models.spec(config.model.name)
    self.task = self.spec.task
    self.model = models.create_model(config.model, num_items=dataset.num_items,
                                     num_users=dataset.num_users, max_len=config.data.max_len)
    validation.validate_task(config.task)
    self.mesh = sharding.make_mesh(config.train.num_devices, config.train.model_parallel)
    self._eval_cache: dict[str, list[dict[str, np.ndarray]]] = {}
    self._eval_pending: dict[str, concurrent.futures.Future] = {}  # prefetch_eval
    # Several users per row (packing.pack_batch) where the model supports it.
    self.pack = bool(config.train.pack and self.spec.packs)
    if self.is_trainable:
      sharding.check_batch_size(config.train.batch_size, self.mesh, "train.batch_size")
      self.steps_per_epoch = pipeline.steps_per_epoch(
          dataset, task=self.task, global_batch_size=config.train.batch_size,
          max_len=config.data.max_len, num_targets=config.task.num_targets)
      self.total_steps = config.train.num_steps or self.steps_per_epoch * config.train.num_epochs
    else:
      self.steps_per_epoch, self.total_steps = 1, 0
    if config.privacy.enabled and config.train.get("label_smoothing", 0.0):
      raise ValueError("config key train.label_smoothing must be 0 under privacy.enabled (the "
                       "private step's per-user losses do not smooth).")
    # DP-SGD (privacy.py): never packed, its own sampling, step and accounting.
    self.privacy = (privacy_lib.Plan(config, dataset, self.spec, self.mesh,
                                     total_steps=self.total_steps)
                    if config.privacy.enabled else None)
    self.pack = self.pack and not self.privacy
    # One negative set per sequence needs one sequence per row.
    self.shared_negatives = bool(config.train.get("shared_negatives", False))
    self.pack = self.pack and not self.shared_negatives
    self.negative_cdf, self.log_q = self._negative_sampler()
    self.in_batch_negatives = (self.is_trainable and self.config.train.get(
        "negative_sampling", "uniform") == "in_batch")
    # Batches carry timestamps for models whose attention reads them (HSTU's time bias).
    self.with_times = models.uses_timestamps(self.model)
    if self.with_times and self.privacy:
      raise ValueError("config key model.time_buckets must be 0 under privacy.enabled (the "
                       "private step's batches carry no timestamps).")
    sharding.check_batch_size(config.eval.batch_size, self.mesh, "eval.batch_size")
    self.tx = optimizers.create_optimizer(config.train, max(self.total_steps, 1), self.mesh)
    if self.privacy and isinstance(self.tx, row_sparse.SparseOptimizer):
      raise ValueError("config key train.item_optimizer must be 'dense' under privacy.enabled: "
                       "DP-SGD's noise reaches every row of the table.")
    eval_step = evaluate.make_eval_step(self.model, dataset.num_items, tuple(config.eval.ks),
                                        exclude_history=config.eval.exclude_history,
                                        cold_items=dataset.withheld_items)
    self._eval_step = jax.jit(
        eval_step,
        # None: params (and item vectors) keep the shardings they come with.
        in_shardings=(None, sharding.batch_sharding(self.mesh))
        + ((None,) if self.images is not None else ()),
        out_shardings=sharding.replicated(self.mesh))
    # The catalogue's vectors, once per evaluation (image encoders only).
    self._item_vectors = jax.jit(functools.partial(
        models.item_vectors, self.model, num_items=dataset.num_items,
        chunk_size=evaluate.ENCODE_CHUNK))

  @property
  def is_trainable(self) -> bool:
    return self.spec.trainable

  def _negative_sampler(self) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(cdf, log_q)`` of ``train.negative_sampling='popularity'``; ``(None, None)`` if uniform.

    ``log_q`` is for the sampled softmax only (``negatives.popularity_log_q``).
    'in_batch' has no cdf (the pipeline draws from each batch's items) and the
    same ``log_q``: an item's share of the training items is its expected
    share of a batch (Yi et al., RecSys 2019, estimate it from streaming counts).
    """
    sampling = self.config.train.get("negative_sampling", "uniform")
    if sampling not in NEGATIVE_SAMPLING:
      raise ValueError(f"config key train.negative_sampling={sampling!r}; expected one of "
                       f"{', '.join(NEGATIVE_SAMPLING)}.")
    if sampling == "uniform" or not self.is_trainable:
      return None, None
    if self.privacy:
      raise ValueError("config key train.negative_sampling must be 'uniform' under "
                       "privacy.enabled (the private pipeline draws uniform negatives).")
    counts = pipeline.train_item_counts(self.dataset)
    log_q = (negatives.popularity_log_q(counts)
             if self.config.train.loss == "sampled_softmax" else None)
    cdf = None if sampling == "in_batch" else np.cumsum(counts, dtype=np.float64)
    return cdf, log_q

  def _init_params(self, rng: jax.Array) -> Any:
    item_seq = jnp.zeros((1, self.config.data.max_len), jnp.int32)
    params = models.init_params(self.model, rng, item_seq, user=jnp.zeros((1,), jnp.int32),
                                images=self.images)
    if models.item_encoder(self.model) == "id+image" and self.dataset.withheld_items is not None:
      params = cold_start.zero_table_rows(params, self.dataset.withheld_items)
    return params

  def init_state(self) -> State:
    """Fresh (or fitted) parameters and optimizer state, placed by ``sharding.param_shardings``."""
    init_rng, train_seed = jax.random.split(jax.random.PRNGKey(self.config.seed))
    # Raw key data (uint32), so that Orbax saves it like any other array.
    train_rng = jax.random.key_data(jax.random.key(
        jax.random.randint(train_seed, (), 0, 2**31 - 1), impl=DROPOUT_RNG_IMPL))
    if self.is_trainable:
      params = self._init_params(init_rng)
    else:
      params = self.spec.fit(pipeline.train_item_counts(self.dataset))
    state = dict(params=params, opt_state=self.tx.init(params), step=jnp.int32(0),
                 rng=train_rng)
    return sharding.shard(state, self.mesh)

  def train_batches(self, epoch: int):
    if self.privacy and self.privacy.sampler:  # Poisson-sampled users
      return self.privacy.train_batches(epoch, self.steps_per_epoch)
    block, num_blocks = sharding.batch_block(self.mesh)  # This process's rows.
    # Packed rows split evenly over the data-parallel devices; a multiple of 8
    # keeps the number of distinct shapes (compilations) small.
    pack_row_multiple = math.lcm(8, self.mesh.shape[sharding.DATA_AXIS]) if self.pack else 0
    return pipeline.train_batches(
        self.dataset, task=self.task, max_len=self.config.data.max_len,
        global_batch_size=self.config.train.batch_size,
        num_negatives=self.config.train.num_negatives,
        seed=self.config.seed, epoch=epoch, num_targets=self.config.task.num_targets,
        mask_prob=self.config.task.mask_prob, pack_row_multiple=pack_row_multiple,
        process_index=block, process_count=num_blocks, negative_cdf=self.negative_cdf,
        shared_negatives=self.shared_negatives, in_batch_negatives=self.in_batch_negatives,
        with_times=self.with_times)

  def item_vectors(self, params: Any) -> jax.Array | None:
    """The catalogue's ``models.item_vectors`` for image encoders, once; None for 'id'."""
    return None if self.images is None else self._item_vectors(params, images=self.images)

  def evaluate(self, params: Any, split: str) -> dict[str, float]:
    """Full-ranking (and sampled) metrics of ``params`` on ``split`` (valid or test)."""
    batches = writers.progress(self._cached_eval_batches(split), f"evaluate {split}",
                               enabled=jax.process_index() == 0)
    vectors = self.item_vectors(params)
    return evaluate.evaluate(self._eval_step, params,
                             (sharding.to_global(b, self.mesh) for b in batches),
                             item_vectors=vectors)

  def prefetch_eval(self, split: str) -> None:
    """Starts building ``split``'s evaluation batches in a background thread.

    The training loop calls it before its first step, so that the first
    evaluation finds them built (~2 s of host work on ML-1M) instead of
    building them then. The batches are the ones ``evaluate`` would build.
    """
    if (split in self._eval_cache or split in self._eval_pending
        or self.dataset.num_users > _CACHED_EVAL_USERS):
      return
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch_eval")
    self._eval_pending[split] = executor.submit(self._build_eval_batches, split)
    executor.shutdown(wait=False)  # its one thread ends with the task

  def _cached_eval_batches(self, split: str) -> Any:
    """``split``'s batches: kept (per Trainer and per process) if the users are few."""
    pending = self._eval_pending.pop(split, None)
    return pending.result() if pending is not None else self._build_eval_batches(split)

  def _build_eval_batches(self, split: str) -> Any:
    batches = self._eval_cache.get(split)
    if batches is not None:
      return batches
    key = self._eval_key(split)
    batches = _SHARED_EVAL_BATCHES.get(key) if key else None
    if batches is None:
      batches = self._eval_batches(split)
    # The batches are the same at every evaluation: keep them if they are small.
    if self.dataset.num_users <= _CACHED_EVAL_USERS:
      batches = self._eval_cache[split] = list(batches)
      if key:
        _SHARED_EVAL_BATCHES[key] = batches
        _SHARED_EVAL_BATCHES.move_to_end(key, last=False)
        while len(_SHARED_EVAL_BATCHES) > _SHARED_EVAL_KEYS:
          _SHARED_EVAL_BATCHES.popitem()
    return batches

  def _eval_key(self, split: str) -> tuple | None:
    """What ``_eval_batches(split)`` depends on, for data loaded from TFDS; else None.

    TFDS names carry a hash of the data config. In-memory datasets
    (``from_sequences``) have no such name, so they are never shared.
    """
    data = self.dataset
    if isinstance(data.source, (list, tuple)) or data.lengths is None:
      return None
    withheld = None if data.withheld_items is None else data.withheld_items.tobytes()
    return (data.name, data.num_users, data.num_items, data.lengths.tobytes(), withheld, split,
            self.task, self.config.data.max_len, self.config.eval.batch_size,
            self.config.eval.num_sampled_negatives, self.config.eval.sampling, self.config.seed,
            self.config.eval.length_buckets, sharding.batch_block(self.mesh), self.with_times)

  def _eval_batches(self, split: str):
    block, num_blocks = sharding.batch_block(self.mesh)
    return pipeline.eval_batches(
        self.dataset, split=split, task=self.task, max_len=self.config.data.max_len,
        batch_size=self.config.eval.batch_size // num_blocks,
        num_sampled_negatives=self.config.eval.num_sampled_negatives,
        sampling=self.config.eval.sampling, seed=self.config.seed,
        length_buckets=self.config.eval.length_buckets,
        process_index=block, process_count=num_blocks, with_times=self.with_times)



def _abstract(state: State) -> State:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def restore_state(trainer: Trainer, manager, step: int) -> tuple[State, dict[str, Any]]:
  """Restores ``(state, record)`` at ``step`` in ``trainer``'s layout and shardings."""
  return checkpoints.restore(manager, step, _abstract(trainer.init_state()))


def restore_best(trainer: Trainer, manager) -> tuple[int, State]:
  """``(step, state)`` of the best intact checkpoint (the next best if it is damaged)."""
  steps = checkpoints.best_first(manager, trainer.config.train.best_metric)
  step, state, _, _ = checkpoints.restore_first_intact(manager, steps,
                                                       _abstract(trainer.init_state()))
  return step, state


def _resume(trainer: Trainer, manager, is_writer: bool) -> tuple[State, dict[str, Any]]:
  """The newest intact checkpoint's ``(state, record)``, or a fresh start.

  Damaged newer steps are moved aside (``checkpoints.set_aside``), never
  deleted, so that the run can save at those steps again.
  """
  steps = checkpoints.newest_first(manager)
  if not steps:
    return trainer.init_state(), {"epoch": 0, "best": None, "evals_without_improvement": 0}
  step, state, record, skipped = checkpoints.restore_first_intact(
      manager, steps, _abstract(trainer.init_state()))
  if skipped and is_writer:
    checkpoints.set_aside(manager, skipped)
  logging.info("resumed from step %d in %s", step, manager.directory)
  return state, record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints).

  Args:
    config: an experiment config (see experiments/configs/default.py).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events and
      config.json go.

  Returns:
    The best checkpoint's metrics, ``valid/<name>`` and ``test/<name>``, and
    ``best_step``; under privacy also ``epsilon`` (``math.inf`` without noise,
    written as null to final_metrics.json), ``delta`` and ``noise_multiplier``.
  """
  is_writer = jax.process_index() == 0
  config = workdir_lib.resolve_paths(config)
  # Data and model first: a bad file or key leaves no workdir behind.
  trainer = Trainer(config, builders.load(config.data))
  with workdir_lib.locked(workdir, enabled=is_writer):
    if is_writer:
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
    writer = writers.MetricWriter(workdir, enabled=is_writer)
    manager = checkpoints.create_manager(workdir, keep=config.train.keep_checkpoints,
                                         best_metric=config.train.best_metric)
    try:
      state, record = _resume(trainer, manager, is_writer)
      if trainer.is_trainable:
        _train_loop(trainer, state, record, manager, writer, is_writer)
      elif manager.latest_step() is None:
        valid = trainer.evaluate(state["params"], "valid")
        writer.write(0, "valid", valid)
        checkpoints.save(manager, 0, state, record, valid)
      return _final_evaluation(trainer, manager, writer, workdir, is_writer,
                               train_seconds=record.get("train_seconds"))
    finally:
      writer.close()
      manager.close()


def _train_loop(trainer: Trainer, state: State, record: dict[str, Any], manager, writer,
                is_writer: bool) -> None:
  """Runs from ``state['step']`` to the end (or early stop), checkpointing each eval."""
  config = trainer.config.train
  state_shardings = sharding.param_shardings(state, trainer.mesh)
  step_fn = (trainer.privacy.train_step(trainer.model, trainer.tx, rng_impl=DROPOUT_RNG_IMPL)
             if trainer.privacy else
             make_train_step(trainer.model, trainer.tx, loss=config.loss,
                             num_items=trainer.dataset.num_items, temperature=config.temperature,
                             gbce_t=config.gbce_t, log_q=trainer.log_q,
                             label_smoothing=config.get("label_smoothing", 0.0),
                             log_k_offset=config.get("bce_log_k_offset", False)))
  step_inputs = ()  # the pictures, an argument rather than a constant of the program
  if trainer.images is not None and not trainer.privacy:
    step_inputs = (jax.device_put(jnp.asarray(trainer.images), sharding.replicated(trainer.mesh)),)
  compiled_step = jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding.batch_sharding(trainer.mesh))
      + (sharding.replicated(trainer.mesh),) * len(step_inputs),
      out_shardings=(state_shardings, sharding.replicated(trainer.mesh)), donate_argnums=0)
  train_step = lambda state, batch: compiled_step(state, batch, *step_inputs)  # noqa: E731
  all_finite = jax.jit(_all_finite)
  guard = DivergenceGuard(config.divergence_factor, manager)
  step = int(state["step"])
  # Under privacy.target_epsilon the run may stop before its last step.
  total_steps = trainer.privacy.start(step, record) if trainer.privacy else trainer.total_steps
  spe = trainer.steps_per_epoch
  progress = writers.ProgressBar(trainer.total_steps, config.batch_size, enabled=is_writer,
                                 initial_step=step)
  patience = config.patience
  first_step, pending = True, {}
  # Training time over every resume, saved in each checkpoint's record (the
  # work after the last checkpoint of a killed run is redone, so not counted).
  seconds_before, segment_start = record.get("train_seconds", 0.0), time.perf_counter()
  trainer.prefetch_eval("valid")  # built while the first steps compile and run
  logging.info("training %s: %d steps (%d per epoch) on %d devices", trainer.config.model.name,
               trainer.total_steps, spe, trainer.mesh.devices.size)
  while step < total_steps:
    if patience and record["evals_without_improvement"] >= patience:
      logging.info("early stop at step %d: %d evaluations without improvement of %s", step,
                   patience, config.best_metric)
      break
    epoch, offset = divmod(step, spe)
    batches = trainer.train_batches(epoch)
    end = min(spe, offset + total_steps - step)
    for index in range(offset, end):
      batch = sharding.to_global(batches[index], trainer.mesh)
      if first_step:
        first_step = False
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_seconds = time.perf_counter() - start
        logging.info("first train step (compile + run): %.2f s", compile_seconds)
        guard.check(metrics, step + 1)
        pending = {"compile_seconds": compile_seconds}  # Joins the next logged row.
      else:
        state, metrics = train_step(state, batch)
      step += 1
      if step % config.log_every_steps == 0 or step == total_steps:
        loss = guard.check(metrics, step)
        rates = progress.update(step, loss)
        private = {k: float(metrics[k]) for k in privacy_lib.TRAIN_METRICS if k in metrics}
        writer.write(step, "train", {"loss": loss, "epoch": epoch, **rates, **pending, **private})
        pending = {}
    epoch_done = end == spe
    finished = step >= total_steps
    if (epoch_done and (epoch + 1) % config.eval_every_epochs == 0) or finished:
      guard.check(metrics, step)  # Nothing diverged is ever saved.
      if not bool(all_finite(state["params"])):
        guard.stop(step, "non-finite parameters")
      valid = trainer.evaluate(state["params"], "valid")
      private = trainer.privacy.report(step) if trainer.privacy else {}
      progress.epsilon = private.get("epsilon")
      writer.write(step, "valid", {**valid, **private})
      logging.info("step %d valid %s", step, _format(valid))
      value = valid[config.best_metric]
      if record["best"] is None or value > record["best"]:
        record.update(best=value, best_step=step, evals_without_improvement=0)
      else:
        record["evals_without_improvement"] += 1
      record["epoch"] = epoch + 1 if epoch_done else epoch
      record["train_seconds"] = seconds_before + time.perf_counter() - segment_start
      checkpoints.save(manager, step, state, record, valid)
  if step == total_steps < trainer.total_steps:
    trainer.privacy.stop(step)  # The budget's last step is saved: raises.


class DivergenceGuard:
  """Stops a run whose loss or gradient norm leaves the finite, or its own scale.

  A logged loss above ``factor`` times the median of the (up to 100) losses
  logged before it, or a non-finite loss or gradient norm, raises
  ``FloatingPointError`` naming the step and the last good checkpoint.
  """

  def __init__(self, factor: float, manager):
    self.factor, self.manager = factor, manager
    self.losses: collections.deque[float] = collections.deque(maxlen=100)
    self._last_step = -1

  def check(self, metrics: dict[str, jax.Array], step: int) -> float:
    """Checks one step's ``{'loss', 'grad_norm'}``; returns the loss as a float."""
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(grad_norm)):
      self.stop(step, f"non-finite loss or gradient norm (loss {loss}, gradient norm "
                f"{grad_norm})")
    if self.factor > 0 and self.losses and loss > self.factor * float(np.median(self.losses)):
      self.stop(step, f"loss {loss:.4g} is over train.divergence_factor={self.factor:g} times "
                f"the median {float(np.median(self.losses)):.4g} of the losses before it")
    if not self.losses or step > self._last_step:
      self.losses.append(loss)
    self._last_step = step
    return loss

  def stop(self, step: int, why: str) -> None:
    latest = self.manager.latest_step()
    kept = (f"the last good checkpoint (step {latest}) is kept in {self.manager.directory}"
            if latest is not None else "no checkpoint was saved before it")
    # Non-finite at the very first step is no learning-rate problem: the
    # initial model or the loss already produced it.
    advice = ("The first step already failed, before any update: look for a non-finite "
              "value in the model or loss at initialization (a model option, the data), "
              "not the learning rate." if step <= 1 and not self.losses else
              "Lower train.learning_rate or set train.grad_clip_norm.")
    raise FloatingPointError(f"training diverged at step {step}: {why}. Stopping; {kept}. "
                             f"{advice}")


def _final_evaluation(trainer: Trainer, manager, writer, workdir: str, is_writer: bool,
                      train_seconds: float | None = None) -> dict[str, float]:
  """Evaluates the best checkpoint on valid and test; writes final_metrics.json.

  ``train_seconds`` (the training loop's wall time over all resumes, from the
  checkpoint record), when known, goes to ``TRAIN_TIME_FILE`` beside it: a
  machine-dependent figure, kept out of the metrics that reruns reproduce.
  """
  best, state = restore_best(trainer, manager)
  results = {}
  for split in ("valid", "test"):
    split_metrics = trainer.evaluate(state["params"], split)
    writer.write(best, f"final_{split}", split_metrics)
    results.update({f"{split}/{k}": v for k, v in split_metrics.items()})
  results["best_step"] = best
  results["best_epoch"] = best / trainer.steps_per_epoch  # of the evaluated checkpoint
  if trainer.privacy:  # (epsilon, delta) of every step trained, not only up to the best.
    results.update(trainer.privacy.report(manager.latest_step()))
  if is_writer:
    with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
      # Strict JSON: an infinite epsilon (no noise) is written as null.
      json.dump(writers.strict_json(results), f, indent=2, sort_keys=True, allow_nan=False)
    if train_seconds is not None:
      with open(os.path.join(workdir, TRAIN_TIME_FILE), "w", encoding="utf-8") as f:
        json.dump({"train_seconds": train_seconds}, f)
  logging.info("best checkpoint (step %d): test %s", best,
               _format({k[5:]: v for k, v in results.items() if k.startswith("test/")}))
  return results


def _format(metrics: dict[str, float]) -> str:
  keys = [k for k in metrics if k.endswith("@10")] or list(metrics)
  return " ".join(f"{k}={metrics[k]:.4f}" for k in sorted(keys))


def _fit_to_devices(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with a mesh this machine can build, to evaluate a run trained elsewhere.

  A run trained on 8 devices with ``train.model_parallel=2`` evaluates on a
  1-device machine with ``num_devices=0`` (all) and ``model_parallel=1``. The
  metrics do not depend on the mesh.
  """
  devices = jax.device_count()
  num_devices, model_parallel = config.train.num_devices, config.train.model_parallel
  fits = num_devices <= devices and (num_devices or devices) % model_parallel == 0
  fits = fits and config.eval.batch_size % ((num_devices or devices) // model_parallel) == 0
  if fits:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.train.num_devices, config.train.model_parallel = 0, 1
  logging.warning("the run's mesh (train.num_devices=%d, train.model_parallel=%d) does not fit "
                  "the %d devices here: evaluating with all of them and model_parallel=1.",
                  num_devices, model_parallel, devices)
  return config


def load_trained(workdir: str, config: ml_collections.ConfigDict | None = None
                 ) -> tuple[Trainer, Any, int]:
  """Rebuilds the run in ``workdir`` and restores its best checkpoint.

  Args:
    workdir: a directory written by ``train_and_evaluate``.
    config: the run's config; by default read back from ``workdir/config.json``
      (``run_config.load``).

  Returns:
    ``(trainer, params, step)`` of the best intact checkpoint (the next best
    when it is damaged; by step when no checkpoint recorded metrics), params
    sharded as in training.
  """
  config = run_config.load(workdir) if config is None else run_config.upgrade_config(config)
  manager = checkpoints.create_manager(workdir, keep=config.train.keep_checkpoints,
                                       best_metric=config.train.best_metric)
  try:
    if not manager.all_steps():
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first.")
    trainer = Trainer(_fit_to_devices(config), builders.load(config.data))
    step, state = restore_best(trainer, manager)
  finally:
    manager.close()
  return trainer, state["params"], step
