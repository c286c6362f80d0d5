"""What every binary shares: user errors in a line or two, quiet third-party logs.

``cli.run(main)`` replaces ``app.run(main)``. A user error (a config key or
value, a data file, an id, an argument) prints ``error: <message>`` and exits
with status 2; a run that stops itself (divergence) exits with status 1.
``--debug`` shows the full traceback instead. Library exceptions keep their
types: only the binaries turn them into exit codes.
"""

import logging as std_logging
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from deeprec_jax import workdir as workdir_lib

_DEBUG = flags.DEFINE_bool("debug", False, "Show full tracebacks of user errors.")
_LOG_ALL = flags.DEFINE_bool("log_all", False,
                             "Keep INFO logs of third-party libraries (Orbax, TFDS, JAX).")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", "~/.cache/deeprec_jax/jax_cache",
    "JAX's persistent compilation cache: a rerun or resume skips most compiles "
    "('' = off; $JAX_COMPILATION_CACHE_DIR wins).")

# Exceptions the library raises for wrong input (keys, values, files, ids).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
               workdir_lib.WorkdirLockedError)
# A mistyped or mistyped-value config override fails in ml_collections with these.
_OVERRIDE_ERRORS = (KeyError, TypeError, AttributeError) + USER_ERRORS
# Only INFO lines from these packages are shown by default.
_OWN_PACKAGES = ("deeprec_jax", "experiments", "benchmarks")
# Third-party warnings that say nothing about the run (TFDS on our own builders,
# Orbax on the metadata read of a step).
_NOISE = ("Using custom data configuration", "Metadata file does not exist")


def _message(error: BaseException) -> str:
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  if isinstance(error, (KeyError, AttributeError)):
    text = text.strip("'\"").replace("\\n", "\n").replace("\\'", "'")
  return text.strip()


def _debug() -> bool:
  if flags.FLAGS.is_parsed():
    return _DEBUG.value
  return "--debug" in sys.argv  # Errors raised while flags are being defined.


def fail(error: BaseException, status: int) -> None:
  """Prints ``error`` as one message (or its traceback under --debug) and exits."""
  if _debug():
    traceback.print_exception(error)
  else:
    print(f"error: {_message(error)}", file=sys.stderr)
  sys.exit(status)


def define_config_file(name: str, default: str, help_string: str) -> None:
  """``config_flags.DEFINE_config_file`` (locked), whose overrides fail in one line.

  ml_collections applies ``--<name>.<key>=value`` overrides while the flag is
  defined, at import, so a mistyped key is caught here.
  """
  try:
    config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except _OVERRIDE_ERRORS as error:
    overrides = [arg for arg in sys.argv[1:] if arg.startswith(f"--{name}.")]
    key = _message(error).splitlines()[0].strip("'\"")
    named = [arg for arg in overrides if key in arg] or overrides
    error.args = (f"{' '.join(named)}: {_message(error)}",)
    fail(ValueError(*error.args), 2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}\nPass --helpshort to see the flags.", file=sys.stderr)
    sys.exit(2)
  except _OVERRIDE_ERRORS as error:  # A config override naming no key, or of the wrong type.
    fail(error, 2)
    raise  # Unreachable: fail exits.


class _OwnInfoOnly(std_logging.Filter):
  """Drops INFO records of third-party code; warnings and errors always pass."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno > std_logging.WARNING:
      return True
    if record.levelno == std_logging.WARNING:
      return not any(noise in str(record.msg) for noise in _NOISE)
    path = record.pathname.replace(os.sep, "/")
    return any(f"/{package}/" in path for package in _OWN_PACKAGES)


def _quiet_logs() -> None:
  if _LOG_ALL.value:
    return
  handler = logging.get_absl_handler()
  handler.addFilter(_OwnInfoOnly())
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _compilation_cache() -> None:
  path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(_JAX_CACHE.value)
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top  (after flags: --jax_cache_dir='' skips it)
  jax.config.update("jax_compilation_cache_dir", path)
  # Every program, not only those over JAX's 1 s default: evaluation compiles a
  # handful of sub-second shapes, which add up to most of a first pass.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
      os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")))


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with the error handling, logging and compilation cache above."""

  def wrapped(argv: list[str]) -> None:
    _quiet_logs()
    _compilation_cache()
    try:
      main(argv)
    except FloatingPointError as error:  # The run stopped itself (divergence).
      fail(error, 1)
    except USER_ERRORS as error:
      fail(error, 2)

  app.run(wrapped, flags_parser=_parse_flags)
