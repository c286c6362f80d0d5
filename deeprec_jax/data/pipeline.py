"""Grain pipeline: per-user sequences -> deterministic numpy batches.

Training batches come from a ``grain.MapDataset`` with random access:
``train_batches(...)[step]`` is a pure function of ``(seed, epoch, step)`` and
of the process's place in the run, so resuming means indexing by step. The
epoch's order is one global shuffle of all training examples, and every
per-example random draw (negatives, BERT4Rec masks) is seeded by
``(seed, epoch, example index)``. Neither depends on the number of processes:
P processes together see exactly the rows one process would. Window examples
(Caser: ~1M per epoch on ML-1M) are built a whole batch at a time from every
user's sequence held in memory (``negatives.WindowTable``); their negatives are
a counter-based hash of ``(seed, epoch, example index, slot, attempt)``, so
they keep the same property without one generator per example. Packing lives
in ``packing``, negative sampling in ``negatives``.

Leave-one-out: ``seq[-1]`` is the test target, ``seq[-2]`` the validation
target; training examples only ever see ``preprocess.split_train(seq)``.
Batch layouts are documented in docs/contracts.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from deeprec_jax.data import builders, negatives, packing, preprocess
from deeprec_jax.data import times as times_lib
from deeprec_jax.inputs import eval_input  # Public here too: the batches' input rule.

TASKS = ("autoregressive", "window", "masked")
SPLITS = ("valid", "test")
SAMPLINGS = ("uniform", "popularity")
# Salts that keep the random streams of different purposes apart.
_SHUFFLE_SALT, _TRAIN_SALT, _EVAL_SALT, _WINDOW_SALT = 0, 1, 2, 3


def steps_per_epoch(dataset: builders.Dataset, *, task: str, global_batch_size: int,
                    max_len: int, num_targets: int = 1) -> int:
  """Number of full global batches in one epoch of ``task`` (the remainder is dropped).

  Args:
    dataset: the per-user sequences.
    task: 'autoregressive', 'window' or 'masked'.
    global_batch_size: examples per step over all processes.
    max_len: model input length (unused: examples do not depend on it, kept
      so that every task shares one signature).
    num_targets: T, next items per window example ('window' only).

  Returns:
    ``num_examples // global_batch_size``, at least 1.
  """
  del max_len  # Long histories are truncated, not split into more examples.
  users, _ = _examples(dataset, task, num_targets)
  steps = len(users) // global_batch_size
  if steps == 0:
    raise ValueError(f"config key train.batch_size={global_batch_size} exceeds the "
                     f"{len(users)} {task!r} training examples of {dataset.name}.")
  return steps


def train_batches(dataset: builders.Dataset, *, task: str, max_len: int,
                  global_batch_size: int, num_negatives: int, seed: int, epoch: int,
                  num_targets: int = 1, mask_prob: float = 0.2, pack_row_multiple: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  negative_cdf: np.ndarray | None = None,
                  shared_negatives: bool = False,
                  in_batch_negatives: bool = False,
                  with_times: bool = False) -> grain.MapDataset:
  """The training batches of one epoch, for this process.

  Examples per task (t = ``split_train(seq)``, left-padded with 0):
    * 'autoregressive': one per user with ``len(t) >= 2``; the last
      ``max_len + 1`` items give ``item_seq = t[:-1]``, ``targets = t[1:]``.
    * 'window': one per (user, position s >= 1) with T items after s:
      ``item_seq = t[s - L:s]`` (L = ``max_len``), ``targets = t[s:s + T]``.
    * 'masked': one per user with ``len(t) >= 1``; ``t[-max_len:]`` with each
      item masked (replaced by ``num_items + 1``) with probability
      ``mask_prob``; targets are the original items at masked positions, else 0.
      If no item was drawn, the last one is masked: every sequence teaches
      something, and the last position is the one evaluation asks about.
  ``negatives[..., k]`` are drawn uniformly (or, with ``negative_cdf``, in
  proportion to training popularity) from the items outside the user's
  training part, as the SASRec code's sampler does (its held-out validation
  and test items can be drawn: excluding them would tell training what they
  are), 0 where the target is 0; with ``shared_negatives``, one set
  of ``k`` per sequence, ``negatives[B, 1, k]``, that all its positions share
  (as the SASRec+ code samples its 3,000 negatives). With
  ``in_batch_negatives`` they are drawn from the items of the whole global
  batch instead (every position of every sequence, with repeats, so in
  proportion to their frequency in the batch); a draw the user has seen
  becomes 0 (ignored by the losses) rather than being redrawn.

  Args:
    dataset: the per-user sequences.
    task: 'autoregressive', 'window' or 'masked'.
    max_len: L, model input length.
    global_batch_size: examples per step over all processes.
    num_negatives: k, negatives per target.
    seed: the run's seed.
    epoch: the epoch (0-based); each epoch has its own order and draws.
    num_targets: T, next items per window example ('window' only).
    mask_prob: masking probability ('masked' only).
    pack_row_multiple: if > 0 (not for 'window'), each global batch is
      packed (``packing.pack_batch``) into a number of rows that is a
      multiple of this and of ``process_count`` (e.g. lcm(8, data-parallel
      devices)); the rows are the same whatever the number of processes, each
      loading its share.
    process_index: this process, in ``[0, process_count)``.
    process_count: processes sharing each global batch.
    negative_cdf: ``cumsum(train_item_counts(dataset))`` to draw negatives by
      popularity (``config.train.negative_sampling='popularity'``; sequence
      tasks only); None = uniform.
    shared_negatives: draw each sequence's ``k`` negatives once, shared by its
      positions (``config.train.shared_negatives``; sequence tasks, unpacked).
    in_batch_negatives: draw from the global batch's items
      (``config.train.negative_sampling='in_batch'``; sequence tasks).
    with_times: also yield ``time_seq`` and ``query_time`` (sequence tasks;
      see ``times.timed_rows``), for models whose attention reads timestamps.

  Returns:
    A MapDataset with ``len == steps_per_epoch(...)``; element ``step`` is
    rows ``[p * B, (p + 1) * B)`` (B = global_batch_size / process_count) of
    global batch ``step``: ``item_seq int32[B, L]``, ``targets int32[B, L]``
    (``[B, T]`` for 'window'), ``negatives int32[B, L or T, k]``,
    ``user int32[B]``; packed, ``R <= B`` rows of each plus ``segment_ids``
    and ``positions`` (see ``packing.pack_batch``); ``with_times``, also
    ``time_seq`` and ``query_time``, ``int32[B, L]``.
  """
  _check_choice("task", task, TASKS)
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  users, starts = _examples(dataset, task, num_targets)
  steps_per_epoch(dataset, task=task, global_batch_size=global_batch_size, max_len=max_len,
                  num_targets=num_targets)
  if pack_row_multiple and task == "window":
    raise ValueError("config key train.pack: packing needs a sequence task ('autoregressive' "
                     "or 'masked'), not 'window'.")
  if shared_negatives and (pack_row_multiple or task == "window"):
    raise ValueError("config key train.shared_negatives: one negative set per sequence needs "
                     "one sequence per row: a sequence task ('autoregressive' or 'masked'), "
                     "unpacked.")
  if (negative_cdf is not None or in_batch_negatives) and task == "window":
    raise ValueError("config key train.negative_sampling='popularity' or 'in_batch' needs a "
                     "sequence task ('autoregressive' or 'masked'); window models draw "
                     "uniform negatives.")
  if with_times:
    times_lib.check_task(task)
  if task == "window":
    build = functools.partial(
        _window_batch, table=_window_table(dataset), users=users, starts=starts,
        max_len=max_len, num_targets=num_targets, num_negatives=num_negatives, seed=seed,
        epoch=epoch)
  else:
    build = functools.partial(
        _train_batch, dataset=dataset, users=users, task=task, max_len=max_len,
        num_negatives=num_negatives, mask_prob=mask_prob, seed=seed, epoch=epoch,
        negative_cdf=negative_cdf, shared_negatives=shared_negatives,
        in_batch_negatives=in_batch_negatives, with_times=with_times)
  if pack_row_multiple:
    # Every example's input length: each process computes the global batch's
    # layout and loads the users of its own rows.
    # The training part is len - 2 items; autoregressive inputs drop its last.
    input_lengths = np.minimum(_lengths(dataset)[users] - (3 if task == "autoregressive" else 2),
                               max_len)
    make_batch = functools.partial(
        packing.packed_train_batch, make_batch=functools.partial(build, rows=slice(None)),
        input_lengths=input_lengths, max_len=max_len, row_multiple=pack_row_multiple,
        process_index=process_index, process_count=process_count)
  else:
    make_batch = functools.partial(
        build, rows=slice(process_index * local_batch, (process_index + 1) * local_batch))
  shuffle_seed = int(np.random.SeedSequence(_entropy(seed, epoch, _SHUFFLE_SALT))
                     .generate_state(1)[0])
  return (grain.MapDataset.range(len(users))
          .shuffle(seed=shuffle_seed)
          .batch(global_batch_size, drop_remainder=True)
          .map(make_batch))


def num_examples(dataset: builders.Dataset, *, task: str, num_targets: int = 1) -> int:
  """Number of training examples of ``task`` (users for the sequence tasks)."""
  return len(_examples(dataset, task, num_targets)[0])


def sampled_train_batches(dataset: builders.Dataset, *, task: str, max_len: int,
                          sample: Callable[[int], np.ndarray], num_rows: int, first_step: int,
                          num_steps: int, num_negatives: int, seed: int, mask_prob: float = 0.2,
                          process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Training batches whose examples are drawn per step (Poisson sampling, ``privacy``).

  Element ``i`` is global step ``s = first_step + i``: the examples
  ``sample(s)`` (indices into the task's examples, at most ``num_rows``),
  built as ``train_batches`` builds them (per-example draws seeded by ``(seed,
  s, example index)``) and followed by zero rows up to ``num_rows``; this
  process yields rows ``[p * R, (p + 1) * R)``, ``R = num_rows /
  process_count``. Never packed; sequence tasks only.

  Returns:
    A MapDataset of ``num_steps`` elements, the arrays of ``train_batches``
    plus ``weight float32[R]`` (1 for a sampled example, 0 for padding).
  """
  _check_choice("task", task, ("autoregressive", "masked"))
  local_rows = _local_batch_size(num_rows, process_index, process_count)
  users, _ = _examples(dataset, task, 1)

  def make_batch(index: int) -> dict[str, np.ndarray]:
    step = first_step + int(index)
    chosen = np.asarray(sample(step), np.int64)
    if len(chosen) > num_rows:
      raise ValueError(f"sampled {len(chosen)} examples for {num_rows} rows at step {step}.")
    mine = chosen[process_index * local_rows:(process_index + 1) * local_rows]
    built = _train_batch(mine, rows=slice(None), dataset=dataset, users=users, task=task,
                         max_len=max_len, num_negatives=num_negatives, mask_prob=mask_prob,
                         seed=seed, epoch=step)
    batch = {key: np.zeros((local_rows,) + value.shape[1:], value.dtype)
             for key, value in built.items()}
    for key, value in built.items():
      batch[key][:len(mine)] = value
    batch["weight"] = (np.arange(local_rows) < len(mine)).astype(np.float32)
    return batch

  return grain.MapDataset.range(num_steps).map(make_batch)


