r"""Forward+backward time and utilisation of `moejax.MoeLayer` against a dense FFN.

    python -m experiments.benchmarks.moe_layer                       # the full benchmark
    python -m experiments.benchmarks.moe_layer --num_experts=16 --reps=9 --out=/tmp/moe.csv
    python -m experiments.benchmarks.moe_layer --preset=smoke        # tiny shapes, 1 repetition

What one row measures: `jax.jit(jax.value_and_grad(loss, argnums=(params, x)))` with
`loss = sum(y²) + lb_loss + z_loss` (the dense FFN has no aux losses), i.e. the gradient
with respect to every `nnx.Param` and the input, called on fixed inputs and timed to
`jax.block_until_ready`. Compilation is excluded (every function is compiled ahead of
time with `.lower(...).compile()`, and its compile time is reported separately), each
function runs `--warmup` times, and then the `--reps` repetitions are *interleaved*: every
repetition times every row once, in a freshly shuffled order, so a noisy neighbour slows
all rows alike rather than one. The table reports medians.

Rows:
  * `matmul`: a square float32 `[N, N] @ [N, N]` (`--matmul_size`, 2·N³ FLOPs). Its
    median rate is this machine's matmul rate, measured in the same process; every
    row's utilisation is relative to it.
  * `dense`: `moejax.layers.ffn.FeedForward(d_model, top_k · d_ff, 'swiglu')`, a dense FFN
    with the same active expert parameters as the MoE layer.
  * `moe/<dispatch>`: `MoeLayer(MoeConfig(router='top_k', activation='swiglu',
    capacity_factor=--capacity_factor))` for each dispatch and each `--num_experts`; the
    capacity rows route all T tokens as one group (`group_size=T`), `moe/einsum/g<S>`
    rows set `group_size=S` (routing and capacity per group of S tokens).

Shapes: the input is `[--batch, --seq_len, d_model]` (default 8 × 512 = 4096 tokens).
The layer routes all batch·seq tokens of a call as ONE routing group unless `group_size`
is set, so the default rows route 4096 tokens together (capacity per expert
C = ceil(cf · T · k / E): 512 at E=16, 128 at E=64).

Columns (CSV and table):
  * `median_ms`, `min_ms`, `max_ms` over `reps` interleaved repetitions;
  * `vs_dense`: median time / the dense row's median time;
  * `active_gflop`: the FLOPs the layer must do, forward+backward = 3 × forward, forward =
    3 expert matmuls · 2·T·k·d_model·d_ff + the router 2·T·d_model·E (the dense row:
    3 · 2·T·d_model·k·d_ff; the matmul row: 2·N³). Capacity padding, dispatch/combine
    arithmetic and gathers are not "useful" FLOPs and are not counted;
  * `gflop_per_s` = active_gflop / median time; `mfu` = gflop_per_s / the matmul row's
    gflop_per_s (model-FLOPs utilisation against this machine's measured matmul rate);
  * `xla_gflop`: the FLOPs XLA's cost analysis counts in the compiled program (shows the
    dispatch overhead: one-hot einsums, ...; XLA does not count the FLOPs inside loops, so
    the CPU expert loop, `moejax.moe.block_ffn`, shows almost none);
  * `row_factor` (table: rows/(T·k)): rows the experts multiply on CPU per routed
    assignment, i.e. the padding the layer pays on top of the active FLOPs: E·C per
    routing group for the capacity paths, the blocks in use for `dropless` (its rows
    padded to whole blocks of one expert each), for the routing of this input;
  * `temp_mib`: temporary buffer size of the compiled program (`memory_analysis()`), a
    cheap proxy of peak memory beyond arguments and outputs;
  * `tec_tensor`: whether the optimised HLO holds a tensor with dims T(or S), E and C
    (the one-hot `[tokens, experts, capacity]` masks of the einsum dispatch), and the first
    such shape. The sort and dropless paths must have none; the run fails (exit code 1,
    after writing the CSV) if one does, unless `--nocheck_hlo`;
  * `glibc_tunables`: the process's `GLIBC_TUNABLES` (`make bench` runs with
    `glibc.malloc.hugetlb=1`, which changes CPU timings: docs/performance.md).

The CSV (`--out`, default `moe_layer_benchmark.csv` in the working directory) is never
overwritten: if the file exists, a suffix `-1`, `-2`, ... is added before `.csv` and the
path actually written is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks.common import expert_flops, malloc_tunables, write_rows
from experiments.benchmarks.moe_layer_table import markdown_table, results
from moejax.layers.ffn import FeedForward
from moejax.moe import MoeConfig, MoeLayer, block_ffn, routing
from moejax.moe.config import DISPATCHES
from moejax.moe.dispatch import expert_capacity
from moejax.parallel import hlo

PRESETS = {
  "default": dict(
    batch=8,
    seq_len=512,
    d_model=512,
    d_ff=1024,
    num_experts=(16, 64),
    top_k=2,
    dispatches=("einsum", "sort", "dropless"),
    group_sizes=(512,),
    grouped_dispatches=("einsum",),
    capacity_factor=1.0,
    matmul_size=4096,
    reps=7,
    warmup=2,
  ),
  # Every size distinct (T=96, S=48, E=8, C=24 or 12, d_model=16, d_ff=40, k=2), so that
  # the [T, E, C] search of the HLO cannot match a weight or activation by coincidence.
  "smoke": dict(
    batch=2,
    seq_len=48,
    d_model=16,
    d_ff=40,
    num_experts=(8,),
    top_k=2,
    dispatches=("einsum", "sort", "dropless"),
    group_sizes=(48,),
    grouped_dispatches=("einsum",),
    capacity_factor=1.0,
    matmul_size=128,
    reps=1,
    warmup=1,
  ),
}

COLUMNS = (
  "name",
  "mode",
  "dispatch",
  "num_experts",
  "top_k",
  "group_size",
  "tokens",
  "d_model",
  "d_ff",
  "capacity",
  "reps",
  "median_ms",
  "min_ms",
  "max_ms",
  "vs_dense",
  "active_gflop",
  "gflop_per_s",
  "mfu",
  "xla_gflop",
  "row_factor",
  "temp_mib",
  "compile_s",
  "tec_tensor",
  "tec_shape",
  "glibc_tunables",
)


@dataclasses.dataclass
class Row:
  """One benchmarked function and its results."""

  name: str
  mode: str
  fn: Callable
  args: tuple
  active_flops: float
  dispatch: str = ""
  tokens: int | str = ""
  d_model: int | str = ""
  d_ff: int | str = ""
  top_k: int | str = ""
  num_experts: int | str = ""
  group_size: int | str = ""
  capacity: int | str = ""
  row_factor: float | str = ""
  tec_dims: tuple[int, int, int] | None = None  # (S, E, C) to look for in the HLO
  compiled: object = None
  compile_s: float = 0.0
  xla_flops: float = float("nan")
  temp_bytes: float = float("nan")
  tec_shape: str = ""
  times: list = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- flags


def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def _str_list(text: str) -> tuple[str, ...]:
  return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  """Flags; any flag left unset takes its value from `--preset`."""
  p = argparse.ArgumentParser(
    prog="python -m experiments.benchmarks.moe_layer",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--preset", choices=sorted(PRESETS), default="default")
  p.add_argument("--batch", type=int)
  p.add_argument("--seq_len", type=int)
  p.add_argument("--d_model", type=int)
  p.add_argument("--d_ff", type=int, help="hidden size of each expert")
  p.add_argument("--num_experts", type=_int_list, help="comma-separated, e.g. 16,64")
  p.add_argument("--top_k", type=int)
  p.add_argument("--dispatches", type=_str_list, help="subset of einsum,sort,dropless")
  p.add_argument(
    "--group_sizes",
    type=_int_list,
    help="extra rows with group_size set (tokens per routing group); '' for none",
  )
  p.add_argument(
    "--grouped_dispatches",
    type=_str_list,
    help="dispatches that get the --group_sizes rows (einsum and/or sort)",
  )
  p.add_argument("--capacity_factor", type=float)
  p.add_argument("--matmul_size", type=int, help="N of the N×N×N float32 rate matmul")
  p.add_argument("--reps", type=int, help="interleaved timed repetitions per row")
  p.add_argument("--warmup", type=int, help="untimed runs per row after compiling")
  p.add_argument(
    "--modes",
    type=_str_list,
    default=("fwdbwd",),
    help="fwdbwd (value_and_grad) and/or fwd (loss only)",
  )
  p.add_argument(
    "--no_dense",
    dest="dense",
    action="store_false",
    help="skip the dense row (vs_dense is then empty)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--out",
    default="moe_layer_benchmark.csv",
    help="CSV path; an existing file is never overwritten (a suffix is added)",
  )
  p.add_argument(
    "--nocheck_hlo",
    dest="check_hlo",
    action="store_false",
    help="do not fail (exit 1) when a sort/dropless row's HLO holds a [T, E, C] tensor",
  )
  args = p.parse_args(list(argv))
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for dispatch in args.dispatches + args.grouped_dispatches:
    if dispatch not in DISPATCHES:
      p.error(f"unknown dispatch {dispatch!r}; allowed: {', '.join(DISPATCHES)}")
  if "dropless" in args.grouped_dispatches and args.group_sizes:
    p.error("dropless has no routing groups; drop it from --grouped_dispatches")
  for mode in args.modes:
    if mode not in ("fwd", "fwdbwd"):
      p.error(f"unknown mode {mode!r}; allowed: fwd, fwdbwd")
  if args.reps < 1 or args.warmup < 0:
    p.error("--reps must be >= 1 and --warmup >= 0")
  return args


# ----------------------------------------------------------------------------- rows


def _module_fn(module: nnx.Module, has_aux: bool, mode: str):
  """A pure function `(params, x) -> loss` or `-> (loss, (dparams, dx))` of an NNX module."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss_fn(params, x):
    out = nnx.merge(graphdef, params, rest)(x)
    if has_aux:
      y, aux = out
      return jnp.sum(jnp.square(y)) + aux["lb_loss"] + aux["z_loss"]
    return jnp.sum(jnp.square(out))

  fn = loss_fn if mode == "fwd" else jax.value_and_grad(loss_fn, argnums=(0, 1))
  return fn, params


