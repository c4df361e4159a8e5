r"""Training throughput of a config, the share of step time in its MoE layers, peak memory.

    python -m experiments.benchmarks.train_step                       # configs/tiny.py
    python -m experiments.benchmarks.train_step --config=configs/tiny.py:smoke --reps=3

On one device (the first), float32 unless the config says otherwise. Three compiled
functions are timed, each `--warmup` times untimed and then `--reps` times interleaved
(every repetition runs each once, in a shuffled order); the table gives medians:

  * `step`: the whole training step of `moejax.training.steps.make_steps` (forward, backward, AdamW
    update, non-finite guard) on a fixed batch of random bytes, `[batch, seq_len]` as in
    the config. Data loading is not included; tokens/s = batch · seq_len / step time.
  * `moe_layers`: forward+backward of the model's MoE layers alone, each on its own
    `[batch, seq_len, d_model]` normal input, loss = sum of squared outputs plus the
    weighted balancing and z losses (the same work the step does in those layers, minus
    what XLA fuses across the layer boundary). `moe share` = this time / step time.
  * `dense_step`: the step of the same model with every MoE layer replaced by a dense FFN
    of the same active width (hidden = top_k · expert_d_ff), the compute-matched
    baseline; `× dense` = step / dense_step.

Peak memory per function is XLA's buffer assignment of the compiled program
(`memory_analysis()`): arguments + outputs + temporaries - aliased (donated) bytes; the
process's peak resident set size (`ru_maxrss`, includes JAX itself and every compiled
program) is printed too.

`glibc_tunables` (CSV) records the process's `GLIBC_TUNABLES`: `make bench` runs with
`glibc.malloc.hugetlb=1`, which changes CPU timings (docs/performance.md).
The CSV (`--out`) is never overwritten: an existing path gets a `-1`, `-2`, ... suffix.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmarks.common import interleaved_times, malloc_tunables, write_rows
from moejax.config import load_config
from moejax.models import flops
from moejax.models.transformer import DTYPES, expert_d_ff_of, moe_config, moe_layer_indices
from moejax.moe import MoeLayer
from moejax.training import steps

COLUMNS = (
  "name",
  "config",
  "batch",
  "seq_len",
  "reps",
  "median_ms",
  "min_ms",
  "max_ms",
  "tokens_per_s",
  "share_of_step",
  "vs_dense",
  "peak_mib",
  "temp_mib",
  "compile_s",
  "glibc_tunables",
)


def peak_bytes(compiled) -> float:
  """Arguments + outputs + temporaries - aliased bytes of a compiled program."""
  m = compiled.memory_analysis()
  return float(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def dense_equivalent(config):
  """`config` with its MoE layers replaced by dense FFNs of the same active hidden width."""
  dense = config.copy_and_resolve_references()
  m = dense.model
  if m.num_experts:
    if m.moe_layer_interval != 1 or m.dense_moe_hybrid or m.num_shared_experts:
      raise ValueError("the dense baseline needs every layer MoE, no hybrid and no shared experts")
    m.d_ff = m.top_k * expert_d_ff_of(m)
    m.num_experts = 0
  return dense


def step_function(config):
  """`(jitted step, (state, batch))` for one device."""
  model, optimizer, _ = steps.build(config)
  graphdef, state = nnx.split((model, optimizer))
  train_step, _ = steps.make_steps(graphdef, config.model)
  tc = config.train
  tokens = jax.random.randint(jax.random.key(1), (tc.batch_size, tc.seq_len + 1), 0, 256)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return jax.jit(train_step), (state, batch)


def moe_layers_function(config):
  """`(jitted fwd+bwd of the MoE layers alone, (params, inputs))`: one `MoeLayer` of the
  model's config per MoE layer of the model, each on its own input."""
  m = config.model
  rngs = nnx.Rngs(config.train.seed)
  layers = [
    MoeLayer(moe_config(m), d_model=m.d_model, dtype=DTYPES[m.dtype], rngs=rngs)
    for _ in moe_layer_indices(m)
  ]
  splits = [nnx.split(layer, nnx.Param, ...) for layer in layers]
  params = tuple(p for _, p, _ in splits)
  m, tc = config.model, config.train
  xs = jax.random.normal(jax.random.key(2), (len(layers), tc.batch_size, tc.seq_len, m.d_model))

  def loss(params, xs):
    total = 0.0
    for (graphdef, _, rest), layer_params, x in zip(splits, params, xs, strict=True):
      y, aux = nnx.merge(graphdef, layer_params, rest)(x)
      total += (
        jnp.sum(jnp.square(y)) + m.lb_loss_weight * aux["lb_loss"] + m.z_loss_weight * aux["z_loss"]
      )
    return total

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), (params, xs)


