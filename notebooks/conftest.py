"""The notebooks run under `make test` as in Colab, on the host's own devices: the tests'
eight simulated CPU devices (tests/conftest.py sets XLA_FLAGS in the same pytest process)
are taken out of the environment the notebook's kernel starts with, and put back after.
The kernel compiles as the tests' quick programs do: with the tests' XLA flags
(MOEJAX_TEST_XLA_FLAGS, tests/conftest.py) and most XLA optimisations off; the notebooks'
programs are tiny, and compiling them takes most of their time."""

import os

import pytest

_SAVED = "_moejax_saved_environment"


def _kernel_environment() -> dict[str, str | None]:
  return {
    "XLA_FLAGS": os.environ.get("MOEJAX_TEST_XLA_FLAGS") or None,
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }


def _set(name: str, value: str | None) -> None:
  if value is None:
    os.environ.pop(name, None)
  else:
    os.environ[name] = value


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  kernel = _kernel_environment()
  setattr(item, _SAVED, {name: os.environ.get(name) for name in kernel})
  for name, value in kernel.items():
    _set(name, value)


def pytest_runtest_teardown(item):
  for name, value in getattr(item, _SAVED, {}).items():
    _set(name, value)