def moe_active_flops(
  tokens: int, d_model: int, d_ff: int, num_experts: int, top_k: int, mode: str
) -> float:
  """Active FLOPs of the MoE layer: k experts per token plus the router; ×3 with backward."""
  forward = expert_flops(tokens, d_model, top_k * d_ff) + 2 * tokens * d_model * num_experts
  return forward * (3 if mode == "fwdbwd" else 1)


def dense_active_flops(tokens: int, d_model: int, hidden: int, mode: str) -> float:
  return expert_flops(tokens, d_model, hidden) * (3 if mode == "fwdbwd" else 1)


def row_factor(layer: MoeLayer, x: jax.Array, capacity: int | None) -> float:
  """Rows the experts multiply on the CPU path per routed assignment (T·k): the capacity
  buffers (E·C per routing group, empty slots included), or for `dropless` the rows
  `block_ffn.ffn` multiplies (`block_ffn.rows_multiplied`) for the layer's routing of `x`.
  1.0 means no padding."""
  tokens = x.reshape(-1, x.shape[-1])
  assignments = tokens.shape[0] * layer.top_k
  if capacity is not None:
    groups = tokens.shape[0] // (layer.config.group_size or x.shape[1])
    return groups * layer.num_experts * capacity / assignments
  probs = jax.nn.softmax(tokens @ layer.router_kernel[...], axis=-1)
  choice = routing.top_k_choice(probs, layer.top_k, renormalize=layer.config.renormalize)
  sizes = jnp.bincount(choice.expert_indices.reshape(-1), length=layer.num_experts)
  block = block_ffn.block_size(assignments, layer.num_experts)
  return int(block_ffn.rows_multiplied(sizes, block)) / assignments


