"""Reading compiled programs: the collectives of an HLO module and the bytes they move.

Used by the tests (expected all-to-alls, no all-gather of expert weights), the
benchmarks and the ahead-of-time report (`moejax.aot`). The text is XLA's
`compiled.as_text()`: the per-device program after SPMD partitioning.
"""

from __future__ import annotations

import math
import re

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 1,
  "u4": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def collective_shapes(hlo_text: str, opcode: str) -> list[tuple[str, tuple[int, ...]]]:
  """`(dtype, dims)` of the result arrays of every `opcode` op (e.g. 'all-to-all',
  'all-gather') in HLO text; a tuple-shaped result lists each element. `-start` forms
  of async collectives are included, `-done` forms are not."""
  pattern = re.compile(r"=\s+(\([^()]*\)|[^\s(]+)\s+" + re.escape(opcode) + r"(?:-start)?\(")
  shapes = []
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if match:
      for dtype, dims in _SHAPE.findall(match.group(1)):
        shapes.append((dtype, tuple(int(v) for v in dims.split(",") if v)))
  return shapes


def all_to_all_bytes(hlo_text: str) -> int:
  """Bytes of all all-to-all results in (per-device, compiled) HLO text.

  An all-to-all's result has the size of its input: each device sends that many bytes
  (1/n of which it keeps). Summed over the ops of a train step it is the all-to-all
  traffic per device per step, to set against the minimum for capacity dispatch,
  2 (dispatch, combine) · 2 (forward, backward) · k · capacity_factor · tokens · d_model
  · bytes per element per MoE layer, tokens being a device's tokens.
  """
  return sum(array_bytes(dtype, dims) for dtype, dims in collective_shapes(hlo_text, "all-to-all"))


# The collectives a report lists; "-start" async forms count as the op.
COLLECTIVES = (
  "all-to-all",
  "ragged-all-to-all",
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
)


def array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
  """Bytes of one HLO array `dtype[dims]`."""
  if dtype not in _DTYPE_BYTES:
    raise ValueError(f"unknown HLO element type {dtype!r}.")
  return _DTYPE_BYTES[dtype] * math.prod(dims)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{op: {"count": instructions, "bytes": result bytes per device}}` for each op of
  `COLLECTIVES` in HLO text (ops that do not occur are left out).

  An op's bytes are its result's; an async `-start` whose result is a tuple (the operand
  beside the result, or context scalars) counts its largest array. Ops wrapped in an
  `async-start` computation appear in that computation and are counted there.
  """
  out: dict[str, dict[str, int]] = {}
  for op in COLLECTIVES:
    pattern = re.compile(r"=\s+(\([^()]*\)|[^\s(]+)\s+" + re.escape(op) + r"(-start)?\(")
    for line in hlo_text.splitlines():
      match = pattern.search(line)
      if not match:
        continue
      sizes = [
        array_bytes(t, tuple(int(v) for v in d.split(",") if v))
        for t, d in _SHAPE.findall(match.group(1))
      ]
      entry = out.setdefault(op, {"count": 0, "bytes": 0})
      entry["count"] += 1
      entry["bytes"] += max(sizes) if match.group(2) else sum(sizes)
  return out
