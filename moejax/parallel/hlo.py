"""Reading compiled programs: the collectives of an HLO module and the bytes they move.

Used by the tests (expected all-to-alls, no all-gather of expert weights), the
benchmarks and the ahead-of-time report (`moejax.aot`). The text is XLA's
`compiled.as_text()`: the per-device program after SPMD partitioning.
"""

from __future__ import annotations

import collections
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


# An array's layout after its shape: `{1,0}` on CPU; on TPU with tiling and memory space,
# `{1,0:T(8,128)S(1)}`, whose parentheses would end a shape's match.
_LAYOUT = re.compile(r"\{[0-9,]*(?::[^{}]*)?\}")


def strip_layouts(line: str) -> str:
  """An HLO instruction line without the layouts of its shapes."""
  return _LAYOUT.sub("", line)


def collective_shapes(hlo_text: str, opcode: str) -> list[tuple[str, tuple[int, ...]]]:
  """`(dtype, dims)` of the result arrays of every `opcode` op (e.g. 'all-to-all',
  'all-gather') in HLO text; a tuple-shaped result lists each element. `-start` forms
  of async collectives are included, `-done` forms are not."""
  pattern = re.compile(r"=\s+(\([^()]*\)|[^\s(]+)\s+" + re.escape(opcode) + r"(?:-start)?\(")
  shapes = []
  for line in hlo_text.splitlines():
    match = pattern.search(strip_layouts(line))
    if match:
      for dtype, dims in _SHAPE.findall(match.group(1)):
        shapes.append((dtype, tuple(int(v) for v in dims.split(",") if v)))
  return shapes


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


def collectives(hlo_text: str, unknown_trips: int = 1) -> dict[str, dict[str, int]]:
  """`{op: {"count": executions, "bytes": result bytes per device}}` per step for each op of
  `COLLECTIVES` in a compiled HLO module (ops that never run are left out), and for the
  transfers between TPU slices of a multi-slice program (`dcn-all-reduce`, ...: the bytes
  each device sends over the data-center network).

  Counts what runs, not what is written: the entry computation's ops, plus those of every
  computation it calls, a `while` body as many times as XLA's `known_trip_count` says (a
  scan over layers runs its body once per layer; a loop whose count is only known at run
  time, such as dropless's later exchange rounds, counts `unknown_trips` times), each
  branch of a conditional once. An op's bytes are its result's; an async
  `-start` whose result is a tuple (the operand beside the result, or context scalars)
  counts its largest array.
  """
  computations, entry = _computations(hlo_text)
  memo: dict[str, dict[str, list[int]]] = {}

  def total(name: str) -> dict[str, list[int]]:
    if name not in memo:
      memo[name] = {}  # guards against a cycle, which HLO does not have
      counts: dict[str, list[int]] = {}
      for line in computations.get(name, ()):
        for op, size in _collective(line):
          entry_ = counts.setdefault(op, [0, 0])
          entry_[0], entry_[1] = entry_[0] + 1, entry_[1] + size
        for callee, times in _callees(line, computations, unknown_trips):
          for op, (count, size) in total(callee).items():
            entry_ = counts.setdefault(op, [0, 0])
            entry_[0], entry_[1] = entry_[0] + times * count, entry_[1] + times * size
      memo[name] = counts
    return memo[name]

  return {op: {"count": c, "bytes": b} for op, (c, b) in sorted(total(entry).items())}


def all_to_all_bytes(hlo_text: str) -> int:
  """Bytes of the all-to-all results a compiled step runs per device (`collectives`).

  An all-to-all's result has the size of its input: each device sends that many bytes
  (1/n of which it keeps). Summed over a train step it is the all-to-all traffic per device
  per step, to set against the minimum for capacity dispatch, 2 (dispatch, combine) · 2
  (forward, backward) · k · capacity_factor · tokens · d_model · bytes per element per MoE
  layer, tokens being a device's tokens.
  """
  return collectives(hlo_text).get("all-to-all", {"bytes": 0})["bytes"]


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_OP_PATTERNS = {
  op: re.compile(r"=\s+(\([^()]*\)|[^\s(]+)\s+" + re.escape(op) + r"(-start)?\(")
  for op in COLLECTIVES
}
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """The instruction lines of each computation of an HLO module, and the entry's name."""
  computations: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.rstrip() == "}":  # an instruction's text may go on in lines starting "}}"
      current = None
    elif current is not None:
      computations[current].append(line)
  return computations, entry


