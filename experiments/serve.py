r"""Serves an exported artifact over HTTP (JSON), with micro-batching.

  python -m experiments.serve --artifact=/tmp/sasrec_artifact --port=8000 \
      [--host=127.0.0.1] [--max_batch=64] [--max_wait_ms=2] [--warmup]

  curl -s localhost:8000/healthz
  curl -s -XPOST localhost:8000/recommend -d '{"history": [1193, 661, 914], "k": 10}'

``POST /recommend`` takes ``{"history": [...], "k": 10}`` or ``{"histories":
[[...], ...], "k": 10}`` in original item ids (Caser: also ``"user"`` or
``"users"``); see deeprec_jax/serving/server.py and docs/serving.md for the
answers and error codes. The loader and the server need jax and numpy, not
the model or data code. With ``--port=0`` a free port is picked; the first
line printed is JSON with the URL. JAX's persistent compilation cache
(``--jax_cache_dir``, see experiments/cli.py) makes the warm-up of a restart
fast.
"""

import json
import signal
import threading
import time

from absl import app, flags, logging

from deeprec_jax import serving
from deeprec_jax.serving import artifact as artifact_lib
from deeprec_jax.serving import server as server_lib
from experiments import cli

_ARTIFACT = flags.DEFINE_string("artifact", None, "Directory written by experiments.export.",
                                required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: all).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", server_lib.DEFAULT_MAX_BATCH,
                                  "Most rows scored in one call (requests are batched).")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", server_lib.DEFAULT_MAX_WAIT_S * 1e3,
                                  "How long a batch waits for more requests.")
_MAX_HISTORIES = flags.DEFINE_integer("max_histories", server_lib.DEFAULT_MAX_HISTORIES,
                                      "Most histories in one request.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every batch size and exclusion width "
                            "before serving (the first requests are then not slow).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # The artifact's own batch limit must not cut the server's batches.
  artifact = serving.load(_ARTIFACT.value,
                          max_batch=max(_MAX_BATCH.value, artifact_lib.DEFAULT_MAX_BATCH))
  if _WARMUP.value:
    start = time.perf_counter()
    shapes = artifact.warm_up(_MAX_BATCH.value)
    logging.info("compiled %d shapes in %.1f s", shapes, time.perf_counter() - start)
  server = server_lib.make_server(artifact, host=_HOST.value, port=_PORT.value,
                                  max_batch=_MAX_BATCH.value,
                                  max_wait_s=_MAX_WAIT_MS.value / 1e3,
                                  max_histories=_MAX_HISTORIES.value)
  # SIGTERM stops like Ctrl-C; shutdown() must come from another thread.
  signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
  print(json.dumps({"url": server.url, "model": artifact.model,
                    "platforms": list(artifact.platforms), "top_k": artifact.top_k}),
        flush=True)
  logging.info("serving %s on %s", artifact.model, server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    server.batcher.close()


if __name__ == "__main__":
  cli.run(main)
