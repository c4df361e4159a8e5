"""Helpers the benchmark scripts share; no JAX import, so the PyTorch peer can use them."""

from __future__ import annotations

import csv
import os
import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence


def expert_flops(tokens: int, d_model: int, hidden: int) -> float:
  """Forward FLOPs of a bias-free SwiGLU FFN of `hidden` units over `tokens` rows."""
  return 3 * 2 * tokens * d_model * hidden


def malloc_tunables() -> str:
  """The glibc malloc settings the process started with (`GLIBC_TUNABLES`; '' = defaults).
  They change CPU timings: `glibc.malloc.hugetlb=1` backs large allocations with huge
  pages, and XLA allocates its large buffers afresh on every call (docs/performance.md)."""
  return os.environ.get("GLIBC_TUNABLES", "")


def unused_path(path: str) -> str:
  """`path` if no file is there, else `stem-1.csv`, `stem-2.csv`, ...: never overwrite."""
  if not os.path.exists(path):
    return path
  stem, ext = os.path.splitext(path)
  i = 1
  while os.path.exists(f"{stem}-{i}{ext}"):
    i += 1
  return f"{stem}-{i}{ext}"


def write_rows(rows: list[dict], columns: Sequence[str], path: str) -> str:
  """Writes `rows` as CSV at `path`, or at the first unused suffixed path; returns it."""
  path = unused_path(path)
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  # 'x' mode: fail rather than overwrite if another process created the file meanwhile.
  with open(path, "x", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
  return path


def interleaved_times(
  runs: Mapping[Hashable, Callable[[], object]], *, reps: int, warmup: int, seed: int = 0
) -> dict[Hashable, list[float]]:
  """Seconds per call of each `runs[name]()` (which must block until its work is done):
  `warmup` untimed calls each, then `reps` repetitions that call every function once in
  a freshly shuffled order, so a noisy neighbour slows every row alike."""
  for run in runs.values():
    for _ in range(warmup):
      run()
  times = {name: [] for name in runs}
  order = random.Random(seed)
  for _ in range(reps):
    names = list(runs)
    order.shuffle(names)
    for name in names:
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)
  return times
