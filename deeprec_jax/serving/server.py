"""An HTTP JSON endpoint for an artifact, with micro-batching (standard library only).

``POST /recommend`` takes ``{"history": [ids...], "k": 10}`` or
``{"histories": [[ids...], ...], "k": 10}`` (original item ids, oldest
first; optional ``"exclude_seen": true``; Caser needs ``"user": id`` or
``"users": [ids...]``) and answers ``{"recommendations": [{"item": id,
"score": s}, ...]}`` (a list of such lists for ``histories``). Errors are
JSON ``{"error": message}``: 400 for malformed requests (bad JSON, wrong
types, ``k`` outside ``[1, top_k]``), 422 for unknown item or user ids
(listed in ``unknown_items`` / ``unknown_users``), 404/405 for other paths and
methods, 411/413 for a missing length or an oversized body. ``GET /healthz``
reports the model and the batching counters.

Requests are queued; one worker thread takes the first, gathers what else
arrives within ``max_wait_s`` up to ``max_batch`` rows, and scores them in one
call (``Artifact.score`` pads the batch to a power of two, so at most
``log2(max_batch) + 1`` batch shapes are compiled).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import queue
import threading
import time
import urllib.parse
from collections.abc import Sequence
from http import server as http_server
from typing import Any

from absl import logging

from deeprec_jax.serving import artifact as artifact_lib

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_WAIT_S = 0.002
DEFAULT_MAX_HISTORIES = 1024
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DEFAULT_TIMEOUT_S = 60.0
_FIELDS = ("history", "histories", "k", "user", "users", "exclude_seen")
_STOP = object()


class RequestError(Exception):
  """A request the server refuses: HTTP ``status`` and a JSON body."""

  def __init__(self, status: int, message: str, **details: Any):
    super().__init__(message)
    self.status = status
    self.body = {"error": message, **details}


@dataclasses.dataclass
class _Job:
  rows: list[artifact_lib.Row]
  k: int
  future: concurrent.futures.Future


class MicroBatcher:
  """Scores queued requests together: one worker thread, ``max_batch`` rows a call.

  Attributes:
    stats: counters: ``requests``, ``batches``, ``rows`` (real rows scored)
      and ``padded_rows`` (rows of the calls, padding included).
  """

  def __init__(self, artifact: artifact_lib.Artifact, *, max_batch: int = DEFAULT_MAX_BATCH,
               max_wait_s: float = DEFAULT_MAX_WAIT_S, start: bool = True):
    if max_batch < 1 or max_wait_s < 0:
      raise ValueError(f"max_batch={max_batch}, max_wait_s={max_wait_s}: expected a positive "
                       "batch size and a wait >= 0.")
    self.artifact = artifact
    self.max_batch = int(max_batch)
    self.max_wait_s = float(max_wait_s)
    self.stats = {"requests": 0, "batches": 0, "rows": 0, "padded_rows": 0}
    self._queue: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
    if start:
      self.start()

  def start(self) -> None:
    """Starts the worker (once)."""
    if not self._thread.is_alive():
      self._thread.start()

  def submit(self, rows: Sequence[artifact_lib.Row], k: int) -> concurrent.futures.Future:
    """Queues ``rows``; the future's result is ``Artifact.score(rows, k)``."""
    job = _Job(list(rows), int(k), concurrent.futures.Future())
    self._queue.put(job)
    return job.future

  def close(self, timeout: float | None = 10.0) -> None:
    """Stops the worker after the queued jobs."""
    self._queue.put(_STOP)
    if self._thread.is_alive():
      self._thread.join(timeout)

  def _loop(self) -> None:
    carry = None
    while True:
      job = carry if carry is not None else self._queue.get()
      carry = None
      if job is _STOP:
        return
      jobs, rows = [job], len(job.rows)
      deadline = time.monotonic() + self.max_wait_s
      while rows < self.max_batch:
        remaining = deadline - time.monotonic()
        try:  # What is queued already joins at once; then wait up to the deadline.
          nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
        except queue.Empty:
          break
        if nxt is _STOP or rows + len(nxt.rows) > self.max_batch:
          carry = nxt
          break
        jobs.append(nxt)
        rows += len(nxt.rows)
      self._run(jobs)

  def _run(self, jobs: list[_Job]) -> None:
    rows = [row for job in jobs for row in job.rows]
    try:
      results = self.artifact.score(rows, max(job.k for job in jobs),
                                    max_batch=self.max_batch)
    except Exception as e:  # Handed to every waiting request, never lost.
      for job in jobs:
        job.future.set_exception(e)
      return
    with self._lock:
      self.stats["requests"] += len(jobs)
      self.stats["rows"] += len(rows)
      for start in range(0, len(rows), self.max_batch):
        self.stats["batches"] += 1
        self.stats["padded_rows"] += artifact_lib.bucket(
            min(len(rows) - start, self.max_batch), self.max_batch)
    start = 0
    for job in jobs:
      job.future.set_result([top[:job.k] for top in results[start:start + len(job.rows)]])
      start += len(job.rows)


