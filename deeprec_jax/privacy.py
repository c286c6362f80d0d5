"""User-level DP-SGD: Poisson sampling, per-user clipping, Gaussian noise, accounting.

One training example is one user's whole sequence, so clipping each example's
gradient bounds each user's contribution (rows are never packed: a packed row
mixes users). A private step:

  1. per-example gradients by ``jax.vmap`` of the loss over the batch axis
     (each example with batch dim 1), ``microbatch_size`` examples at a time;
  2. each clipped to L2 norm ``l2_clip_norm`` over the whole parameter tree
     (the item table included) and summed; padded rows (``weight`` 0) add 0;
  3. Gaussian noise of std ``noise_multiplier * l2_clip_norm`` added to every
     coordinate of the sum, drawn once per global step from
     ``fold_in(fold_in(state rng, step), NOISE_STREAM)``;
  4. divided by the expected batch size ``q * num_examples`` (= batch_size),
     then the optimizer.

Users are Poisson-sampled with rate ``q = batch_size / num_examples``, the
variable batch padded to a fixed cap (``batch_cap``) so the step compiles once.
The privacy loss after ``n`` steps is the accountant's epsilon of
``SelfComposed(PoissonSampled(q, Gaussian(noise_multiplier)), n)`` at
``delta``: a pure function of the step count. docs/privacy.md has the details.
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from dp_accounting import pld, rdp
from flax import linen as nn
from scipy import stats

from deeprec_jax import losses, models, sharding
from deeprec_jax.data import builders, pipeline

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = ("poisson", "shuffle")
# fold_in index of the noise key under the step key; per-example dropout keys
# use the row index, which never reaches it.
NOISE_STREAM = 2**31 - 1
_POISSON_SALT = 4  # pipeline.py uses 0-3 for its streams.
# Step metrics written with each logged train row besides the loss.
TRAIN_METRICS = ("batch_users", "clipped_fraction")

State = dict[str, Any]
Batch = dict[str, jax.Array]


class BudgetExceededError(ValueError):
  """The next step would take epsilon over ``privacy.target_epsilon``."""


# ----------------------------------------------------------------------------
# Accounting.


def dp_event(noise_multiplier: float, rate: float, steps: int) -> dp_accounting.DpEvent:
  """``SelfComposed(PoissonSampled(rate, Gaussian(noise_multiplier)), steps)``."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      steps)


def _accountant(name: str) -> dp_accounting.PrivacyAccountant:
  _check_choice("accountant", name, ACCOUNTANTS)
  return pld.PLDAccountant() if name == "pld" else rdp.RdpAccountant()


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
  """Hides the RDP accountant's per-order convergence warnings (orders it drops)."""
  logger = std_logging.getLogger("absl")
  level = logger.level
  logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def epsilon(noise_multiplier: float, rate: float, steps: int, delta: float,
            accountant: str = "pld") -> float:
  """Epsilon at ``delta`` after ``steps`` Poisson-sampled Gaussian steps (inf without noise)."""
  if steps <= 0 or rate <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  with _quiet_accountant():
    return float(_accountant(accountant).compose(dp_event(noise_multiplier, rate, steps))
                 .get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, rate: float, steps: int, delta: float,
                               accountant: str = "pld") -> float:
  """The smallest noise multiplier (within 1e-4) whose epsilon after ``steps`` <= target."""
  with _quiet_accountant():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant), lambda sigma: dp_event(sigma, rate, steps),
        target_epsilon, delta, tol=1e-4))


def last_allowed_step(noise_multiplier: float, rate: float, steps: int, delta: float,
                      target_epsilon: float, accountant: str = "pld") -> int:
  """The largest ``n <= steps`` with ``epsilon(n) <= target_epsilon`` (bisection)."""
  eps = functools.partial(epsilon, noise_multiplier, rate, delta=delta, accountant=accountant)
  if eps(steps=steps) <= target_epsilon:
    return steps
  low, high = 0, steps  # eps(low) <= target < eps(high)
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if eps(steps=middle) <= target_epsilon else (low, middle)
  return low


# ----------------------------------------------------------------------------
# Poisson sampling.


