r"""The GPU checks in one short run (`make bench-gpu`): the MoE layer in bfloat16 at published
shapes against the device's own measured matmul rate, and a shrunk Mixtral training step.

    python -m experiments.benchmarks.gpu [--tiny] [--out=benchmarks/gpu.csv]

Rows (medians of `--reps` interleaved repetitions after a warm-up, `common.interleaved_times`):

  * `matmul`: a bfloat16 `[N, N] @ [N, N]`, the rate every `mfu` is measured against (the
    device's achievable dense rate, not its datasheet peak);
  * `layer/SHAPE/DISPATCH`: `MoeLayer` forward + backward (gradients of every parameter and
    the input) in bfloat16 for SHAPE `mixtral` (d_model 4096, expert hidden 14336, top-2 of
    8) and `olmoe` (d_model 2048, expert hidden 1024, top-8 of 64), DISPATCH `sort`,
    `einsum` (capacity factor 1.25) and `dropless` (`ragged_dot` on GPU); `mfu` counts the
    routed experts' useful FLOPs, 3 · 2 · tokens · k · d_model · hidden · 3 (forward and
    backward), over the matmul row's rate;
  * `attention/KERNEL`: causal attention over packed documents (`causal_attention`, Mixtral's
    32 query / 8 KV heads of 128, bfloat16, 8 × 1024 tokens), forward + backward, for
    `xla` and the kernel `auto` picks on this device (`cudnn` on GPU); `max_abs_diff` is
    the largest difference of its output from `xla`'s, `mfu` counts the causal half of
    the scores' matmuls;
  * `train_step/mixtral`: `configs/mixtral.py` with its layers cut to `--train_layers`
    (published widths, bfloat16, batch `--train_batch` x 1024) on one device;
    `tokens_per_sec` and `mfu` from `moejax.models.flops` (6 · active parameters · tokens plus
    attention).

`--tiny` shrinks every shape so the script runs in seconds on a CPU (the tests run it so).
Writes a CSV (never overwriting: `-1`, `-2`, ... suffixes) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks.common import expert_flops, interleaved_times, write_rows
from moejax.config import load_config
from moejax.layers.attention_kernel import causal_attention, kernel_for
from moejax.models import flops
from moejax.moe import MoeConfig, MoeLayer
from moejax.parallel import sharding
from moejax.training.steps import init_state, make_steps
from moejax.training.train import jit_train_step, no_nonfinite_tally

# name: (d_model, expert hidden, experts, k); --tiny divides the widths by 64 and 16.
SHAPES = {"mixtral": (4096, 14336, 8, 2), "olmoe": (2048, 1024, 64, 8)}
DISPATCHES = ("sort", "einsum", "dropless")
COLUMNS = ("name", "device", "seconds", "tflops", "mfu", "tokens_per_sec", "max_abs_diff")


def matmul_rate(n: int, reps: int) -> tuple[float, float]:
  """(median seconds, FLOP/s) of a bfloat16 `[n, n] @ [n, n]`."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  times = interleaved_times({"mm": lambda: f(a, a).block_until_ready()}, reps=reps, warmup=2)
  seconds = statistics.median(times["mm"])
  return seconds, 2 * n**3 / seconds


def layer_step(shape: tuple[int, int, int, int], dispatch: str, tokens: int):
  """A jitted forward + backward of one MoE layer; returns (run, useful FLOPs)."""
  d_model, hidden, experts, k = shape
  config = MoeConfig(num_experts=experts, d_ff=hidden, top_k=k, dispatch=dispatch)
  layer = MoeLayer(config, d_model=d_model, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (tokens // 1024 or 1, min(tokens, 1024), d_model))
  x = x.astype(jnp.bfloat16)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))) + aux["lb_loss"]

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  run = lambda: jax.block_until_ready(step(params, x))
  return run, 3 * expert_flops(tokens * k, d_model, hidden)


