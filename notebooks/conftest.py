"""The notebooks run under `make test` as in Colab: on the host's own devices. The tests'
eight simulated CPU devices (tests/conftest.py sets XLA_FLAGS in the same pytest process)
are taken out of the environment the notebook's kernel starts with, and put back after."""

import os

import pytest

_SAVED = "_moejax_saved_xla_flags"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  setattr(item, _SAVED, os.environ.pop("XLA_FLAGS", None))


def pytest_runtest_teardown(item):
  saved = getattr(item, _SAVED, None)
  if saved is not None:
    os.environ["XLA_FLAGS"] = saved
