"""The click-through ('ctr') task: pairs, BCE training, logloss / AUC / accuracy.

Examples are ``(history, candidate, label)`` pairs built from the per-user
sequences (``builders.Dataset``) with leave-one-out:

* training: for every position ``t >= 1`` of a user's training part
  ``seq[:-2]``, the clicked item ``seq[t]`` after ``seq[:t]`` (label 1) and
  ``num_negatives`` items the user never had (label 0);
* held out (``split='valid'`` or ``'test'``): the held-out item after its
  history (label 1) and as many sampled unseen items (label 0).

Items of ``Dataset.withheld_items`` (cold start) are never training
candidates, so held-out pairs measure how well pictures stand in for them.
``train(...)`` fits ``models.ctr.Model`` with Adam on ``sigmoid`` BCE and
``evaluate(...)`` returns ``{'logloss', 'auc', 'accuracy', 'count'}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deeprec_jax import evaluate as evaluate_lib
from deeprec_jax import writers
from deeprec_jax.data import builders, cold_start, images, negatives, pipeline, preprocess
from deeprec_jax.models import ctr

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Pairs:
  """``history int32[P, L]`` (left-padded), ``candidate int32[P]``, ``label float32[P]``.

  ``cold bool[P]``: the pair belongs to a held-out click on a withheld item
  (``cold_start``); all False for training pairs and without cold start.
  """

  history: np.ndarray
  candidate: np.ndarray
  label: np.ndarray
  cold: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.label)


def make_pairs(dataset: builders.Dataset, *, split: str, max_len: int, num_negatives: int = 1,
               seed: int = 0) -> Pairs:
  """The labelled pairs of ``split`` (see the module doc); a function of ``seed``."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {', '.join(SPLITS)}.")
  rng = np.random.default_rng([int(seed) % 2**32, SPLITS.index(split)])
  withheld = (np.zeros(0, np.int64) if dataset.withheld_items is None
              else np.asarray(dataset.withheld_items, np.int64))
  histories, candidates, labels, cold = [], [], [], []
  is_withheld = np.zeros(dataset.num_items + 1, bool)
  is_withheld[withheld] = True
  for user in range(dataset.num_users):
    seq = np.asarray(dataset.source[user]["item_seq"], np.int64)
    train = preprocess.split_train(seq)
    # Training negatives avoid the training part only (held-out items are not
    # known then); evaluation negatives avoid every item the user has.
    seen = np.union1d(train if split == "train" else seq, withheld)
    if split == "train":
      steps = [(train[:t], int(train[t])) for t in range(1, len(train))]
    elif len(seq) >= preprocess.MIN_SEQUENCE_LENGTH:
      steps = [preprocess.split_eval(seq, split)]
    else:
      steps = []
    for history, positive in steps:
      row = pipeline.eval_input(history, task="autoregressive", max_len=max_len,
                                num_items=dataset.num_items)
      drawn = negatives.sample_uniform(rng, dataset.num_items, seen, (num_negatives,))
      for candidate, label in [(positive, 1.0)] + [(int(d), 0.0) for d in drawn if d > 0]:
        histories.append(row)
        candidates.append(candidate)
        labels.append(label)
        cold.append(split != "train" and bool(is_withheld[positive]))
  if not labels:
    raise ValueError(f"{dataset.name} has no {split!r} pairs.")
  return Pairs(np.stack(histories).astype(np.int32), np.asarray(candidates, np.int32),
               np.asarray(labels, np.float32), np.asarray(cold, bool))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a positive > a negative's), ties count 1/2."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0.5
  order = np.argsort(scores, kind="stable")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks (1-based) over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  average = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(average, counts)
  positives, negatives_ = int(labels.sum()), int((~labels).sum())
  if not positives or not negatives_:
    return float("nan")
  return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives_))


def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """``logloss`` (mean BCE), ``auc``, ``accuracy`` (p > 0.5) and ``count``."""
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels, np.float64)
  # log(1 + exp(-|x|)) + max(x, 0) - x * y: BCE with logits, stable.
  loss = np.logaddexp(0.0, logits) - logits * labels
  return {"logloss": float(loss.mean()), "auc": auc(logits, labels),
          "accuracy": float(((logits > 0) == (labels > 0.5)).mean()),
          "count": float(len(labels))}