def _ids(value: Any, where: str) -> list[int]:
  if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int)
                                        for v in value):
    raise RequestError(400, f"{where}: expected a list of integer ids, got {value!r:.200}")
  return value


def _id(value: Any, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(400, f"{where}: expected an integer id, got {value!r:.200}")
  return value


def parse_request(artifact: artifact_lib.Artifact, body: bytes, *,
                  max_histories: int = DEFAULT_MAX_HISTORIES
                  ) -> tuple[list[artifact_lib.Row], int, bool]:
  """Validates and encodes a ``/recommend`` body.

  Returns:
    ``(rows, k, single)``; ``single`` when the request gave ``history``.

  Raises:
    RequestError: 400 for a malformed request, 413 for too many histories,
      422 for ids the artifact does not know.
  """
  try:
    payload = json.loads(body)
  except ValueError as e:
    raise RequestError(400, f"request body is not valid JSON: {e}") from None
  if not isinstance(payload, dict):
    raise RequestError(400, 'expected a JSON object such as {"history": [1, 2, 3], "k": 10}')
  unknown = sorted(set(payload) - set(_FIELDS))
  if unknown:
    raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; expected some of "
                       f"{', '.join(_FIELDS)}")
  single = "history" in payload
  if single == ("histories" in payload):
    raise RequestError(400, 'give exactly one of "history" (a list of item ids) or '
                       '"histories" (a list of such lists)')
  if single:
    histories = [_ids(payload["history"], "history")]
  else:
    histories = payload["histories"]
    if not isinstance(histories, list) or not histories:
      raise RequestError(400, "histories: expected a non-empty list of lists of item ids")
    if len(histories) > max_histories:
      raise RequestError(413, f"histories: {len(histories)} in one request; at most "
                         f"{max_histories}")
    histories = [_ids(h, f"histories[{i}]") for i, h in enumerate(histories)]
  k = payload.get("k", min(10, artifact.top_k))
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= artifact.top_k:
    raise RequestError(400, f"k: expected an integer in [1, {artifact.top_k}], got {k!r:.50}")
  exclude_seen = payload.get("exclude_seen", True)
  if not isinstance(exclude_seen, bool):
    raise RequestError(400, f"exclude_seen: expected true or false, got {exclude_seen!r:.50}")
  users = None
  if artifact.needs_user:
    key = "user" if single else "users"
    if key not in payload:
      raise RequestError(400, f"model {artifact.model!r} needs a user id: give "
                         f'"{key}" (original user id{"" if single else "s"})')
    users = [_id(payload[key], key)] if single else _ids(payload[key], key)
  try:
    rows = artifact.encode(histories, users=users, exclude_seen=exclude_seen)
  except artifact_lib.UnknownIdError as e:
    raise RequestError(422, str(e), unknown_items=[
        {"history": index, "items": ids} for index, ids in e.items.items()],
        unknown_users=e.users) from None
  except ValueError as e:
    raise RequestError(400, str(e)) from None
  return rows, k, single


