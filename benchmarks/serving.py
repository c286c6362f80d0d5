r"""Latency and throughput of a serving artifact and of its HTTP server.

  python -m benchmarks.serving --out=/tmp/bench_serving [--quick]
      [--batch_sizes=1,2,4,...,512] [--clients=1,8,32] [--requests_per_client=25]

The model is SASRec at its ML-1M shape (``experiments/configs/sasrec.py:ml-1m``:
3,416 items, maxlen 200, d 50, 2 blocks, 1 head) with **random initial
params** (timing does not depend on the values), exported by
``serving.exporter.write_artifact`` and loaded by ``serving.load``. Histories
are drawn with ML-1M's lengths (log-normal around the median 96, clipped to
[2, 2,314]), so inputs are left-padded and the exclusion lists as long as in
the real data.

* ``artifact``: for each batch size, ``Artifact.recommend(histories, k=10)``
  end to end (id mapping, input building, the compiled call, back to
  original ids) and the compiled call alone on the same arrays; p50/p90/p99
  over the samples, throughput = batch / p50. Every shape the samples need
  is compiled before timing (``compile_s`` is that warm-up).
* ``server``: ``serving.server`` on a loopback port, ``C`` client threads
  each sending ``R`` single-history requests back to back over a kept-alive
  connection; per-request latency p50/p90/p99 and requests/s over the whole
  run, with micro-batching (``max_batch``) and without (``max_batch=1``).
  ``Artifact.warm_up`` compiles every batch size and exclusion width first,
  as ``experiments.serve --warmup`` does (``warmup_s``); shapes still
  compiled during the timed pass are counted (``new_shapes``, 0 expected).

Every row records the 1-minute load average before and after
(``os.getloadavg()``). Writes ``<out>/serving.json`` and ``<out>/serving.md``.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks import environment, harness, inputs, kernels
from deeprec_jax import models
from deeprec_jax.serving import artifact as artifact_lib
from deeprec_jax.serving import exporter, server

ML1M_LONGEST_HISTORY = 2314
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
QUICK_BATCH_SIZES = (1, 16, 128)
K = 10

_OUT = flags.DEFINE_string("out", None, "Directory for serving.json and serving.md.",
                           required=True)
_QUICK = flags.DEFINE_bool("quick", False, "Three batch sizes, few samples, light load.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", [], "Artifact batch sizes (default 1..512).")
_CLIENTS = flags.DEFINE_list("clients", [], "Server client threads (default 1,8,32).")
_REQUESTS = flags.DEFINE_integer("requests_per_client", 0,
                                 "Requests per client thread (default 25; 5 with --quick).")
_SECONDS = flags.DEFINE_float("seconds_per_size", 0.0,
                              "Timing budget per batch size (default 4 s; 1 with --quick).")


def _load() -> float:
  load = environment.load_average()
  return load[0] if load else float("nan")


def histories(count: int, seed: int = 0) -> list[list[int]]:
  """``count`` histories of model ids ``1..3416`` with ML-1M's lengths."""
  rng = np.random.default_rng(seed)
  lengths = np.exp(rng.normal(np.log(inputs.ML1M_MEDIAN_LENGTH), 0.9, size=count))
  lengths = np.clip(lengths.astype(np.int64), 2, ML1M_LONGEST_HISTORY)
  return [rng.integers(1, inputs.ML1M_ITEMS + 1, size=n).tolist() for n in lengths]