def _images_of(images: jax.Array, items: jax.Array) -> jax.Array:
  return jnp.take(images, items, axis=0)


def make_train_step(model: ctr.Model, tx: optax.GradientTransformation, images: Any):
  """``step(state, batch) -> (state, loss)``; ``images`` is a closure constant."""
  images = jnp.asarray(images)

  def step(state, batch):
    def objective(params):
      logits = model.apply({"params": params}, batch["history"], batch["candidate"],
                           _images_of(images, batch["candidate"]))
      return optax.sigmoid_binary_cross_entropy(logits, batch["label"]).mean()

    loss, grads = jax.value_and_grad(objective)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  return step


def predict(model: ctr.Model, params: Any, pairs: Pairs, images: Any,
            batch_size: int = 512) -> np.ndarray:
  """``float32[P]`` logits of every pair."""
  apply = jax.jit(lambda p, h, c, im: model.apply({"params": p}, h, c, _images_of(im, c)))
  images = jnp.asarray(images)
  out = []
  for start in range(0, len(pairs), batch_size):
    rows = slice(start, start + batch_size)
    out.append(np.asarray(apply(params, pairs.history[rows], pairs.candidate[rows], images)))
  return np.concatenate(out)


def train(model: ctr.Model, pairs: Pairs, images: Any, *, num_steps: int, batch_size: int,
          learning_rate: float = 1e-3, seed: int = 0) -> tuple[Any, list[float]]:
  """Fits ``model`` on ``pairs`` by Adam; returns ``(params, losses)``.

  Batches are drawn without replacement within each pass, by ``seed``.
  """
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), pairs.history[:1], pairs.candidate[:1],
                      jnp.asarray(images)[pairs.candidate[:1]])["params"]
  tx = optax.adam(learning_rate)
  state = {"params": params, "opt_state": tx.init(params)}
  step = jax.jit(make_train_step(model, tx, images))
  order, position, losses = rng.permutation(len(pairs)), 0, []
  for _ in range(num_steps):
    if position + batch_size > len(order):
      order, position = rng.permutation(len(pairs)), 0
    rows = order[position:position + batch_size]
    position += batch_size
    batch = {"history": pairs.history[rows], "candidate": pairs.candidate[rows],
             "label": pairs.label[rows]}
    state, loss = step(state, batch)
    losses.append(float(loss))
  return state["params"], losses


def evaluate(model: ctr.Model, params: Any, pairs: Pairs, images: Any) -> dict[str, float]:
  """``metrics`` of ``model`` on ``pairs``; also ``cold/`` and ``warm/`` ones under cold start.

  A pair is cold when its click is on a withheld item (``Pairs.cold``), so a
  held-out click and its sampled negatives fall on the same side.
  """
  logits = predict(model, params, pairs, images)
  results = metrics(logits, pairs.label)
  if pairs.cold is not None and pairs.cold.any():
    for prefix, rows in (("cold/", pairs.cold), ("warm/", ~pairs.cold)):
      if rows.any():
        results.update({prefix + k: v for k, v in metrics(logits[rows],
                                                          pairs.label[rows]).items()})
  return results


def item_vectors(model: ctr.Model, params: Any, images: Any) -> jax.Array:
  """``float32[N + 1, dim]``: every item's picture (+ id) vector, the catalogue at once."""
  return jax.jit(lambda p, ids, pictures: model.apply(
      {"params": p}, ids, pictures, method="encode_items"))(
          params, jnp.arange(images.shape[0]), jnp.asarray(images))


