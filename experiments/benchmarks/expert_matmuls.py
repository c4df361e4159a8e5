r"""The experts alone, on ready `[E, C, d]` buffers: where the CPU layer's time goes.

    python -m experiments.benchmarks.expert_matmuls                 # E = 16 and 64
    python -m experiments.benchmarks.expert_matmuls --preset=smoke  # tiny shapes, 1 repetition

The shapes of `experiments.benchmarks.moe_layer` with every assignment kept: E experts of
C = T·k/E rows each (T = 4096, k = 2), d_model 512, d_ff 1024, SwiGLU, float32. No
routing, dispatch or combine. Rows, per E (medians of `--reps` interleaved repetitions):

  * `batched`: forward + backward of the three batched einsums `[E, C, d] × [E, d, f]`
    (`experts.capacity_ffn` with `expert_impl='grouped_matmul'`, the GPU/TPU form);
  * `block_ffn`: forward + backward of `experts.capacity_ffn` with
    `expert_impl='block_loop'`, one matmul per expert (`moejax.moe.block_ffn`, the CPU form);
  * `x@w`, `dy@wᵀ`, `xᵀ@dy`: a loop over the experts of one of the three matmul shapes a
    block's backward pass does (`[C, d] @ [d, f]`; `[C, f] @ [d, f]ᵀ`; `[C, d]ᵀ @ [C, f]`,
    the weight gradient, which contracts only C rows);
  * `fresh [E,d,f]×3`: writing three new weight-sized arrays (`2·w` for each weight), the
    memory every backward pass must fill with the weight gradients. No FLOPs are counted;
    its time is the cost of fresh memory on this machine (page faults of new allocations).

`gflop_per_s` counts the matmul FLOPs of the row (9 matmuls for the fwd+bwd rows, 1 for
the others), and `mfu` divides it by the rate of a 4096³ matmul timed in the same run.
`glibc_tunables` (CSV) records the process's `GLIBC_TUNABLES`: `make bench` runs with
`glibc.malloc.hugetlb=1`, which changes CPU timings (docs/performance.md).
Writes a CSV (never overwriting) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from experiments.benchmarks.common import interleaved_times, malloc_tunables, write_rows
from moejax.moe.experts import capacity_ffn

PRESETS = {
  "default": dict(
    tokens=4096,
    top_k=2,
    d_model=512,
    d_ff=1024,
    num_experts=(16, 64),
    matmul_size=4096,
    reps=7,
    warmup=2,
  ),
  "smoke": dict(
    tokens=64, top_k=2, d_model=16, d_ff=32, num_experts=(4,), matmul_size=128, reps=1, warmup=1
  ),
}
COLUMNS = (
  "name",
  "num_experts",
  "capacity",
  "reps",
  "median_ms",
  "min_ms",
  "max_ms",
  "gflop",
  "gflop_per_s",
  "mfu",
  "glibc_tunables",
)


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="default")
  p.add_argument("--reps", type=int, help="interleaved timed repetitions per row")
  p.add_argument("--out", default="expert_matmuls.csv", help="CSV path (never overwritten)")
  args = p.parse_args(list(argv))
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.reps < 1:
    p.error("--reps must be >= 1")
  return args


def _per_expert(product):
  """`product(a_e, b_e)` for every expert, as a loop (a `lax.map`) of 2-D matmuls."""
  return jax.jit(lambda a, b: jax.lax.map(lambda ab: product(*ab), (a, b)))


def _swiglu_batched(x, w_in, w_gate, w_out):
  return capacity_ffn("swiglu", "grouped_matmul", x, (w_in, w_gate, w_out))


def _swiglu_loop(x, w_in, w_gate, w_out):
  return capacity_ffn("swiglu", "block_loop", x, (w_in, w_gate, w_out))


def _fwd_bwd(fn):
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.square(fn(*a))), argnums=(0, 1, 2, 3)))


def run(args: argparse.Namespace, log=print) -> tuple[list[dict], str]:
  d, f = args.d_model, args.d_ff
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32) * shape[-2] ** -0.5
  n = args.matmul_size
  square = (normal(n, n), normal(n, n))
  runs, flops = (
    {("matmul", "", ""): (jax.jit(jnp.matmul), square)},
    {("matmul", "", ""): 2.0 * n**3},
  )
  for E in args.num_experts:
    C = args.tokens * args.top_k // E
    x, dy_hidden, dy = normal(E, C, d), normal(E, C, f), normal(E, C, d)
    w_in, w_gate, w_out = normal(E, d, f), normal(E, d, f), normal(E, f, d)
    one = 2.0 * E * C * d * f
    rows = {
      "batched": (_fwd_bwd(_swiglu_batched), (x, w_in, w_gate, w_out), 9 * one),
      "block_ffn": (_fwd_bwd(_swiglu_loop), (x, w_in, w_gate, w_out), 9 * one),
      "x@w": (_per_expert(jnp.matmul), (x, w_in), one),
      "dy@wᵀ": (_per_expert(lambda a, b: a @ b.T), (dy, w_out), one),
      "xᵀ@dy": (_per_expert(lambda a, b: a.T @ b), (x, dy_hidden), one),
      "fresh [E,d,f]×3": (jax.jit(lambda *w: [2.0 * v for v in w]), (w_in, w_gate, w_out), 0.0),
    }
    for name, (fn, fn_args, fl) in rows.items():
      runs[(name, E, C)] = (fn, fn_args)
      flops[(name, E, C)] = fl
  log(
    f"jax {jax.__version__} on {jax.default_backend()}; GLIBC_TUNABLES={malloc_tunables()!r}; "
    f"compiling {len(runs)} functions"
  )
  calls = {key: (lambda fn=fn, a=a: jax.block_until_ready(fn(*a))) for key, (fn, a) in runs.items()}
  times = interleaved_times(calls, reps=args.reps, warmup=args.warmup)
  rate = flops[("matmul", "", "")] / statistics.median(times[("matmul", "", "")])
  table = []
  for key, t in times.items():
    name, E, C = key
    median = statistics.median(t)
    table.append(
      {
        "name": name,
        "num_experts": E,
        "capacity": C,
        "reps": len(t),
        "median_ms": median * 1e3,
        "min_ms": min(t) * 1e3,
        "max_ms": max(t) * 1e3,
        "gflop": flops[key] / 1e9,
        "gflop_per_s": flops[key] / median / 1e9,
        "mfu": flops[key] / median / rate,
        "glibc_tunables": malloc_tunables(),
      }
    )
  return table, write_rows(table, COLUMNS, args.out)


def markdown_table(table: list[dict]) -> str:
  lines = [
    "| row | E | C | median ms | min–max ms | GFLOP/s | MFU |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in table:
    lines.append(
      f"| {r['name']} | {r['num_experts']} | {r['capacity']} | {r['median_ms']:.1f} | "
      f"{r['min_ms']:.1f}–{r['max_ms']:.1f} | {r['gflop_per_s']:.1f} | {r['mfu']:.3f} |"
    )
  return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
  table, path = run(parse_flags(argv))
  print(markdown_table(table))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