def attention_steps(batch: int, seq: int, heads: int, kv_heads: int, dim: int):
  """{name: run} of jitted forward + backward attention over packed documents, for 'xla'
  and the kernel 'auto' picks here; their useful FLOPs; and each kernel's largest output
  difference from 'xla'."""
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.bfloat16) for _ in "kv")
  segments = jnp.asarray(np.repeat(np.arange(1, 5), seq // 4)[None].repeat(batch, 0), jnp.int32)
  platform = jax.devices()[0].platform
  chosen = kernel_for("auto", platform, seq=seq, head_dims=(dim,), dtype=q.dtype, logit_cap=None)
  runs, diffs = {}, {}
  outputs = {}
  for kernel in dict.fromkeys(("xla", chosen)):
    attend = lambda q, k, v, kernel=kernel: causal_attention(
      q, k, v, positions=jnp.arange(seq), segment_ids=segments, kernel=kernel
    )
    outputs[kernel] = jax.jit(attend)(q, k, v).astype(jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v, f=attend: jnp.sum(f(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2)))  # fmt: skip
    runs[f"attention/{kernel}"] = lambda g=grad: jax.block_until_ready(g(q, k, v))
  for kernel, out in outputs.items():
    diffs[f"attention/{kernel}"] = float(jnp.max(jnp.abs(out - outputs["xla"])))
  useful = 3 * 2 * batch * heads * seq * seq / 2 * 2 * dim  # q·k and p·v, causal half, fwd+bwd
  return runs, useful, diffs


def train_step(layers: int, batch: int, seq_len: int, tiny: bool):
  """The jitted train step of a shrunk `configs/mixtral.py`; returns (run, tokens, FLOPs)."""
  overrides = {
    "model.num_layers": layers,
    "model.dtype": "bfloat16",
    "train.batch_size": batch,
    "train.seq_len": seq_len,
  }
  if tiny:
    overrides.update({"model.d_model": 64, "model.d_ff": 128, "model.num_heads": 4})
    overrides.update({"model.num_kv_heads": 2})
  config = load_config("configs/mixtral.py:pod", overrides)
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 1, 1, 1
  config.hardware.topology = None
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, state, shardings = init_state(config, mesh)
  step = jit_train_step(make_steps(graphdef, config.model)[0], mesh, shardings)
  tally = jax.device_put(no_nonfinite_tally())
  tokens = np.random.default_rng(0).integers(0, 256, (batch, seq_len), dtype=np.int32)
  data = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(tokens)}
  holder = {"state": state, "tally": tally}

  def run():
    holder["state"], holder["tally"], metrics = step(
      holder["state"], holder["tally"], data, np.int32(1)
    )
    jax.block_until_ready(metrics)

  model_flops = 3 * flops.flops_per_token(config.model, seq_len)["active"] * batch * seq_len
  return run, batch * seq_len, model_flops


def parse_flags(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="Shapes small enough for a CPU.")
  p.add_argument("--shapes", default=",".join(SHAPES), help=f"Layer shapes, of {list(SHAPES)}.")
  p.add_argument("--tokens", type=int, default=8192, help="Tokens per layer call.")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--matmul_n", type=int, default=8192)
  p.add_argument("--train_layers", type=int, default=2)
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--out", default="benchmarks/gpu.csv")
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[list[dict], str]:
  """Measures every row; returns them and the CSV's path."""
  tokens, matmul_n, seq_len = args.tokens, args.matmul_n, 1024
  unknown = set(args.shapes.split(",")) - set(SHAPES)
  if unknown:
    raise SystemExit(f"error: --shapes: {sorted(unknown)} unknown; allowed: {list(SHAPES)}")
  shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
  if args.tiny:
    tokens, matmul_n, seq_len = 64, 128, 32
    shapes = {n: (d // 64, h // 64, e, k) for n, (d, h, e, k) in shapes.items()}
  device = jax.devices()[0].device_kind
  seconds, rate = matmul_rate(matmul_n, args.reps)
  rows = [dict(name="matmul", seconds=seconds, tflops=rate / 1e12, mfu=1.0)]

  runs, useful = {}, {}
  for shape_name, shape in shapes.items():
    for dispatch in DISPATCHES:
      name = f"layer/{shape_name}/{dispatch}"
      runs[name], useful[name] = layer_step(shape, dispatch, tokens)
  attention_shape = (2, 256, 4, 2, 64) if args.tiny else (8, 1024, 32, 8, 128)
  attention_runs, attention_flops, diffs = attention_steps(*attention_shape)
  runs.update(attention_runs)
  useful.update(dict.fromkeys(attention_runs, attention_flops))
  run, step_tokens, useful["train_step/mixtral"] = train_step(
    args.train_layers, args.train_batch, seq_len, args.tiny
  )
  runs["train_step/mixtral"] = run
  times = interleaved_times(runs, reps=args.reps, warmup=2)
  for name, samples in times.items():
    seconds = statistics.median(samples)
    row = dict(name=name, seconds=seconds, tflops=useful[name] / seconds / 1e12)
    row["mfu"] = useful[name] / seconds / rate
    if name.startswith("train_step"):
      row["tokens_per_sec"] = step_tokens / seconds
    if name in diffs:
      row["max_abs_diff"] = diffs[name]
    rows.append(row)
  for row in rows:
    row["device"] = device
  return rows, write_rows(rows, COLUMNS, args.out)


def main(argv=None) -> None:
  rows, path = run(parse_flags(argv))
  device = rows[0]["device"]
  print(f"{'name':28s} {'ms':>9s} {'TFLOP/s':>8s} {'mfu':>6s}  ({device}; {path})")
  for row in rows:
    print(f"{row['name']:28s} {row['seconds'] * 1e3:9.2f} {row['tflops']:8.2f} {row['mfu']:6.1%}")


if __name__ == "__main__":
  main()
