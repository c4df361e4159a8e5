"""Whether jax should look for an accelerator, decided before jax is imported.

With libtpu installed (the `tpu` and `test` extras) on a host without a TPU, jax's TPU
backend still starts libtpu, whose failed metadata lookups print five lines ("Failed to find
host bounds for accelerator type ...", "unexpected worker hostname ...") before every
command's output. On a host that shows neither a TPU nor a GPU, jax can only run on its CPU
backend; saying so up front (`JAX_PLATFORMS=cpu`) gives the same devices without the noise,
and names the TPU host for the ahead-of-time TPU compiles (`moejax.aot`), which read the
chip's layout from libtpu without a TPU.

The test for a TPU is jax's own (`jax._src.hardware_utils`): a PCI device of Google's
vendor id. Any Google PCI device counts, so a chip jax would find is never hidden. Only
the standard library is used: this runs before jax is imported.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"
# GPU device files (NVIDIA, WSL2, AMD's KFD), as jax's hardware_utils looks for them.
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
# The TPU runtime's host settings for a host with no TPU (metadata lookups skipped).
_NO_TPU_HOST = {"TPU_ACCELERATOR_TYPE": "none", "TPU_WORKER_HOSTNAMES": "localhost"}


def has_google_pci_device() -> bool:
  """Whether a PCI device of Google's vendor id (a TPU chip) is attached."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def has_gpu_device_file() -> bool:
  """Whether a GPU device file is present."""
  return any(os.path.exists(path) for path in _GPU_DEVICE_FILES)


def cpu_only_host(environ=os.environ) -> bool:
  """Whether jax would find no accelerator here and `JAX_PLATFORMS` leaves the choice open."""
  if environ.get("JAX_PLATFORMS") or environ.get("JAX_FORCE_TPU_INIT"):
    return False
  return not has_google_pci_device() and not has_gpu_device_file()


def settle_cpu_only_host(environ=os.environ) -> bool:
  """On a host with no accelerator (`cpu_only_host`), sets `JAX_PLATFORMS=cpu` and the
  TPU runtime's no-TPU host settings (where unset). Returns whether it did. A no-op once
  jax has read its configuration (jax imported earlier)."""
  if not cpu_only_host(environ):
    return False
  environ["JAX_PLATFORMS"] = "cpu"
  for key, value in _NO_TPU_HOST.items():
    environ.setdefault(key, value)
  return True