def build_rows(args: argparse.Namespace) -> list[Row]:
  T = args.batch * args.seq_len
  d, f, k = args.d_model, args.d_ff, args.top_k
  key_x, key_a, key_b = jax.random.split(jax.random.key(args.seed), 3)
  x = jax.random.normal(key_x, (args.batch, args.seq_len, d), jnp.float32)
  rows = []

  n = args.matmul_size
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  rows.append(Row("matmul", "fwd", jnp.matmul, (a, b), 2.0 * n**3))

  for mode in args.modes:
    if args.dense:
      ffn = FeedForward(d, k * f, "swiglu", rngs=nnx.Rngs(args.seed))
      fn, params = _module_fn(ffn, has_aux=False, mode=mode)
      rows.append(
        Row(
          "dense",
          mode,
          fn,
          (params, x),
          dense_active_flops(T, d, k * f, mode),
          tokens=T,
          d_model=d,
          d_ff=k * f,
        )
      )

    for E in args.num_experts:
      variants = [(dispatch, None) for dispatch in args.dispatches]
      variants += [(dispatch, g) for dispatch in args.grouped_dispatches for g in args.group_sizes]
      for dispatch, group in variants:
        # Without a group size the capacity rows route all T tokens as one group.
        S = None if dispatch == "dropless" else group or T
        config = MoeConfig(
          num_experts=E,
          d_ff=f,
          top_k=k,
          router="top_k",
          dispatch=dispatch,
          capacity_factor=args.capacity_factor,
          activation="swiglu",
          group_size=S,
        )
        layer = MoeLayer(config, d_model=d, rngs=nnx.Rngs(args.seed))
        fn, params = _module_fn(layer, has_aux=True, mode=mode)
        S = S or T
        C = expert_capacity(S, E, k, args.capacity_factor, config.min_capacity)
        name = f"moe/{dispatch}" + (f"/g{group}" if group else "")
        rows.append(
          Row(
            name,
            mode,
            fn,
            (params, x),
            moe_active_flops(T, d, f, E, k, mode),
            dispatch=dispatch,
            tokens=T,
            d_model=d,
            d_ff=f,
            top_k=k,
            num_experts=E,
            group_size=group or "",
            capacity="" if dispatch == "dropless" else C,
            row_factor=row_factor(layer, x, None if dispatch == "dropless" else C),
            tec_dims=(S, E, C),
          )
        )
  return rows