# Across TPU slices the program holds no collective: each DCN transfer is a host-transfer
# `send` to the multi-slice runtime, its kind in a frontend attribute.
_DCN_SEND = re.compile(r"=\s+\(([^()]*)\)\s+send\(.*_xla_megascale_transfer_type=\"(\w+)\"")
DCN_PREFIX = "dcn-"  # `collectives` names a DCN transfer `dcn-all-reduce`, `dcn-all-gather`, ...


def _collective(line: str):
  """`(op, bytes)` if the instruction on `line` is one of `COLLECTIVES`, or a transfer
  between slices (`DCN_PREFIX` + its kind; bytes: the array sent)."""
  line = strip_layouts(line)
  dcn = _DCN_SEND.search(line)
  if dcn:
    dtype, dims = _SHAPE.findall(dcn.group(1))[0]
    yield (
      DCN_PREFIX + dcn.group(2).lower().replace("_", "-"),
      array_bytes(dtype, tuple(int(v) for v in dims.split(",") if v)),
    )
    return
  for op, pattern in _OP_PATTERNS.items():
    match = pattern.search(line)
    if match:
      sizes = [
        array_bytes(t, tuple(int(v) for v in d.split(",") if v))
        for t, d in _SHAPE.findall(match.group(1))
      ]
      yield op, max(sizes) if match.group(2) else sum(sizes)
      return


def _trip_count(line: str, computations: dict[str, list[str]], unknown: int) -> int:
  """How often the `while` on `line` runs: XLA's `known_trip_count` (CPU, GPU), else read
  from its condition when that is `counter < constant` (TPU); `unknown` when neither."""
  trips = _TRIP_COUNT.search(line)
  if trips:
    return int(trips.group(1))
  condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
  body = computations.get(condition.group(1), []) if condition else []
  constants = dict(_CONSTANT.findall("\n".join(strip_layouts(x) for x in body)))
  for instruction in body:
    compare = _LESS_THAN.search(instruction)
    if instruction.lstrip().startswith("ROOT") and compare and compare.group(1) in constants:
      return int(constants[compare.group(1)])
  return unknown


_CONSTANT = re.compile(r"%([\w.\-]+) = s32\[\] constant\((\d+)\)")
_LESS_THAN = re.compile(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")


def _callees(line: str, computations: dict[str, list[str]], unknown_trips: int):
  """`(computation, times)` for each computation the instruction on `line` runs."""
  if " while(" in line:
    body = re.search(r"\bbody=%?([\w.\-]+)", line)
    if body:
      yield body.group(1), _trip_count(line, computations, unknown_trips)
    return
  for key in ("calls", "to_apply", "true_computation", "false_computation"):
    for callee in re.findall(r"\b" + key + r"=%?([\w.\-]+)", line):
      yield callee, 1
  branches = re.search(r"branch_computations=\{([^}]*)\}", line)
  if branches:
    for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
      yield callee, 1


def find_array(hlo_text: str, *dims: int) -> str:
  """The first array shape in HLO text whose dimensions include `dims` (in any order, other
  dimensions allowed, a repeated dimension as many times as given), e.g. a dispatch
  mask's `f32[1,4096,16,512]` for `(4096, 16, 512)`; '' if there is none."""
  want = collections.Counter(dims)
  for match in _SHAPE.finditer(hlo_text):
    if not want - collections.Counter(int(v) for v in match.group(2).split(",") if v):
      return match.group(0)
  return ""