def export_sasrec(directory: str) -> dict[str, Any]:
  """Exports SASRec at its ML-1M shape with random initial params; returns the manifest."""
  config = kernels.ml1m_config("sasrec")
  model = models.create_model(config.model, num_items=inputs.ML1M_ITEMS,
                              num_users=inputs.ML1M_USERS, max_len=config.data.max_len)
  item_seq = np.zeros((1, config.data.max_len), np.int32)
  params = model.init(jax.random.PRNGKey(0), item_seq, user=np.zeros((1,), np.int32))["params"]
  item_ids = np.arange(inputs.ML1M_ITEMS + 1, dtype=np.int64)
  item_ids[0] = -1  # Original ids = model ids here; the map is still applied.
  return exporter.write_artifact(
      directory, model=model, params=params, model_name="sasrec", task="autoregressive",
      num_items=inputs.ML1M_ITEMS, item_ids=item_ids,
      user_ids=np.arange(inputs.ML1M_USERS, dtype=np.int64), max_len=config.data.max_len,
      top_k=100, config=config, source="random init (benchmarks.serving)",
      longest_history=ML1M_LONGEST_HISTORY)


def _stats(samples: Sequence[float]) -> dict[str, float]:
  return {"p50_s": harness.percentile(samples, 50), "p90_s": harness.percentile(samples, 90),
          "p99_s": harness.percentile(samples, 99), "mean_s": float(np.mean(samples)),
          "samples": len(samples)}


def bench_artifact(artifact: artifact_lib.Artifact, batch_size: int, pool: list[list[int]], *,
                   seconds: float, min_samples: int, max_samples: int,
                   seed: int) -> dict[str, Any]:
  """One row: ``recommend`` end to end and the compiled call alone at ``batch_size``.

  The call alone is ``jax.jit(artifact.exported.call)`` on the arrays of one
  batch, with the params already on the device, timed to
  ``jax.block_until_ready``.
  """
  rng = np.random.default_rng(seed)
  batches = [[pool[i] for i in rng.integers(0, len(pool), size=batch_size)]
             for _ in range(max_samples)]
  load_before = _load()
  start = time.perf_counter()
  shapes_before = set(artifact.shapes_run)
  seen: set[int] = set()
  for batch in batches:  # Compile every shape the samples need (one batch per width).
    width = artifact_lib.exclude_width(max(map(len, batch)))
    if width not in seen:
      seen.add(width)
      artifact.recommend(batch, K)
  compile_s = time.perf_counter() - start
  new_shapes = len(artifact.shapes_run - shapes_before)

  samples: list[float] = []
  deadline = time.perf_counter() + seconds
  for batch in batches:
    if len(samples) >= min_samples and time.perf_counter() > deadline:
      break
    begin = time.perf_counter()
    artifact.recommend(batch, K)
    samples.append(time.perf_counter() - begin)

  # The compiled call alone on one batch's arrays (what a device sees).
  rows = artifact.encode(batches[0])
  width = artifact_lib.exclude_width(max(len(r.exclude) for r in rows))
  item_seq = np.stack([r.item_seq for r in rows])
  exclude = np.zeros((batch_size, width), np.int32)
  for i, r in enumerate(rows):
    exclude[i, :len(r.exclude)] = r.exclude
  user = np.zeros((batch_size,), np.int32)
  call, params = _compiled_call(artifact)
  jax.block_until_ready(call(params, item_seq, exclude, user))
  call_samples = []
  for _ in range(max(min_samples, min(len(samples), 50))):
    begin = time.perf_counter()
    jax.block_until_ready(call(params, item_seq, exclude, user))
    call_samples.append(time.perf_counter() - begin)
  stats = _stats(samples)
  return {"group": "artifact", "batch_size": batch_size, **stats,
          "throughput_per_s": batch_size / stats["p50_s"],
          "call_p50_s": harness.percentile(call_samples, 50),
          "call_p99_s": harness.percentile(call_samples, 99),
          "compile_s": compile_s, "new_shapes": new_shapes,
          "load_1m_before": load_before, "load_1m_after": _load()}


_CALLS: dict[int, tuple[Any, dict[str, jax.Array]]] = {}


def _compiled_call(artifact: artifact_lib.Artifact) -> tuple[Any, dict[str, jax.Array]]:
  """One ``jax.jit`` of the exported call per artifact, and its params on the device."""
  if id(artifact) not in _CALLS:
    with np.load(os.path.join(artifact.directory, artifact_lib.PARAMS)) as stored:
      params = jax.device_put({name: stored[name] for name in stored.files})
    _CALLS[id(artifact)] = (jax.jit(artifact.exported.call), params)
  return _CALLS[id(artifact)]


