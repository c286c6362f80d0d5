"""The run directory: one writer at a time, and a config.json that reads back from anywhere.

``locked(workdir)`` holds an OS file lock (``fcntl.flock``) on
``<workdir>/.lock`` for the life of a run: a second run on the same workdir
fails at once with the holder's pid and host instead of interleaving its
checkpoints and metrics with the first. The kernel releases the lock when its
process exits, however it exits, so a lock file left by a killed run is
simply taken over; nothing needs cleaning by hand.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

import ml_collections
from absl import logging

LOCK_FILE = ".lock"
# config.data keys that name files or folders; stored absolute in config.json.
_PATH_KEYS = ("path", "data_dir")


class WorkdirLockedError(RuntimeError):
  """Another live process is writing the workdir."""


@contextlib.contextmanager
def locked(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds the workdir's lock (creating the directory) while the block runs.

  Args:
    workdir: the run directory.
    enabled: False on processes that do not write (all but process 0 of a
      multi-process run): then only the directory is created.

  Raises:
    WorkdirLockedError: naming the pid, host and start time of the holder.
  """
  os.makedirs(workdir, exist_ok=True)
  if not enabled:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
      raise WorkdirLockedError(
          f"{workdir} is in use by another run ({holder}); wait for it to finish or pick "
          "another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    yield
  finally:
    os.close(fd)  # Closing the descriptor releases the lock.


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose data paths are absolute (relative ones: to the cwd).

  A run's config.json then reads back from any directory (evaluate,
  recommend, export). Each changed path is logged with its original spelling.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  for key in _PATH_KEYS:
    value = config.data.get(key, "")
    if value and not os.path.isabs(os.path.expanduser(value)):
      config.data[key] = os.path.abspath(os.path.expanduser(value))
      logging.info("data.%s=%r resolved to %s", key, value, config.data[key])
  return config
