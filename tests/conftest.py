"""Test setup: eight simulated CPU devices, set before jax is imported anywhere; XLA's
faster-compiling CPU code generator; one persistent compilation cache for the session;
`fast_compile` (`fast_compile_module`) for tests that check what a program computes or
reports, not how fast it runs; the slowest tests are started first."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# XLA's CPU backend emits fusions with its older (elemental) emitters: the same HLO, the
# same optimisation passes, other machine code. The tests compile many small programs, each
# run a few times: their compiles take about 20% less (60% less with most optimisations
# off, as the smoke ablations, the benchmark smoke tests and the notebooks 01/04 compile).
# Set only when this jaxlib knows the flag (an unknown flag aborts every jax process).
# MOEJAX_TEST_XLA_FLAGS carries it to the processes the tests start (commands run on one
# device, notebook kernels), which set their own device count.
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _known_xla_flag(flag: str) -> bool:
  env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
  probe = "import jax; jax.devices()"
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


if "MOEJAX_TEST_XLA_FLAGS" not in os.environ:  # inherited by the xdist workers: probed once
  os.environ["MOEJAX_TEST_XLA_FLAGS"] = (
    FAST_COMPILE_FLAG if _known_xla_flag(FAST_COMPILE_FLAG) else ""
  )
os.environ.setdefault(
  "XLA_FLAGS",
  f"--xla_force_host_platform_device_count=8 {os.environ['MOEJAX_TEST_XLA_FLAGS']}".strip(),
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, shared by both workers and the
# processes the tests start: many tests build the same tiny models and compile the same
# programs. Made once, in the process that starts the workers, and removed when it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="moejax-tests-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# Most XLA optimisations off (experiments.runner.run.most_optimizations_off, as the
# smoke ablations compile), for tests of what a program computes or reports (shapes, memory
# of its arguments, finite losses), whose tiny programs take far longer to compile than to
# run. Imported inside: jax must not be imported before XLA_FLAGS is set above.
@pytest.fixture
def fast_compile():
  """Most XLA optimisations off for one test."""
  from experiments.runner.run import most_optimizations_off

  with most_optimizations_off():
    yield


@pytest.fixture(scope="module")
def fast_compile_module():
  """Most XLA optimisations off for a whole module (its module-scoped fixtures included)."""
  from experiments.runner.run import most_optimizations_off

  with most_optimizations_off():
    yield


# The slowest items, started first: with `--dist worksteal` (make test), a worker that runs
# out of tests takes half of the other's queue, so what is left at the end is short tests
# rather than a notebook or a smoke ablation on one worker while the other idles.
SLOW_FIRST = (
  ".ipynb",
  "tests/test_ablations.py",
  "tests/test_expert_parallel.py",
  "tests/test_multihost.py",
  "tests/test_fault_tolerance.py",
  "tests/test_configs.py",
  "tests/test_benchmarks.py",
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return next((i for i, end in enumerate(SLOW_FIRST) if path.endswith(end)), len(SLOW_FIRST))

  items.sort(key=rank)  # stable: each file's tests stay together and in order