def _client(url: str, bodies: list[bytes], latencies: list[float], errors: list[str]) -> None:
  host, port = url.removeprefix("http://").split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=120)
  try:
    for body in bodies:
      begin = time.perf_counter()
      connection.request("POST", "/recommend", body=body,
                         headers={"Content-Type": "application/json"})
      response = connection.getresponse()
      payload = response.read()
      latencies.append(time.perf_counter() - begin)
      if response.status != 200:
        errors.append(payload.decode()[:200])
  finally:
    connection.close()


def _load_run(url: str, clients: int, bodies: list[list[bytes]]) -> tuple[list[float], float,
                                                                            list[str]]:
  latencies: list[list[float]] = [[] for _ in range(clients)]
  errors: list[str] = []
  threads = [threading.Thread(target=_client, args=(url, bodies[c], latencies[c], errors))
             for c in range(clients)]
  start = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return [x for c in latencies for x in c], time.perf_counter() - start, errors


def bench_server(artifact: artifact_lib.Artifact, pool: list[list[int]], *, clients: int,
                 requests_per_client: int, max_batch: int, max_wait_s: float,
                 seed: int) -> dict[str, Any]:
  """One row: ``clients`` threads, ``requests_per_client`` single-history requests each."""
  rng = np.random.default_rng(seed)

  def bodies() -> list[list[bytes]]:
    return [[json.dumps({"history": pool[i], "k": K}).encode()
             for i in rng.integers(0, len(pool), size=requests_per_client)]
            for _ in range(clients)]

  start = time.perf_counter()
  artifact.warm_up(max_batch)  # Every batch size and exclusion width, as experiments.serve.
  warmup_s = time.perf_counter() - start
  httpd = server.make_server(artifact, port=0, max_batch=max_batch, max_wait_s=max_wait_s)
  httpd.start()
  try:
    _load_run(httpd.url, min(clients, 2), bodies()[:2])  # Threads, sockets, caches.
    stats_before = dict(httpd.batcher.stats)
    shapes_before = set(artifact.shapes_run)
    load_before = _load()
    latencies, wall, errors = _load_run(httpd.url, clients, bodies())
    load_after = _load()
    stats = {key: httpd.batcher.stats[key] - stats_before[key] for key in stats_before}
  finally:
    httpd.close()
  if errors:
    raise RuntimeError(f"server answered errors under load: {errors[:3]}")
  return {"group": "server", "clients": clients, "requests": len(latencies),
          "max_batch": max_batch, "max_wait_ms": max_wait_s * 1e3, **_stats(latencies),
          "throughput_per_s": len(latencies) / wall, "wall_s": wall,
          "mean_rows_per_batch": stats["rows"] / max(stats["batches"], 1),
          "batches": stats["batches"], "warmup_s": warmup_s,
          "new_shapes": len(artifact.shapes_run - shapes_before),
          "load_1m_before": load_before, "load_1m_after": load_after}


