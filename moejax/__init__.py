"""moejax: sparse Mixture-of-Experts transformer language models in JAX and Flax NNX.

The top-level names are imported on first use, so that `python -m moejax.main` (and the
other commands) can set up their signal handling before jax is imported. On a host with
no accelerator, jax is told so before it is imported (`moejax.runtime.platform`).
"""

import importlib

from moejax.runtime import platform as _platform

_platform.settle_cpu_only_host()

__all__ = ["MoeConfig", "MoeLayer", "load", "load_balancing_loss", "router_z_loss"]
__version__ = "0.1.0"

_HOMES = {name: "moejax.moe" for name in __all__} | {"load": "moejax.training.loading"}


def __getattr__(name: str):
  if name in _HOMES:
    return getattr(importlib.import_module(_HOMES[name]), name)
  raise AttributeError(f"module 'moejax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_HOMES))