def eval_lengths(max_len: int, num_buckets: int) -> tuple[int, ...]:
  """Input lengths of the evaluation buckets: ``max_len``, its half, quarter, ...

  Args:
    max_len: L, the model's input length (the longest bucket).
    num_buckets: how many lengths, at most (1 = every batch at ``max_len``).

  Returns:
    Increasing distinct lengths ending with ``max_len``, e.g. ``(25, 50, 100,
    200)`` for ``(200, 4)``.
  """
  if num_buckets < 1:
    raise ValueError(f"config key eval.length_buckets: expected an int >= 1, got {num_buckets}.")
  return tuple(sorted({max(1, -(-max_len // 2**i)) for i in range(num_buckets)}))


def eval_batches(dataset: builders.Dataset, *, split: str, task: str, max_len: int,
                 batch_size: int, num_sampled_negatives: int = 100, sampling: str = "uniform",
                 seed: int = 0, length_buckets: int = 1, process_index: int = 0,
                 process_count: int = 1,
                 with_times: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation batches over every user once.

  Users are grouped by the length their model input needs: each group is cut
  to the shortest of ``eval_lengths(max_len, length_buckets)`` that holds its
  users' inputs (``task='window'`` inputs always keep ``max_len``). The
  models' outputs at the last position do not depend on the amount of left
  padding, so this only skips work on padding (benchmarks/README.md). Within
  a group users are ordered by history length (then id); the metrics are
  sums, so the order does not matter. A group's batches share one
  ``exclude`` width (its longest history, rounded up to a power of two), so
  that a pass compiles at most ``length_buckets`` shapes.

  Global batch ``b`` holds ``G = batch_size * process_count`` consecutive
  users of that order (a batch never mixes lengths); this process yields its
  rows ``[p * batch_size, (p + 1) * batch_size)``. A group's last batch is
  padded to full size with ``weight = 0`` rows. Users with fewer than 3 items
  (which ``preprocess`` never outputs) have no leave-one-out split: their rows
  keep ``weight = 0``, as SASRec skips them. Every process yields the same
  number of batches with the same shapes.

  Args:
    dataset: the per-user sequences.
    split: 'valid' (target ``seq[-2]``) or 'test' (target ``seq[-1]``).
    task: the model's training task; 'masked' puts the mask token
      ``num_items + 1`` in the last input slot.
    max_len: L, model input length.
    batch_size: rows per process.
    num_sampled_negatives: S, negatives per user for sampled metrics, drawn
      with replacement (as SASRec does) from the items outside the user's
      whole sequence.
    sampling: 'uniform', or 'popularity' (proportional to
      ``train_item_counts``).
    seed: negatives are a function of ``(seed, user)``.
    length_buckets: number of input lengths (``eval_lengths``); 1 = all at L.
    process_index: this process, in ``[0, process_count)``.
    process_count: processes sharing each global batch.
    with_times: also yield ``time_seq`` and ``query_time`` ``int32[B, L']``
      (``times.timed_rows``; the last input's query is at the target's time).

  Yields:
    ``item_seq int32[B, L']`` (``L' <= L``, one of the bucket lengths),
    ``target int32[B]``, ``exclude int32[B, H]`` (the history's distinct
    items other than the target, 0-padded; H is the length group's longest
    history rounded up to a power of two), ``sampled_negatives int32[B, S]``,
    ``user int32[B]``, ``weight float32[B]``.
  """
  _check_choice("split", split, SPLITS)
  _check_choice("task", task, TASKS)
  _check_choice("sampling", sampling, SAMPLINGS)
  if with_times:
    times_lib.check_task(task)
  _local_batch_size(batch_size * process_count, process_index, process_count)
  lengths = _lengths(dataset)
  # Leave-one-out needs a training part besides the two held-out items.
  has_split = lengths >= preprocess.MIN_SEQUENCE_LENGTH
  history_lengths = np.where(has_split, lengths - (2 if split == "valid" else 1), 0)
  input_lengths = np.minimum(history_lengths + (task == "masked"), max_len)
  bucket_lengths = np.asarray((max_len,) if task == "window"
                              else eval_lengths(max_len, length_buckets))
  bucket_of = np.searchsorted(bucket_lengths, input_lengths)  # smallest length that holds
  popularity_cdf = None
  if sampling == "popularity":
    popularity_cdf = np.cumsum(train_item_counts(dataset)).astype(np.float64)
  global_batch = batch_size * process_count
  for bucket, seq_len in enumerate(bucket_lengths):
    # By history length too, so that few batches need a wide `exclude`.
    bucket_users = np.flatnonzero(bucket_of == bucket)
    bucket_users = bucket_users[np.argsort(history_lengths[bucket_users], kind="stable")]
    if not len(bucket_users):
      continue
    # One width per group, a power of two: few shapes ever compile (each ~1 s
    # on CPU), while a wider scatter of excluded items costs little.
    width = max(int(history_lengths[bucket_users].max()), 1)
    width = 1 << (width - 1).bit_length()
    for start in range(0, len(bucket_users), global_batch):
      global_users = bucket_users[start:start + global_batch]
      local_users = global_users[process_index * batch_size:(process_index + 1) * batch_size]
      yield _eval_batch(dataset, local_users, split=split, task=task, seq_len=int(seq_len),
                        batch_size=batch_size, exclude_width=width, has_split=has_split,
                        num_sampled_negatives=num_sampled_negatives, seed=seed,
                        popularity_cdf=popularity_cdf, with_times=with_times)


def _eval_batch(dataset: builders.Dataset, users: np.ndarray, *, split: str, task: str,
                seq_len: int, batch_size: int, exclude_width: int, has_split: np.ndarray,
                num_sampled_negatives: int, seed: int,
                popularity_cdf: np.ndarray | None,
                with_times: bool = False) -> dict[str, np.ndarray]:
  """One process's evaluation rows for ``users`` (padded to ``batch_size``)."""
  batch = {
      "item_seq": np.zeros((batch_size, seq_len), np.int32),
      "target": np.zeros((batch_size,), np.int32),
      "exclude": np.zeros((batch_size, exclude_width), np.int32),
      "sampled_negatives": np.zeros((batch_size, num_sampled_negatives), np.int32),
      "user": np.zeros((batch_size,), np.int32),
      "weight": np.zeros((batch_size,), np.float32),
  }
  if with_times:
    batch.update(time_seq=np.zeros((batch_size, seq_len), np.int32),
                 query_time=np.zeros((batch_size, seq_len), np.int32))
  batch["user"][:len(users)] = users
  for row, (user, record) in enumerate(zip(users, _read(dataset.source, users), strict=True)):
    if not has_split[user]:
      continue
    seq = np.asarray(record["item_seq"])
    history, target = preprocess.split_eval(seq, split)
    batch["item_seq"][row] = eval_input(history, task=task, max_len=seq_len,
                                        num_items=dataset.num_items)
    if with_times:
      times = times_lib.record_times(record, len(seq))
      num_inputs = int(np.count_nonzero(batch["item_seq"][row]))
      # Through the target's: the request (the last input's query) happens then.
      inputs_time, query_time = times_lib.timed_rows(times[:len(history) + 1], num_inputs, task)
      batch["time_seq"][row, seq_len - num_inputs:] = inputs_time
      batch["query_time"][row, seq_len - num_inputs:] = query_time
    batch["target"][row] = target
    exclude = np.unique(history)
    exclude = exclude[exclude != target]
    batch["exclude"][row, :len(exclude)] = exclude
    rng = np.random.default_rng(_entropy(seed, user, _EVAL_SALT))
    seen = np.unique(seq)
    if popularity_cdf is None:
      sampled = negatives.sample_uniform(rng, dataset.num_items, seen, (num_sampled_negatives,))
    else:
      sampled = negatives.sample_popular(rng, popularity_cdf, seen, (num_sampled_negatives,))
    batch["sampled_negatives"][row] = sampled
    batch["weight"][row] = 1.0
  return batch


def train_item_counts(dataset: builders.Dataset) -> np.ndarray:
  """How often each item occurs in the training parts (``seq[:-2]``).

  Args:
    dataset: the per-user sequences.

  Returns:
    int64 ``[num_items + 1]``; entry 0 (padding) is 0.
  """
  counts = np.zeros(dataset.num_items + 1, np.int64)
  for record in _read(dataset.source, np.arange(dataset.num_users)):
    train = preprocess.split_train(np.asarray(record["item_seq"]))
    counts += np.bincount(train, minlength=dataset.num_items + 1)
  counts[0] = 0
  return counts


def _train_batch(indices: np.ndarray, *, rows: slice, dataset: builders.Dataset,
                 users: np.ndarray, task: str, max_len: int, num_negatives: int,
                 mask_prob: float, seed: int, epoch: int,
                 negative_cdf: np.ndarray | None = None,
                 shared_negatives: bool = False,
                 in_batch_negatives: bool = False,
                 with_times: bool = False) -> dict[str, np.ndarray]:
  """This process's rows of a global batch of sequence examples, one user at a time.

  For the 'autoregressive' and 'masked' tasks (one example per user); window
  examples are built by ``_window_batch``.
  """
  indices = np.asarray(indices)
  pool, records = None, None
  if in_batch_negatives:
    # Every process reads the whole global batch: the same pool for all, and
    # its own rows' records come from that one read.
    every_record = _read(dataset.source, users[indices])
    pool = _batch_items(every_record, task, max_len)
    records = every_record[rows]
  indices = indices[rows]
  size = len(indices)
  batch = {
      "item_seq": np.zeros((size, max_len), np.int32),
      "targets": np.zeros((size, max_len), np.int32),
      "negatives": np.zeros((size, 1 if shared_negatives else max_len, num_negatives),
                            np.int32),
      "user": np.zeros((size,), np.int32),
  }
  if with_times:
    batch.update(time_seq=np.zeros((size, max_len), np.int32),
                 query_time=np.zeros((size, max_len), np.int32))
  if records is None:
    records = _read(dataset.source, users[indices])
  for row, (index, record) in enumerate(zip(indices, records, strict=True)):
    user = int(users[index])
    seq = np.asarray(record["item_seq"])
    train = preprocess.split_train(seq)
    rng = np.random.default_rng(_entropy(seed, epoch, int(index), _TRAIN_SALT))
    if task == "autoregressive":
      window = train[-(max_len + 1):]
      inputs, targets = window[:-1], window[1:]
    else:
      inputs, targets = _mask(rng, train[-max_len:], mask_prob, dataset.num_items + 1)
    batch["user"][row] = user
    batch["item_seq"][row, max_len - len(inputs):] = inputs
    batch["targets"][row, max_len - len(targets):] = targets
    if with_times:
      times = preprocess.split_train(times_lib.record_times(record, len(seq)))
      inputs_time, query_time = times_lib.timed_rows(times, len(inputs), task)
      batch["time_seq"][row, max_len - len(inputs):] = inputs_time
      batch["query_time"][row, max_len - len(inputs):] = query_time
    has_target = batch["targets"][row] != 0
    # Only training items are known at training time; cold-start items are
    # never negatives either.
    seen = np.unique(train) if dataset.withheld_items is None else np.union1d(
        train, dataset.withheld_items)
    drawn_rows = (int(has_target.any()) if shared_negatives else int(has_target.sum()))
    shape = (drawn_rows, num_negatives)
    if pool is not None:
      drawn = pool[rng.integers(0, len(pool), size=shape)]
      drawn = np.where(np.isin(drawn, seen), 0, drawn)  # seen: ignored, not redrawn
    elif negative_cdf is None:
      drawn = negatives.sample_uniform(rng, dataset.num_items, seen, shape)
    else:
      drawn = negatives.sample_popular(rng, negative_cdf, seen, shape)
    if shared_negatives:
      batch["negatives"][row, :drawn_rows] = drawn
    else:
      batch["negatives"][row, has_target] = drawn
  return batch


def _batch_items(records: Sequence[Mapping[str, Any]], task: str, max_len: int) -> np.ndarray:
  """int64: the items the batch's examples train on (their targets' windows), with repeats."""
  keep = max_len + 1 if task == "autoregressive" else max_len
  items = [preprocess.split_train(np.asarray(record["item_seq"]))[-keep:]
           for record in records]
  pool = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(i, np.int64) for i in items])
  return pool if len(pool) else np.zeros(1, np.int64)  # no items: every draw is 0


def _window_batch(indices: np.ndarray, *, rows: slice, table: negatives.WindowTable,
                  users: np.ndarray, starts: np.ndarray, max_len: int, num_targets: int,
                  num_negatives: int, seed: int, epoch: int) -> dict[str, np.ndarray]:
  """This process's rows of one global batch of window examples, all at once.

  Example ``i`` of user ``u`` starting at ``s`` has the inputs
  ``train[max(s - max_len, 0):s]`` (left-padded to ``max_len``) and the targets
  ``train[s:s + num_targets]``, as ``_train_batch`` would build them.
  """
  indices = np.asarray(indices)[rows]
  user, start = users[indices], starts[indices]
  first_target = table.train_offsets[user] + start  # [B], into train_items
  back = np.arange(-max_len, 0)
  has_input = start[:, None] + back >= 0  # [B, max_len]
  item_seq = np.where(has_input, table.train_items[np.where(has_input, first_target[:, None]
                                                            + back, 0)], 0)
  targets = table.train_items[first_target[:, None] + np.arange(num_targets)]
  key = int(np.random.SeedSequence(_entropy(seed, epoch, _WINDOW_SALT))
            .generate_state(1, np.uint64)[0])
  drawn = negatives.window_negatives(table, user, indices, (num_targets, num_negatives), key)
  return {"item_seq": item_seq.astype(np.int32), "targets": targets.astype(np.int32),
          "negatives": drawn.astype(np.int32), "user": user.astype(np.int32)}


def _window_table(dataset: builders.Dataset) -> negatives.WindowTable:
  """The `negatives.WindowTable` of every user's sequence in ``dataset``."""
  records = _read(dataset.source, np.arange(dataset.num_users))
  return negatives.WindowTable.from_sequences(
      [np.asarray(record["item_seq"], np.int64) for record in records], dataset.num_items)


def _mask(rng: np.random.Generator, items: np.ndarray, mask_prob: float,
          mask_token: int) -> tuple[np.ndarray, np.ndarray]:
  """BERT4Rec cloze: (inputs with masks, targets at masked positions else 0)."""
  masked = rng.random(len(items)) < mask_prob
  if not masked.any():
    masked[-1] = True  # Evaluation asks about the last slot; train it too.
  return np.where(masked, mask_token, items), np.where(masked, items, 0)


def _examples(dataset: builders.Dataset, task: str,
              num_targets: int) -> tuple[np.ndarray, np.ndarray]:
  """``(user, start)`` of every training example, in a fixed order.

  ``start`` is the position of the first target inside the training part for
  'window' examples and 0 otherwise; the example index into these arrays
  seeds the example's random draws.
  """
  _check_choice("task", task, TASKS)
  train_lengths = np.maximum(_lengths(dataset) - 2, 0)
  if task == "autoregressive":
    users = np.flatnonzero(train_lengths >= 2)
    return users, np.zeros_like(users)
  if task == "masked":
    users = np.flatnonzero(train_lengths >= 1)
    return users, np.zeros_like(users)
  if num_targets < 1:
    raise ValueError(f"num_targets must be >= 1, got {num_targets}.")
  # Windows need >= 1 input item and all T targets: starts 1..len - T.
  counts = np.maximum(train_lengths - num_targets, 0)
  users = np.repeat(np.arange(len(counts)), counts)
  offsets = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
  return users, 1 + offsets


def _read(source: Sequence[Mapping[str, Any]], users: np.ndarray) -> list[Mapping[str, Any]]:
  """``[source[u] for u in users]``, in one call where the source supports it."""
  users = [int(u) for u in users]
  getitems = getattr(source, "__getitems__", None)
  if getitems is None:
    return [source[u] for u in users]
  return list(getitems(users))


def _lengths(dataset: builders.Dataset) -> np.ndarray:
  """int64 ``[num_users]`` sequence lengths (read from the records if not stored)."""
  if dataset.lengths is not None:
    return np.asarray(dataset.lengths, np.int64)
  return np.array([len(dataset.source[i]["item_seq"]) for i in range(dataset.num_users)],
                  np.int64)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} must be a positive multiple of the "
                     f"{process_count} processes.")
  return global_batch_size // process_count


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r}; expected one of {', '.join(choices)}.")


def _entropy(*values: int) -> list[int]:
  """Non-negative seed words for ``np.random.SeedSequence`` (negative seeds wrap)."""
  return [int(v) % 2**64 for v in values]