def markdown(results: dict[str, Any]) -> str:
  env = results["environment"]
  lines = [
      "# Serving benchmark (SASRec, ML-1M shape, random init)", "",
      f"{env['cpu_model']}, {env['cpu_count']} CPUs, {env['platform']}, jax {env['jax']}, "
      f"{env['date']}; platforms exported: {', '.join(results['manifest']['platforms'])}; "
      f"export {results['export_s']:.1f} s, load {results['load_s']:.2f} s.", "",
      "| batch | p50 ms | p90 ms | p99 ms | histories/s | call p50 ms | samples | load |",
      "|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    if r["group"] == "artifact":
      lines.append(f"| {r['batch_size']} | {r['p50_s'] * 1e3:.1f} | {r['p90_s'] * 1e3:.1f} | "
                   f"{r['p99_s'] * 1e3:.1f} | {r['throughput_per_s']:.0f} | "
                   f"{r['call_p50_s'] * 1e3:.1f} | {r['samples']} | "
                   f"{r['load_1m_before']:.1f}-{r['load_1m_after']:.1f} |")
  lines += ["", "| clients | max_batch | requests | p50 ms | p90 ms | p99 ms | requests/s | "
            "rows/batch | new shapes | load |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    if r["group"] == "server":
      lines.append(f"| {r['clients']} | {r['max_batch']} | {r['requests']} | "
                   f"{r['p50_s'] * 1e3:.1f} | {r['p90_s'] * 1e3:.1f} | {r['p99_s'] * 1e3:.1f} | "
                   f"{r['throughput_per_s']:.1f} | {r['mean_rows_per_batch']:.1f} | "
                   f"{r['new_shapes']} | {r['load_1m_before']:.1f}-{r['load_1m_after']:.1f} |")
  return "\n".join(lines) + "\n"


def run(out: str, *, quick: bool = False, batch_sizes: Sequence[int] = (),
        clients: Sequence[int] = (), requests_per_client: int = 0,
        seconds_per_size: float = 0.0) -> dict[str, Any]:
  """Exports, loads and times the artifact and the server; writes the results."""
  batch_sizes = tuple(batch_sizes) or (QUICK_BATCH_SIZES if quick else BATCH_SIZES)
  clients = tuple(clients) or ((1, 8) if quick else (1, 8, 32))
  requests_per_client = requests_per_client or (5 if quick else 25)
  seconds = seconds_per_size or (1.0 if quick else 4.0)
  env = environment.collect()
  os.makedirs(out, exist_ok=True)
  directory = os.path.join(out, "artifact")
  start = time.perf_counter()
  manifest = export_sasrec(directory)
  export_s = time.perf_counter() - start
  start = time.perf_counter()
  artifact = artifact_lib.load(directory, max_batch=max(batch_sizes))
  load_s = time.perf_counter() - start
  pool = histories(4096)
  rows = []
  for size in batch_sizes:
    row = bench_artifact(artifact, size, pool, seconds=seconds, min_samples=5 if quick else 20,
                         max_samples=20 if quick else 200, seed=size)
    logging.info("artifact batch %d: p50 %.1f ms, p99 %.1f ms, %.0f histories/s", size,
                 row["p50_s"] * 1e3, row["p99_s"] * 1e3, row["throughput_per_s"])
    rows.append(row)
  settings = [(c, server.DEFAULT_MAX_BATCH) for c in clients] + [(max(clients), 1)]
  for num_clients, max_batch in settings:
    row = bench_server(artifact, pool, clients=num_clients,
                       requests_per_client=requests_per_client, max_batch=max_batch,
                       max_wait_s=server.DEFAULT_MAX_WAIT_S, seed=num_clients)
    logging.info("server %d clients, max_batch %d: p50 %.1f ms, p99 %.1f ms, %.1f req/s",
                 num_clients, max_batch, row["p50_s"] * 1e3, row["p99_s"] * 1e3,
                 row["throughput_per_s"])
    rows.append(row)
  env["load_average_end"] = environment.load_average()
  results = {"schema_version": 1, "quick": quick, "environment": env, "manifest": manifest,
             "export_s": export_s, "load_s": load_s, "k": K, "rows": rows}
  with open(os.path.join(out, "serving.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, "serving.md"), "w", encoding="utf-8") as f:
    f.write(markdown(results))
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  results = run(_OUT.value, quick=_QUICK.value,
                batch_sizes=[int(b) for b in _BATCH_SIZES.value],
                clients=[int(c) for c in _CLIENTS.value],
                requests_per_client=_REQUESTS.value, seconds_per_size=_SECONDS.value)
  print(markdown(results))


if __name__ == "__main__":
  app.run(main)