def rank_evaluation(model: ctr.Model, params: Any, dataset: builders.Dataset, images: Any,
                    config: Any, split: str, vectors: jax.Array | None = None
                    ) -> dict[str, float]:
  """Full-ranking HR/NDCG/MRR@K of the click logits of every item, as the recommenders'.

  Each user's click logit for every item of the catalogue (``rank_logits``;
  pictures encoded once) ranks the held-out item with the history excluded,
  through ``evaluate.make_eval_step``: the same batches, metrics and
  ``cold/`` / ``warm/`` split as ``train.Trainer.evaluate``. ``vectors``:
  ``item_vectors(model, params, images)`` if already computed.
  """
  num_items = dataset.num_items
  if vectors is None:
    vectors = item_vectors(model, params, images)
  scorer = lambda p, batch, item_vectors: model.apply(
      {"params": p}, batch["item_seq"], item_vectors, method="rank_logits")
  step = evaluate_lib.make_eval_step(model, num_items, tuple(config.eval.ks),
                                     exclude_history=config.eval.exclude_history,
                                     cold_items=dataset.withheld_items, scorer=scorer)
  batches = pipeline.eval_batches(
      dataset, split=split, task="autoregressive", max_len=config.data.max_len,
      batch_size=config.eval.batch_size, num_sampled_negatives=config.eval.num_sampled_negatives,
      seed=config.seed)
  return evaluate_lib.evaluate(jax.jit(step), params, batches, item_vectors=vectors)


def run(config: Any) -> dict[str, float]:
  """Trains the CTR model of ``config`` (``experiments/configs/ctr.py``) and evaluates it.

  Returns:
    ``valid/<metric>`` and ``test/<metric>``: the pairs' ``logloss``, ``auc``,
    ``accuracy`` and ``count``, and the full-ranking metrics of every item's
    logit (``rank_evaluation``: ``hr@K``, ``ndcg@K``, ...); under cold start
    each also as ``<split>/cold/<metric>`` and ``<split>/warm/<metric>``
    (the ranking's ``count`` is then ``ranked_count``). Plus
    ``train/final_loss``.
  """
  dataset = cold_start.split(builders.load(config.data), config.data.cold_start_fraction,
                             config.seed)
  if config.data.images.source == "features":
    raise ValueError("config key data.images.source='features': the click model encodes "
                     "pictures with its CNN; precomputed features are for the sequential "
                     "models' item encoders.")
  pictures = images.load(config.data, dataset).images  # uint8[N + 1, S, S, 3]
  fields = dict(config.model)
  fields.pop("name")
  model = ctr.Model(num_items=dataset.num_items, num_users=dataset.num_users,
                    max_len=config.data.max_len, **fields)
  pairs = make_pairs(dataset, split="train", max_len=config.data.max_len,
                     num_negatives=config.train.num_negatives, seed=config.seed)
  params, losses = train(model, pairs, pictures, num_steps=config.train.num_steps,
                         batch_size=config.train.batch_size,
                         learning_rate=config.train.learning_rate, seed=config.seed)
  results = {"train/final_loss": float(np.mean(losses[-10:]))}
  vectors = item_vectors(model, params, pictures)  # once for both splits' rankings
  for split in ("valid", "test"):
    held_out = make_pairs(dataset, split=split, max_len=config.data.max_len,
                          num_negatives=config.eval.num_negatives, seed=config.seed)
    results.update({f"{split}/{k}": v
                    for k, v in evaluate(model, params, held_out, pictures).items()})
    ranked = rank_evaluation(model, params, dataset, pictures, config, split, vectors)
    results.update({f"{split}/{k.replace('count', 'ranked_count')}": v
                    for k, v in ranked.items()})
  return results


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """``run(config)`` as a run in ``workdir``: config.json, metrics.jsonl, final_metrics.json.

  The ablation runner's entry point for ``model.name='ctr'`` (it trains in
  one go, without checkpoints: a few minutes on 2 CPU cores).
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  results = run(config)
  writer = writers.MetricWriter(workdir)
  try:
    for split in ("valid", "test"):
      prefix = f"{split}/"
      writer.write(config.train.num_steps, f"final_{split}",
                   {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)})
  finally:
    writer.close()
  results["best_step"] = config.train.num_steps
  with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
    json.dump(writers.strict_json(results), f, indent=2, sort_keys=True, allow_nan=False)
  return results