def batch_cap(batch_size: int, num_examples: int, total_steps: int, overflow: float,
              multiple: int = 1) -> int:
  """Rows of a padded Poisson batch: overflowed with chance <= ``overflow`` over the run.

  The smallest multiple of ``multiple`` at or above the Binomial(N, q)
  quantile with tail ``overflow / total_steps`` (N = ``num_examples``, q =
  ``batch_size / N``), and never above N rounded up: no draw exceeds N.
  """
  rate = batch_size / num_examples
  quantile = stats.binom.isf(overflow / max(total_steps, 1), num_examples, rate)
  cap = int(min(max(quantile, batch_size), num_examples))
  return -(-cap // multiple) * multiple


class PoissonSampler:
  """Users of each step, each independently with probability ``rate``.

  ``sampler(step)`` is a pure function of ``(seed, step)``: sorted example
  indices, at most ``cap`` (an overflowing draw keeps a random subset of
  ``cap``, logged; ``batch_cap`` makes that rare).
  """

  def __init__(self, *, seed: int, rate: float, num_examples: int, cap: int):
    self.seed, self.rate, self.num_examples, self.cap = seed, rate, num_examples, cap

  def __call__(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed % 2**64, int(step), _POISSON_SALT])
    # Independent Bernoulli(q) per user == a Binomial(N, q) count of uniform users.
    count = int(rng.binomial(self.num_examples, self.rate))
    if count > self.cap:
      logging.warning("step %d: %d users sampled, over the batch cap %d: %d dropped at random "
                      "(truncated Poisson sampling).", step, count, self.cap, count - self.cap)
      count = self.cap
    return np.sort(rng.choice(self.num_examples, count, replace=False))


# ----------------------------------------------------------------------------
# The private step.


def clip_examples(grads: Any, l2_clip_norm: float, weight: jax.Array) -> tuple[Any, jax.Array]:
  """``(clipped, norms)``: each row of the ``[B, ...]`` leaves scaled by ``min(1, C / norm)``.

  ``norm`` is the row's L2 norm over the whole tree (returned, ``float32[B]``);
  rows with ``weight float32[B]`` 0 (padding) become 0.
  """
  squares = [jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
             for g in jax.tree.leaves(grads)]
  norms = jnp.sqrt(sum(squares))
  factor = jnp.minimum(1.0, l2_clip_norm / jnp.maximum(norms, 1e-30))
  real = weight > 0

  def scale(g):
    shape = (-1,) + (1,) * (g.ndim - 1)
    # `where`, not a multiply: a padded row's gradient may not be finite.
    return jnp.where(real.reshape(shape), g * factor.reshape(shape).astype(g.dtype), 0)

  return jax.tree.map(scale, grads), norms


ExampleLoss = Callable[[Any, Batch, jax.Array], jax.Array]


