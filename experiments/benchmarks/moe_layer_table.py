"""The MoE layer benchmark's table: its measured rows as CSV records and as Markdown."""

from __future__ import annotations

import math
import statistics

from experiments.benchmarks.common import malloc_tunables


def results(rows) -> list[dict]:
  """One dict per measured row (`moe_layer.Row`) with the CSV's columns; utilisation
  against the matmul row's rate."""
  (matmul,) = [r for r in rows if r.name == "matmul"]
  rate = matmul.active_flops / statistics.median(matmul.times)
  dense_time = {r.mode: statistics.median(r.times) for r in rows if r.name == "dense"}
  out = []
  for r in rows:
    t = statistics.median(r.times)
    dense = dense_time.get(r.mode)
    out.append(
      {
        "name": r.name,
        "mode": r.mode,
        "dispatch": r.dispatch,
        "num_experts": r.num_experts,
        "top_k": r.top_k,
        "group_size": r.group_size,
        "tokens": r.tokens,
        "d_model": r.d_model,
        "d_ff": r.d_ff,
        "capacity": r.capacity,
        "reps": len(r.times),
        "median_ms": t * 1e3,
        "min_ms": min(r.times) * 1e3,
        "max_ms": max(r.times) * 1e3,
        "vs_dense": t / dense if dense else "",
        "active_gflop": r.active_flops / 1e9,
        "gflop_per_s": r.active_flops / t / 1e9,
        "mfu": r.active_flops / t / rate,
        "xla_gflop": r.xla_flops / 1e9,
        "row_factor": r.row_factor,
        "temp_mib": r.temp_bytes / 2**20,
        "compile_s": r.compile_s,
        "tec_tensor": "" if r.tec_dims is None else ("yes" if r.tec_shape else "no"),
        "tec_shape": r.tec_shape,
        "glibc_tunables": malloc_tunables(),
      }
    )
  return out


def _fmt(value, digits: int) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"
  return str(value)


def markdown_table(table: list[dict]) -> str:
  cols = [
    ("row", "name"),
    ("mode", "mode"),
    ("E", "num_experts"),
    ("C", "capacity"),
    ("median ms", "median_ms"),
    ("min–max ms", None),
    ("× dense", "vs_dense"),
    ("GFLOP/s", "gflop_per_s"),
    ("MFU", "mfu"),
    ("XLA GFLOP", "xla_gflop"),
    ("active GFLOP", "active_gflop"),
    ("rows/(T·k)", "row_factor"),
    ("temp MiB", "temp_mib"),
    ("[T,E,C]", None),
  ]
  digits = {
    "median_ms": 1,
    "vs_dense": 2,
    "gflop_per_s": 1,
    "mfu": 3,
    "xla_gflop": 1,
    "active_gflop": 1,
    "row_factor": 2,
    "temp_mib": 0,
  }
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for row in table:
    cells = []
    for title, key in cols:
      if title == "min–max ms":
        cells.append(f"{row['min_ms']:.1f}–{row['max_ms']:.1f}")
      elif title == "[T,E,C]":
        cells.append(row["tec_tensor"] + (f" `{row['tec_shape']}`" if row["tec_shape"] else ""))
      else:
        cells.append(_fmt(row[key], digits.get(key, 0)))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
