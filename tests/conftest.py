"""Test-wide JAX set-up: 4 forced CPU devices for the data-parallel tests.

This must run before anything imports jax, which is why it lives here.
"""

import atexit
import os
import shutil
import tempfile

# Four host devices so that multi-device tests run on a 2-core machine.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# jax 0.10 on 2 cores with forced devices can deadlock in all-reduce unless
# NPROC >= 2 * num_devices (measured, see ../shared/design.md).
os.environ.setdefault("NPROC", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and the binaries its tests
# start: many tests compile the same tiny programs (the same train step in
# test_train, test_sharded, test_binaries and every subprocess).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="deeprec_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402  (after the environment set-up above, on purpose)


@pytest.fixture(autouse=True, scope="session")
def _tfds_cache(tmp_path_factory):
  """Prepared datasets go to a per-session folder, never to ~/.cache."""
  os.environ["DEEPREC_DATA_DIR"] = str(tmp_path_factory.mktemp("tfds"))
  yield