def example_softmax_ce(hidden: jax.Array, item_table: jax.Array, targets: jax.Array,
                       negatives: jax.Array | None = None) -> jax.Array:
  """``losses.softmax_ce`` of one sequence example, not streamed.

  One example's logits ``[1, L, N + 1]`` are small; under ``vmap`` the
  streamed form's column blocks and conditionals made the private ML-100K
  step 4.5x slower (5.8 s vs 1.3 s, measured).
  """
  del negatives
  h = hidden.astype(jnp.float32)  # [1, L, D]: no window models under privacy
  scores = h @ item_table.astype(jnp.float32).T  # [1, L, N + 1]
  logits = jnp.where(jnp.arange(scores.shape[-1]) == 0, -jnp.inf, scores)  # padding column
  per_target = (jax.nn.logsumexp(logits, axis=-1)
                - jnp.take_along_axis(scores, targets[..., None], axis=-1)[..., 0])
  mask = targets > 0
  return jnp.sum(jnp.where(mask, per_target, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_example_loss(model: nn.Module, *, loss: str, num_items: int, temperature: float = 1.0,
                      gbce_t: float = 0.75, log_k_offset: bool = False) -> ExampleLoss:
  """``(params, example, dropout_key) -> scalar``: one user's loss, the mean over its targets.

  ``example`` holds ``item_seq int32[1, L]``, ``targets``, ``negatives`` and
  ``user int32[1]`` (batch dim 1); the model runs with dropout on. The full
  softmax is ``example_softmax_ce``, the others ``losses.loss_fn(loss)``.
  """
  loss_fn = losses.loss_fn(loss, temperature=temperature, gbce_t=gbce_t,
                           log_k_offset=log_k_offset)
  if loss == "softmax":
    loss_fn = lambda h, *args: example_softmax_ce(h / temperature, *args)

  def example_loss(params, example, dropout_key):
    hidden = model.apply({"params": params}, example["item_seq"], user=example["user"],
                         deterministic=False, rngs={"dropout": dropout_key})
    return loss_fn(hidden, models.item_vectors(model, params, num_items), example["targets"],
                   example["negatives"])

  return example_loss


def clipped_example_grads(example_loss: ExampleLoss, params: Any, batch: Batch,
                          step_key: jax.Array, *, l2_clip_norm: float
                          ) -> tuple[Any, jax.Array, jax.Array]:
  """Each example's clipped gradient, norm and loss (``jax.vmap`` over the batch axis).

  ``batch`` arrays are ``[B, ...]``, with ``weight float32[B]`` (1 real, 0
  padding; default all 1) and ``row int32[B]`` (row r's dropout key is
  ``fold_in(step_key, r)``; default ``arange(B)``). Returns ``(clipped,
  norms, losses)``: params' tree with leaves ``[B, ...]`` (0 at padding), the
  unclipped norms and the losses, ``float32[B]``.
  """
  rows = batch["item_seq"].shape[0]
  batch = {"row": jnp.arange(rows, dtype=jnp.int32),
           "weight": jnp.ones((rows,), jnp.float32), **batch}

  def one(example):
    key = jax.random.fold_in(step_key, example["row"])
    inputs = {k: v[None] for k, v in example.items() if k not in ("row", "weight")}
    return jax.value_and_grad(example_loss)(params, inputs, key)

  values, grads = jax.vmap(one)(batch)
  clipped, norms = clip_examples(grads, l2_clip_norm, batch["weight"])
  return clipped, norms, values


def clipped_gradient_sum(example_loss: ExampleLoss, params: Any, batch: Batch,
                         step_key: jax.Array, *, l2_clip_norm: float,
                         microbatch_size: int = 0) -> tuple[Any, dict[str, jax.Array]]:
  """``(summed, stats)``: ``clipped_example_grads`` summed, ``microbatch_size`` rows at a time.

  ``microbatch_size`` (0 = all at once) must divide B. ``stats``: ``loss_sum``
  over real rows, ``count`` of real rows, rows ``clipped`` (norm > C).
  """
  rows = batch["item_seq"].shape[0]
  batch = {"row": jnp.arange(rows, dtype=jnp.int32),
           "weight": jnp.ones((rows,), jnp.float32), **batch}

  def chunk_sum(chunk):
    clipped, norms, values = clipped_example_grads(example_loss, params, chunk, step_key,
                                                   l2_clip_norm=l2_clip_norm)
    real = chunk["weight"] > 0
    stats = {"loss_sum": jnp.sum(jnp.where(real, values, 0.0)),
             "count": jnp.sum(real, dtype=jnp.float32),
             "clipped": jnp.sum(real & (norms > l2_clip_norm), dtype=jnp.float32)}
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped), stats

  if not microbatch_size or microbatch_size >= rows:
    return chunk_sum(batch)
  if rows % microbatch_size:
    raise ValueError(f"privacy.microbatch_size={microbatch_size} must divide the {rows} rows "
                     "of the batch.")
  num_chunks = rows // microbatch_size
  # Chunk c holds rows c, c + n, c + 2n, ...: [B] -> [m, n] -> [n, m] keeps each
  # device's contiguous block of rows on that device in every chunk.
  chunks = jax.tree.map(
      lambda x: jnp.moveaxis(x.reshape(microbatch_size, num_chunks, *x.shape[1:]), 1, 0), batch)

  def accumulate(total, chunk):
    return jax.tree.map(jnp.add, total, chunk_sum(chunk)), None

  zeros = (jax.tree.map(jnp.zeros_like, params),
           {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "count", "clipped")})
  return jax.lax.scan(accumulate, zeros, chunks)[0]