def run(args) -> tuple[list[dict], str]:
  config = load_config(args.config)
  tc, m = config.train, config.model
  if m.num_experts == 0:
    raise SystemExit(f"{args.config} has no MoE layers (model.num_experts=0)")
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
    f"{args.config}: {m.num_layers} layers, d_model {m.d_model}, E={m.num_experts} "
    f"k={m.top_k} dispatch={m.dispatch}, batch {tc.batch_size} x {tc.seq_len}; "
    f"{flops.count_params(m)['active']:,} active parameters; "
    f"GLIBC_TUNABLES={malloc_tunables()!r}"
  )
  with jax.default_device(jax.devices()[0]):
    named = {
      "step": step_function(config),
      "moe_layers": moe_layers_function(config),
      "dense_step": step_function(dense_equivalent(config)),
    }
    compiled, compile_s = {}, {}
    for name, (fn, call_args) in named.items():
      start = time.perf_counter()
      compiled[name] = fn.lower(*call_args).compile()
      compile_s[name] = time.perf_counter() - start
    runs = {
      name: (lambda name=name: jax.block_until_ready(compiled[name](*named[name][1])))
      for name in named
    }
    times = interleaved_times(runs, reps=args.reps, warmup=args.warmup)

  med = {name: statistics.median(t) for name, t in times.items()}
  tokens = tc.batch_size * tc.seq_len
  rows = []
  for name in named:
    is_step = name != "moe_layers"
    rows.append(
      {
        "name": name,
        "config": args.config,
        "batch": tc.batch_size,
        "seq_len": tc.seq_len,
        "reps": args.reps,
        "median_ms": med[name] * 1e3,
        "min_ms": min(times[name]) * 1e3,
        "max_ms": max(times[name]) * 1e3,
        "tokens_per_s": tokens / med[name] if is_step else "",
        "share_of_step": med[name] / med["step"] if name == "moe_layers" else "",
        "vs_dense": med[name] / med["dense_step"] if is_step else "",
        "peak_mib": peak_bytes(compiled[name]) / 2**20,
        "temp_mib": compiled[name].memory_analysis().temp_size_in_bytes / 2**20,
        "compile_s": compile_s[name],
        "glibc_tunables": malloc_tunables(),
      }
    )
  path = write_rows(rows, COLUMNS, args.out)
  print("| function | median ms | min–max ms | tokens/s | MoE share | × dense | peak MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    cell = lambda v, f: "" if v == "" else format(v, f)
    print(
      f"| {r['name']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | "
      f"{cell(r['tokens_per_s'], ',.0f')} | {cell(r['share_of_step'], '.2f')} | "
      f"{cell(r['vs_dense'], '.2f')} | {r['peak_mib']:.0f} |"
    )
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  print(f"process peak resident memory {rss:.0f} MiB; wrote {path}")
  return rows, path


def parse_flags(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m experiments.benchmarks.train_step", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("--config", default="configs/tiny.py", help="configs/NAME.py[:ARG]")
  p.add_argument("--reps", type=int, default=15, help="interleaved timed repetitions")
  p.add_argument("--warmup", type=int, default=3, help="untimed runs after compiling")
  p.add_argument(
    "--out",
    default="train_step_benchmark.csv",
    help="CSV path; an existing file is never overwritten (a suffix is added)",
  )
  args = p.parse_args(list(argv))
  if args.reps < 1 or args.warmup < 0:
    p.error("--reps must be >= 1 and --warmup >= 0")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  run(parse_flags(sys.argv[1:] if argv is None else argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
