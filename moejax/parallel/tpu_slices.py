"""TPU slices as JAX can compile for them on any host: the chips' published numbers
(`CHIPS`), slice names (`parse_slice`), and the devices of one or more slices from libtpu
(`slice_devices`, `get_topology_desc`), with no TPU attached."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile

import jax

GIB = 2**30
INSTALL_LINE = "pip install -e '.[tpu]'  (the libtpu wheel that matches the installed jax)"


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's per-chip numbers (Cloud TPU system architecture pages,
  cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}).

  `cores_per_chip`: TensorCores per chip, which gcloud's `vN-COUNT` names count for v4
  and v5p (for v5e and v6e COUNT is chips). `ici_bytes_per_second`: bidirectional
  inter-chip bandwidth per chip. `dims`: the torus's dimensions. `dcn_bytes_per_second`:
  the data-center network's bandwidth per chip, between slices; None where the page
  publishes none (multi-slice reports are refused there).
  """

  hbm_bytes: int
  peak_bf16_flops: float
  ici_bytes_per_second: float
  cores_per_chip: int
  dims: int
  dcn_bytes_per_second: float | None = None


CHIPS = {
  # v4: 275 TFLOP/s, 32 GiB. The page gives no per-chip ICI figure; its
  # all-reduce bandwidth per pod (1.1 PB/s over 4096 chips) doubled, the ratio the v5e
  # page's own figures show (51.2 TB/s over 256 chips vs 400 GB/s per chip).
  "v4": Chip(32 * GIB, 275e12, 2 * 1.1e15 / 4096, 2, 3),
  # v5e: 197 TFLOP/s, 16 GB, 400 GB/s ICI; DCN 6.4 Tb/s per 256-chip pod (two 100 Gb/s
  # NICs per 8-chip host): 25 Gb/s per chip.
  "v5e": Chip(16 * 10**9, 197e12, 400e9, 1, 2, 6.4e12 / 8 / 256),
  # v5p: 459 TFLOP/s, 95 GiB, 1200 GB/s ICI, 50 Gb/s DCN per chip.
  "v5p": Chip(95 * GIB, 459e12, 1200e9, 2, 3, 50e9 / 8),
  # v6e: 918 TFLOP/s, 32 GB, 800 GB/s ICI.
  "v6e": Chip(32 * 10**9, 918e12, 800e9, 1, 2),
}

# Chips -> the slice shape gcloud gives them (2-D tori for v5e/v6e, 3-D for v4/v5p).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16"}
_SHAPES_2D[256] = "16x16"
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}
_SHAPES_3D.update({256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"})
_SHAPES_3D[4096] = "16x16x16"


def parse_slice(name: str) -> tuple[str, str]:
  """`'v5p-128'` (gcloud: 128 TensorCores, 64 chips) or `'v5p:4x4x4'` -> `('v5p',
  'v5p:4x4x4')`, the generation and the topology name `get_topology_desc` takes. A
  one-line ValueError lists what is allowed."""
  allowed = ", ".join(f"{g}-N" for g in CHIPS)
  match = re.fullmatch(r"(v\d+[a-z]?)([-:])([0-9x]+)", name or "")
  if not match or match.group(1) not in CHIPS:
    raise ValueError(f"--topology={name!r}: allowed are {allowed} (gcloud names) or GEN:AxB[xC].")
  generation, separator, size = match.groups()
  chip = CHIPS[generation]
  if separator == ":":
    if len(size.split("x")) != chip.dims:
      raise ValueError(f"--topology={name!r}: a {generation} topology has {chip.dims} dims.")
    return generation, name
  count = int(size)
  shapes = _SHAPES_2D if chip.dims == 2 else _SHAPES_3D
  chips, rest = divmod(count, chip.cores_per_chip)
  if rest or chips not in shapes:
    counts = ", ".join(str(c * chip.cores_per_chip) for c in shapes)
    raise ValueError(f"--topology={name!r}: {generation}-N with N one of {counts}.")
  return generation, f"{generation}:{shapes[chips]}"


def has_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def slice_devices(topology_name: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of `num_slices` TPU slices of a topology (`'v5e:2x2'`), from libtpu, on
  any host (each device knows its `slice_index`). Without libtpu, a one-line ValueError
  (a wrong command: exit 2) gives the install line."""
  if not has_libtpu():
    raise ValueError(f"compiling for a TPU slice needs libtpu: {INSTALL_LINE}")
  from jax.experimental import topologies

  with _without_host_probe_line():
    topology = topologies.get_topology_desc(
      platform="tpu", topology_name=topology_name, num_slices=num_slices
    )
  return list(topology.devices)


# What libtpu prints on every start on a host that is not a TPU VM, from native code.
_HOST_PROBE_LINE = "Failed to find host bounds for accelerator type"


@contextlib.contextmanager
def _without_host_probe_line():
  """Within the block, the process's native stderr is kept aside; on leaving, all of it but
  libtpu's `_HOST_PROBE_LINE` is written out."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as kept:
    os.dup2(kept.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      kept.seek(0)
      lines = kept.read().decode(errors="replace").splitlines(keepends=True)
      sys.stderr.write("".join(line for line in lines if _HOST_PROBE_LINE not in line))
      sys.stderr.flush()


def num_chips(topology_name: str) -> int:
  """Chips of a topology: the product of its shape (`'v5p:4x4x4'` -> 64)."""
  return math.prod(int(d) for d in topology_name.split(":")[1].split("x"))