def add_noise(tree: Any, key: jax.Array, stddev: float) -> Any:
  """``tree`` plus i.i.d. N(0, stddev^2) on every coordinate.

  The bits of ``key`` (any PRNG key) seed a Threefry key, whose draws do not
  depend on how the arrays are sharded.
  """
  if stddev == 0:
    return tree
  threefry = jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32),
                                      impl="threefry2x32")
  leaves, treedef = jax.tree.flatten(tree)
  noisy = [x + stddev * jax.random.normal(jax.random.fold_in(threefry, i), x.shape, x.dtype)
           for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, noisy)


def make_private_train_step(model: nn.Module, tx: optax.GradientTransformation, *, loss: str,
                            num_items: int, l2_clip_norm: float, noise_multiplier: float,
                            expected_batch_size: float, microbatch_size: int = 0,
                            rng_impl: str = "rbg", temperature: float = 1.0,
                            gbce_t: float = 0.75, log_k_offset: bool = False
                            ) -> Callable[[State, Batch], tuple[State, dict]]:
  """``train_step(state, batch) -> (state, metrics)`` of DP-SGD (module docstring).

  ``loss`` (and ``temperature``, ``gbce_t``, ``log_k_offset``) as in
  ``make_example_loss``; the
  noise std is ``noise_multiplier * l2_clip_norm``; the noisy sum is divided
  by ``expected_batch_size`` (q * num_examples); ``rng_impl`` is that of
  ``state['rng']``. Metrics: ``loss`` (mean over real rows), ``grad_norm``
  (of the noisy mean gradient), ``batch_users``, ``clipped_fraction``.
  """
  example_loss = make_example_loss(model, loss=loss, num_items=num_items,
                                   temperature=temperature, gbce_t=gbce_t,
                                   log_k_offset=log_k_offset)

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=rng_impl),
                                  state["step"])
    summed, stats = clipped_gradient_sum(example_loss, state["params"], batch, step_key,
                                         l2_clip_norm=l2_clip_norm,
                                         microbatch_size=microbatch_size)
    noisy = add_noise(summed, jax.random.fold_in(step_key, NOISE_STREAM),
                      noise_multiplier * l2_clip_norm)
    grads = jax.tree.map(lambda g: g / expected_batch_size, noisy)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(params=optax.apply_updates(state["params"], updates),
                     opt_state=opt_state, step=state["step"] + 1, rng=state["rng"])
    count = jnp.maximum(stats["count"], 1.0)
    return new_state, {"loss": stats["loss_sum"] / count, "grad_norm": optax.global_norm(grads),
                       "batch_users": stats["count"], "clipped_fraction": stats["clipped"] / count}

  return train_step


# ----------------------------------------------------------------------------
# What a Trainer needs.