class RecommendServer(http_server.ThreadingHTTPServer):
  """A ``ThreadingHTTPServer`` that owns the artifact and its ``MicroBatcher``."""

  daemon_threads = True

  def __init__(self, artifact: artifact_lib.Artifact, address: tuple[str, int], *,
               max_batch: int = DEFAULT_MAX_BATCH, max_wait_s: float = DEFAULT_MAX_WAIT_S,
               max_histories: int = DEFAULT_MAX_HISTORIES,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               timeout_s: float = DEFAULT_TIMEOUT_S):
    self.artifact = artifact
    self.batcher = MicroBatcher(artifact, max_batch=max_batch, max_wait_s=max_wait_s)
    self.max_histories = max_histories
    self.max_body_bytes = max_body_bytes
    self.timeout_s = timeout_s
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def health(self) -> dict[str, Any]:
    manifest = self.artifact.manifest
    return {"status": "ok", "model": manifest["model"], "task": manifest["task"],
            "top_k": self.artifact.top_k, "max_len": self.artifact.max_len,
            "needs_user": self.artifact.needs_user, "platforms": list(self.artifact.platforms),
            "max_batch": self.batcher.max_batch, "max_wait_s": self.batcher.max_wait_s,
            **self.batcher.stats}

  def start(self) -> threading.Thread:
    """Serves from a daemon thread (tests, benchmarks); ``close()`` stops it."""
    thread = threading.Thread(target=self.serve_forever, name="recommend-server", daemon=True)
    self._serving = True
    thread.start()
    return thread

  def close(self) -> None:
    """Stops serving (if started), closes the socket and the batcher."""
    self.shutdown()
    self.server_close()
    self.batcher.close()

  def shutdown(self) -> None:
    # serve_forever may never have run: shutdown() would then wait forever.
    if getattr(self, "_serving", False):
      super().shutdown()

  def serve_forever(self, poll_interval: float = 0.5) -> None:
    self._serving = True
    try:
      super().serve_forever(poll_interval)
    finally:
      self._serving = False


class _Handler(http_server.BaseHTTPRequestHandler):
  """``POST /recommend``, ``GET /healthz``; JSON in and out."""

  server: RecommendServer
  protocol_version = "HTTP/1.1"  # Keep-alive: a client reuses its connection.
  # Headers and body are two writes: without TCP_NODELAY the body waits for the
  # client's delayed ACK (~40 ms a request on Linux).
  disable_nagle_algorithm = True

  def do_GET(self) -> None:  # The names http.server calls.
    if self._path() == "/healthz":
      self._send(200, self.server.health())
    elif self._path() == "/recommend":
      self._send(405, {"error": "use POST for /recommend"}, allow="POST")
    else:
      self._send(404, {"error": f"no such path {self._path()!r}; try POST /recommend or "
                       "GET /healthz"})

  def do_POST(self) -> None:
    try:
      body = self._body()
      if self._path() != "/recommend":
        raise RequestError(404, f"no such path {self._path()!r}; try POST /recommend")
      rows, k, single = parse_request(self.server.artifact, body,
                                      max_histories=self.server.max_histories)
      try:
        results = self.server.batcher.submit(rows, k).result(timeout=self.server.timeout_s)
      except concurrent.futures.TimeoutError:
        raise RequestError(503, f"no answer within {self.server.timeout_s} s") from None
    except RequestError as e:
      self._send(e.status, e.body)
      return
    except Exception as e:  # A bug, not the client's fault: say so, keep serving.
      logging.exception("error while serving %s", self.path)
      self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})
      return
    recommendations = [[{"item": item, "score": score} for item, score in top]
                       for top in results]
    self._send(200, {"recommendations": recommendations[0] if single else recommendations})

  def do_PUT(self) -> None:
    self._send(405, {"error": f"method {self.command} not allowed"}, allow="GET, POST")

  do_DELETE = do_PATCH = do_PUT

  def _path(self) -> str:
    return urllib.parse.urlsplit(self.path).path

  def _body(self) -> bytes:
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      raise RequestError(411, "a Content-Length header is required")
    try:
      size = int(length)
    except ValueError:
      self.close_connection = True
      raise RequestError(400, f"Content-Length {length!r} is not an integer") from None
    if size < 0 or size > self.server.max_body_bytes:
      self.close_connection = True  # The body stays unread: drop the connection.
      raise RequestError(413, f"body of {size} bytes; at most {self.server.max_body_bytes}")
    return self.rfile.read(size)

  def _send(self, status: int, body: dict[str, Any], **headers: str) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    for name, value in headers.items():
      self.send_header(name.capitalize(), value)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, format: str, *args: Any) -> None:
    logging.debug("%s %s", self.address_string(), format % args)


def make_server(artifact: artifact_lib.Artifact, *, host: str = "127.0.0.1", port: int = 0,
                **kwargs: Any) -> RecommendServer:
  """A bound (not yet serving) server; ``port=0`` picks a free port (``server.url``)."""
  return RecommendServer(artifact, (host, port), **kwargs)
