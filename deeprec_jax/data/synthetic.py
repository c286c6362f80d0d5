"""The embedded default dataset: users walking a Markov chain over item clusters.

Items are split at random into `num_clusters` latent clusters of (nearly)
equal size. Every user walks the same sparse Markov chain over clusters, and
at each step picks an item of the current cluster that they have not had yet:

* the chain: each cluster has `_NUM_SUCCESSORS` likely next clusters, with
  probabilities `_SUCCESSOR_WEIGHTS` (shared by all users), so the next
  item's cluster is predictable from the current item's cluster;
* teleports: with probability `_TELEPORT` a step leaves the chain instead,
  half the time to one of the user's `_NUM_FAVOURITES` favourite clusters (a
  per-user preference that only the whole history reveals), otherwise to a
  cluster drawn by global cluster popularity;
* items: within a cluster, a Zipf-like popularity skew (exponent
  `_ZIPF_EXPONENT`), so item popularity alone is a weak but real signal;
  a user never repeats an item (as in MovieLens, where evaluation leaves the
  history out of the ranking);
* lengths: `_MIN_LENGTH` plus a geometric number of extra steps, with mean
  `mean_length`, capped at half the catalogue.

With these constants the most likely next cluster has probability ~0.65, and
on the default size (2000 users, 500 items, 20 clusters, mean 30; ~60k
interactions) a first-order item Markov model counted on the training parts
gets leave-one-out NDCG@10 (full ranking, history excluded) of ~0.28 against
popularity's ~0.09-0.11 (seeds 0-4; tests/test_synthetic.py checks the margin).
The default SASRec learns it within the main job's minute (README).
"""

import numpy as np

from deeprec_jax.data import sources

_NUM_SUCCESSORS = 3  # likely next clusters of each cluster
_SUCCESSOR_WEIGHTS = (0.75, 0.15, 0.10)  # their probabilities, given no teleport
_TELEPORT = 0.15  # probability that a step leaves the chain
_NUM_FAVOURITES = 2  # favourite clusters per user (half of the teleports go there)
_ZIPF_EXPONENT = 1.0  # popularity skew of items within a cluster
_CLUSTER_ZIPF_EXPONENT = 0.5  # popularity skew of clusters (teleports, first steps)
_MIN_LENGTH = 5  # shortest user history
_START_TIME = 1_600_000_000  # Unix time of the earliest possible interaction


def _zipf(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
  """Probabilities proportional to 1 / rank**exponent, ranks in random order."""
  weights = 1.0 / (1.0 + rng.permutation(n)) ** exponent
  return weights / weights.sum()


def _draw(cdf: np.ndarray, u: float) -> int:
  """Index drawn from a cumulative distribution with the uniform number `u`."""
  return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)


def _clusters(rng: np.random.Generator, num_items: int, num_clusters: int) -> np.ndarray:
  """The latent cluster of each item (index = id - 1): the generator's first draw."""
  return rng.permutation(num_items) % num_clusters


def item_clusters(num_items: int, num_clusters: int, seed: int) -> np.ndarray:
  """``int64[num_items]``: the cluster ``generate(..., seed=seed)`` puts item ``i + 1`` in."""
  return _clusters(np.random.default_rng(seed), num_items, num_clusters).astype(np.int64)


def generate(
    num_users: int, num_items: int, num_clusters: int, mean_length: int, seed: int
) -> sources.Interactions:
  """Generates interactions with a planted sequential (cluster Markov) structure.

  Args:
    num_users: users, each one walk; ids 1..num_users.
    num_items: catalogue size; ids 1..num_items.
    num_clusters: latent item clusters, 1..num_items.
    mean_length: average interactions per user, >= 5.
    seed: numpy Generator seed; equal arguments give equal data.

  Returns:
    Interactions (no ratings), rows grouped by user in chronological order,
    distinct Unix-like timestamps within each user.

  Raises:
    ValueError: an argument out of range (the message names it).
  """
  for name, value, low in (
      ("num_users", num_users, 1),
      ("num_items", num_items, 2 * _MIN_LENGTH),  # room for histories without repeats
      ("num_clusters", num_clusters, 1),
      ("mean_length", mean_length, _MIN_LENGTH),
  ):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if num_clusters > num_items:
    raise ValueError(f"num_clusters must be <= num_items ({num_items}), got {num_clusters}")
  rng = np.random.default_rng(seed)

  cluster_of = _clusters(rng, num_items, num_clusters)
  members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
  item_cdfs = [np.cumsum(_zipf(len(m), _ZIPF_EXPONENT, rng)) for m in members]
  item_popularity = np.zeros(num_items)
  for m, cdf in zip(members, item_cdfs, strict=True):
    item_popularity[m] = np.diff(cdf, prepend=0.0)
  cluster_popularity = _zipf(num_clusters, _CLUSTER_ZIPF_EXPONENT, rng)

  # The shared chain: a few likely successors per cluster.
  num_successors = min(_NUM_SUCCESSORS, num_clusters)
  chain = np.zeros((num_clusters, num_clusters))
  for c in range(num_clusters):
    successors = rng.choice(num_clusters, size=num_successors, replace=False)
    chain[c, successors] = _SUCCESSOR_WEIGHTS[:num_successors]
  chain /= chain.sum(axis=1, keepdims=True)

  # Geometric extra length with mean mean_length - _MIN_LENGTH (0 when equal).
  extra_mean = mean_length - _MIN_LENGTH
  extra = rng.geometric(1.0 / (extra_mean + 1), size=num_users) - 1
  lengths = np.minimum(_MIN_LENGTH + extra, num_items // 2)

  users, items, timestamps = [], [], []
  for user in range(num_users):
    favourites = rng.choice(num_clusters, size=min(_NUM_FAVOURITES, num_clusters), replace=False)
    teleport = 0.5 * cluster_popularity
    teleport[favourites] += 0.5 / len(favourites)
    transition_cdfs = np.cumsum((1 - _TELEPORT) * chain + _TELEPORT * teleport, axis=1)
    teleport_cdf = np.cumsum(teleport)

    length = int(lengths[user])
    uniforms = rng.random((length, 2))
    seen = set()
    sequence = []
    cluster = _draw(teleport_cdf, uniforms[0, 0])
    for step in range(length):
      if step:
        cluster = _draw(transition_cdfs[cluster], uniforms[step, 0])
      item = members[cluster][_draw(item_cdfs[cluster], uniforms[step, 1])]
      if item in seen:
        # Draw again among the cluster's unseen items; if there are none, among
        # all unseen items, both by popularity.
        candidates = np.array([i for i in members[cluster] if i not in seen])
        if not len(candidates):
          candidates = np.array([i for i in range(num_items) if i not in seen])
        weights = item_popularity[candidates]
        item = candidates[_draw(np.cumsum(weights), rng.random())]
      seen.add(item)
      sequence.append(item)
    users.append(np.full(length, user + 1, dtype=np.int64))
    items.append(np.array(sequence, dtype=np.int64) + 1)
    start = _START_TIME + rng.integers(0, 180 * 86_400)
    timestamps.append(start + np.cumsum(rng.integers(60, 3 * 86_400, size=length)))

  return sources.Interactions(
      user=np.concatenate(users),
      item=np.concatenate(items),
      timestamp=np.concatenate(timestamps).astype(np.int64),
  )