def check_config(privacy: ml_collections.ConfigDict, *, num_users: int,
                 spec: models.ModelSpec, model_config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ``ValueError`` for a privacy block this code cannot honour."""
  model_name = model_config.name
  _check_choice("accountant", privacy.accountant, ACCOUNTANTS)
  _check_choice("sampling", privacy.sampling, SAMPLINGS)
  if not spec.trainable:
    raise ValueError(f"config key privacy.enabled: model {model_name!r} has no gradient "
                     "training (it is fitted from counts, which DP-SGD does not privatize).")
  if spec.task == "window":
    raise ValueError(f"config key privacy.enabled: model {model_name!r} trains on windows "
                     "(many examples per user), so clipping an example would not bound a "
                     "user's contribution; window models are refused under privacy.")
  if model_config.get("item_encoder", "id") != "id":
    raise ValueError(f"config key model.item_encoder={model_config.item_encoder!r}: under "
                     "privacy only 'id' item vectors are supported (per-user gradients of the "
                     "image tower would encode the catalogue once per user).")
  if privacy.l2_clip_norm <= 0:
    raise ValueError(f"config key privacy.l2_clip_norm={privacy.l2_clip_norm} must be > 0.")
  if privacy.noise_multiplier < 0 or privacy.target_epsilon < 0:
    raise ValueError("config keys privacy.noise_multiplier and privacy.target_epsilon must be "
                     f">= 0; got {privacy.noise_multiplier} and {privacy.target_epsilon}.")
  if not 0 < privacy.delta < 1 / num_users:
    raise ValueError(f"config key privacy.delta={privacy.delta:g} must lie in (0, 1/num_users "
                     f"= {1 / num_users:.3g}), well below it (the dataset has {num_users} "
                     "users); e.g. 1e-6.")
  if privacy.microbatch_size < 0:
    raise ValueError(f"config key privacy.microbatch_size={privacy.microbatch_size} must be "
                     ">= 0 (0 = the whole batch at once).")


class Plan:
  """One run's privacy: sampling, batch shape, noise multiplier and its epsilon.

  Built by ``train.Trainer`` when ``config.privacy.enabled``. Checks the
  config at once; the calibration (seconds) waits for ``noise_multiplier``.
  """

  def __init__(self, config: ml_collections.ConfigDict, dataset: builders.Dataset,
               spec: models.ModelSpec, mesh: jax.sharding.Mesh, *, total_steps: int):
    self.config, self.privacy, self.dataset = config, config.privacy, dataset
    check_config(self.privacy, num_users=dataset.num_users, spec=spec,
                 model_config=config.model)
    if config.train.pack and spec.packs:
      logging.info("privacy: packing is off (train.pack ignored): a packed row mixes users.")
    self.mesh, self.total_steps = mesh, total_steps
    self.num_examples = pipeline.num_examples(dataset, task=spec.task,
                                              num_targets=config.task.num_targets)
    self.batch_size = config.train.batch_size
    self.rate = self.batch_size / self.num_examples  # expected batch = batch_size
    data_size = mesh.shape[sharding.DATA_AXIS]
    self.sampler = None
    if self.privacy.sampling == "poisson":
      self.rows = batch_cap(self.batch_size, self.num_examples, total_steps, self.privacy.delta,
                            data_size)
    else:
      self.rows = self.batch_size
    self.microbatch_size = 0
    if 0 < self.privacy.microbatch_size < self.rows:
      # The fewest chunks of at most microbatch_size rows, each a multiple of the
      # data-parallel devices (so each device gets its share of every chunk).
      chunks = -(-self.rows // self.privacy.microbatch_size)
      if self.privacy.sampling == "shuffle":
        while self.rows % chunks or (self.rows // chunks) % data_size:
          chunks += 1
      self.microbatch_size = -(-self.rows // (chunks * data_size)) * data_size
      self.rows = chunks * self.microbatch_size
    if self.privacy.sampling == "poisson":
      self.sampler = PoissonSampler(seed=config.seed, rate=self.rate,
                                    num_examples=self.num_examples, cap=self.rows)

  @functools.cached_property
  def noise_multiplier(self) -> float:
    """``privacy.noise_multiplier``, or the one calibrated to ``target_epsilon`` (logged)."""
    p = self.privacy
    if p.noise_multiplier > 0 or p.target_epsilon <= 0:
      return float(p.noise_multiplier)
    sigma = calibrate_noise_multiplier(p.target_epsilon, self.rate, self.total_steps, p.delta,
                                       p.accountant)
    logging.info("privacy: noise_multiplier %.4f calibrated for epsilon %g at delta %g after "
                 "%d steps (q = %.4g, %s accountant).", sigma, p.target_epsilon, p.delta,
                 self.total_steps, self.rate, p.accountant)
    return sigma

  @functools.lru_cache(maxsize=64)  # noqa: B019 - one Plan per run, few steps asked.
  def epsilon(self, step: int) -> float:
    """Epsilon at ``privacy.delta`` after ``step`` steps."""
    return epsilon(self.noise_multiplier, self.rate, step, self.privacy.delta,
                   self.privacy.accountant)

  def report(self, step: int) -> dict[str, float]:
    """``{'epsilon', 'delta', 'noise_multiplier'}`` after ``step`` steps."""
    return {"epsilon": self.epsilon(step), "delta": float(self.privacy.delta),
            "noise_multiplier": self.noise_multiplier}

  def start(self, step: int, record: dict[str, Any]) -> int:
    """Logs the set-up, checks a resumed run's noise; returns the last step to train.

    Raises:
      ValueError: ``record`` (a checkpoint's) holds another noise multiplier.
      BudgetExceededError: already at the budget when resuming.
    """
    p, sigma = self.privacy, self.noise_multiplier
    if record.setdefault("noise_multiplier", sigma) != sigma:
      raise ValueError(f"privacy: the checkpoints were trained with noise_multiplier "
                       f"{record['noise_multiplier']:.6g}, this config gives {sigma:.6g} (the "
                       "calibration follows the planned steps): set privacy.noise_multiplier="
                       f"{record['noise_multiplier']!r} to resume.")
    if p.sampling == "shuffle":
      logging.warning("privacy: sampling='shuffle' draws fixed-size shuffled batches but is "
                      "ACCOUNTED AS IF POISSON-SAMPLED (q = %.4g): the epsilon reported is "
                      "not a proven guarantee for this sampling (docs/privacy.md).", self.rate)
    logging.info("privacy: DP-SGD with clip %g, noise multiplier %.4g, q = %.4g (%d of %d "
                 "users expected per step, %d rows), delta %g, %s accountant; epsilon after "
                 "%d steps: %.4g.", p.l2_clip_norm, sigma, self.rate, self.batch_size,
                 self.num_examples, self.rows, p.delta, p.accountant, self.total_steps,
                 self.epsilon(self.total_steps))
    if sigma == 0:
      logging.warning("privacy: no noise (noise_multiplier 0, no target_epsilon): clipping "
                      "only, epsilon is infinite.")
    last = self.total_steps
    if 0 < p.target_epsilon < self.epsilon(self.total_steps):
      last = last_allowed_step(sigma, self.rate, self.total_steps, p.delta, p.target_epsilon,
                               p.accountant)
      logging.warning("privacy: epsilon would pass target_epsilon=%g after step %d; the run "
                      "stops there with an error.", p.target_epsilon, last)
      if step >= last:
        self.stop(step)
    return last

  def stop(self, step: int) -> None:
    """Raises ``BudgetExceededError`` for the step after ``step``."""
    p = self.privacy
    raise BudgetExceededError(
        f"privacy budget: step {step + 1} would take epsilon to {self.epsilon(step + 1):.4g} > "
        f"privacy.target_epsilon={p.target_epsilon:g} (delta {p.delta:g}). Stopped after step "
        f"{step} (epsilon {self.epsilon(step):.4g}), its checkpoint saved; raise "
        "privacy.noise_multiplier, or set it to 0 to calibrate it for the planned steps.")

  def train_batches(self, epoch: int, steps_per_epoch: int):
    """Epoch ``epoch``'s batches: element i is global step ``epoch * steps_per_epoch + i``."""
    block, num_blocks = sharding.batch_block(self.mesh)
    return pipeline.sampled_train_batches(
        self.dataset, task=models.spec(self.config.model.name).task,
        max_len=self.config.data.max_len, sample=self.sampler, num_rows=self.rows,
        first_step=epoch * steps_per_epoch, num_steps=steps_per_epoch,
        num_negatives=self.config.train.num_negatives, seed=self.config.seed,
        mask_prob=self.config.task.mask_prob, process_index=block, process_count=num_blocks)

  def train_step(self, model: nn.Module, tx: optax.GradientTransformation, *,
                 rng_impl: str) -> Callable[[State, Batch], tuple[State, dict]]:
    """``make_private_train_step`` with this run's loss, clip, noise and batch."""
    train = self.config.train
    return make_private_train_step(
        model, tx, loss=train.loss, num_items=self.dataset.num_items,
        l2_clip_norm=self.privacy.l2_clip_norm, noise_multiplier=self.noise_multiplier,
        expected_batch_size=self.rate * self.num_examples, microbatch_size=self.microbatch_size,
        rng_impl=rng_impl, temperature=train.temperature, gbce_t=train.gbce_t,
        log_k_offset=train.get("bce_log_k_offset", False))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"config key privacy.{name}={value!r}; expected one of "
                     f"{', '.join(choices)}.")