# ----------------------------------------------------------------------------- HLO checks


def compile_row(row: Row) -> None:
  start = time.perf_counter()
  row.compiled = jax.jit(row.fn).lower(*row.args).compile()
  row.compile_s = time.perf_counter() - start
  with contextlib.suppress(Exception):  # cost analysis is best effort and backend dependent
    cost = row.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row.xla_flops = float(cost.get("flops", float("nan")))
  with contextlib.suppress(Exception):
    row.temp_bytes = float(row.compiled.memory_analysis().temp_size_in_bytes)
  if row.tec_dims is not None:
    row.tec_shape = hlo.find_array(row.compiled.as_text(), *row.tec_dims)


def time_once(row: Row) -> float:
  start = time.perf_counter()
  jax.block_until_ready(row.compiled(*row.args))
  return time.perf_counter() - start


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace, log=print) -> tuple[list[dict], str]:
  """Builds, compiles, warms up and times every row; returns the table and the CSV path."""
  wall = time.perf_counter()
  log(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"{os.cpu_count()} CPUs; T={args.batch}x{args.seq_len}={args.batch * args.seq_len} tokens "
    f"(one routing group unless group_size), d_model={args.d_model}, d_ff={args.d_ff}, "
    f"E={','.join(map(str, args.num_experts))}, k={args.top_k}, cf={args.capacity_factor}; "
    f"GLIBC_TUNABLES={malloc_tunables()!r}"
  )
  rows = build_rows(args)
  for row in rows:
    compile_row(row)
    log(
      f"  compiled {row.name:<18} {row.mode:<6} E={row.num_experts!s:<3} "
      f"in {row.compile_s:5.1f}s  temp {row.temp_bytes / 2**20:8.1f} MiB"
    )
    for _ in range(args.warmup):
      time_once(row)
  order = random.Random(args.seed)
  for rep in range(args.reps):
    shuffled = rows[:]
    order.shuffle(shuffled)
    for row in shuffled:
      row.times.append(time_once(row))
    log(f"  repetition {rep + 1}/{args.reps} done ({time.perf_counter() - wall:.0f}s)")
  table = results(rows)
  path = write_rows(table, COLUMNS, args.out)
  log(markdown_table(table))
  log(f"wrote {path}; wall time {time.perf_counter() - wall:.0f}s")
  return table, path


def tec_violations(table: list[dict]) -> list[str]:
  return [
    f"{r['name']} E={r['num_experts']}: {r['tec_shape']}"
    for r in table
    if r["dispatch"] in ("sort", "dropless") and r["tec_tensor"] == "yes"
  ]


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_flags(sys.argv[1:] if argv is None else argv)
  table, _ = run(args)
  bad = tec_violations(table)
  if bad and args.check_hlo:
    print("FAIL: [T, E, C] tensors in the HLO of: " + "; ".join(bad), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
