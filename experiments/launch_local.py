r"""Runs a multi-process job on this machine: N processes on 127.0.0.1.

  python -m experiments.launch_local --num_processes=2 --devices_per_process=2 -- \
      --config=experiments/configs/tiny.py:sasrec --workdir=/tmp/two_procs

Everything after ``--`` goes to every process of ``--module`` (default
``experiments.train``), which gets ``--coordinator_address``,
``--num_processes`` and ``--process_id`` on top. Each process sees
``--devices_per_process`` forced CPU devices (``JAX_PLATFORMS=cpu``), so a
laptop can rehearse what a cluster runs, collectives included (gloo).

Output lines are prefixed with ``[p<id>]``. If any process fails, the others
are stopped and the launcher exits with the failing status.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "Forced CPU devices per process.",
                                lower_bound=1)
_MODULE = flags.DEFINE_string("module", "experiments.train",
                              "Module run by every process (python -m).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1; 0 = any free port.")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FORCE_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it soon after)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def process_env(num_processes: int, devices_per_process: int) -> dict[str, str]:
  """The environment of every process: forced CPU devices, cpu platform, NPROC."""
  env = dict(os.environ)
  xla_flags = _FORCE_DEVICES.sub("", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = (f"{xla_flags} --xla_force_host_platform_device_count="
                      f"{devices_per_process}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  # jax 0.10 with forced host devices can deadlock in all-reduce unless NPROC
  # is at least twice the device count (shared/design.md); count every
  # process's devices, since they all share this machine's cores.
  nproc = 2 * num_processes * devices_per_process
  env["NPROC"] = str(max(nproc, int(env.get("NPROC", "0") or 0)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH", "")]))
  env["PYTHONUNBUFFERED"] = "1"  # Lines arrive as they are printed.
  return env


def _stream(process: subprocess.Popen, prefix: str) -> None:
  for line in process.stdout:
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def _stop(processes: list[subprocess.Popen], grace_seconds: float = 10.0) -> None:
  """SIGTERM every process still running, then SIGKILL what is left after the grace."""
  for process in processes:
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_seconds
  for process in processes:
    try:
      process.wait(timeout=max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def launch(args: list[str], *, num_processes: int, devices_per_process: int,
           module: str = "experiments.train", port: int = 0) -> int:
  """Starts ``num_processes`` copies of ``python -m module args`` and waits for them.

  Args:
    args: flags for every process.
    num_processes: how many processes.
    devices_per_process: forced CPU devices in each.
    module: the module each process runs; it must accept
      ``--coordinator_address``, ``--num_processes`` and ``--process_id``.
    port: coordinator port (0 = a free one).

  Returns:
    0 if every process succeeded, else the first failure's exit status
    (negative: killed by that signal).
  """
  address = f"127.0.0.1:{port or free_port()}"
  env = process_env(num_processes, devices_per_process)
  processes, streams = [], []
  for process_id in range(num_processes):
    command = [sys.executable, "-m", module, f"--coordinator_address={address}",
               f"--num_processes={num_processes}", f"--process_id={process_id}", *args]
    process = subprocess.Popen(command, cwd=_REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    processes.append(process)
    stream = threading.Thread(target=_stream, args=(process, f"[p{process_id}]"), daemon=True)
    stream.start()
    streams.append(stream)
  failed = None
  try:
    while True:
      codes = [p.poll() for p in processes]
      failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
      if failed is not None or all(code == 0 for code in codes):
        break
      time.sleep(0.2)
  finally:
    # After a failure (or Ctrl-C) the others would wait for their peer forever.
    _stop(processes)
    for stream in streams:
      stream.join(timeout=5)
  if failed is None:
    return 0
  status = processes[failed].returncode
  print(f"launch_local: process {failed} exited with status {status}; stopped the rest.",
        file=sys.stderr)
  return status


def main(argv: list[str]) -> None:
  sys.exit(launch(argv[1:], num_processes=_NUM_PROCESSES.value,
                  devices_per_process=_DEVICES.value, module=_MODULE.value, port=_PORT.value))


if __name__ == "__main__":
  app.run(main)
