r"""Peer: HuggingFace transformers' `MixtralSparseMoeBlock` on CPU PyTorch, same shapes.

    # in a separate environment: torch and transformers are in no moejax install
    pip install torch==2.13.0 transformers numpy
    python -m experiments.benchmarks.mixtral_torch [--num_experts=16,64] [--threads=2]

The workload of `experiments.benchmarks.moe_layer`: float32, T = 8 x 512 tokens,
d_model 512, expert hidden 1024, top-2, SwiGLU experts, forward + backward of
`sum(y²)` with gradients of every parameter and the input. Rows, medians of `--reps`
interleaved repetitions after `--warmup` untimed runs:

  * `matmul`: a float32 `[N, N] @ [N, N]` in PyTorch (the rate `mfu` is measured against);
  * `dense`: PyTorch SwiGLU FFN of hidden top_k · d_ff (bias-free `nn.Linear`s), the
    block's own dense baseline;
  * `mixtral`: `MixtralSparseMoeBlock(MixtralConfig(...))` per `--num_experts` (dropless:
    every token reaches its two experts), `vs_dense` = its time / the dense row's.

`glibc_tunables` (CSV) records the process's `GLIBC_TUNABLES`: `make bench` runs with
`glibc.malloc.hugetlb=1`, which changes CPU timings (docs/performance.md).
Writes a CSV (never overwriting: `-1`, `-2`, ... suffixes) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from experiments.benchmarks.common import (
  expert_flops,
  interleaved_times,
  malloc_tunables,
  write_rows,
)

COLUMNS = (
  "name",
  "num_experts",
  "threads",
  "reps",
  "median_ms",
  "min_ms",
  "max_ms",
  "vs_dense",
  "gflop_per_s",
  "mfu",
  "torch",
  "transformers",
  "glibc_tunables",
)


class SwiGLU(torch.nn.Module):
  def __init__(self, d_model: int, hidden: int):
    super().__init__()
    self.gate = torch.nn.Linear(d_model, hidden, bias=False)
    self.up = torch.nn.Linear(d_model, hidden, bias=False)
    self.down = torch.nn.Linear(hidden, d_model, bias=False)

  def forward(self, x):
    return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def main() -> None:
  import transformers

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_experts", default="16,64")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="mixtral_torch_benchmark.csv")
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  batch, seq, d, f, k = 8, 512, 512, 1024, 2
  tokens = batch * seq
  x = torch.randn(batch, seq, d)
  n = 4096
  a, b = torch.randn(n, n), torch.randn(n, n)

  def fwd_bwd(module):
    def run():
      inp = x.clone().requires_grad_(True)
      out = module(inp)
      out = out[0] if isinstance(out, tuple) else out
      (out**2).sum().backward()
      module.zero_grad(set_to_none=True)

    return run

  rows = [
    ("matmul", "", lambda: torch.matmul(a, b), 2.0 * n**3),
    ("dense", "", fwd_bwd(SwiGLU(d, k * f)), 3 * expert_flops(tokens, d, k * f)),
  ]
  for num_experts in (int(v) for v in args.num_experts.split(",")):
    config = MixtralConfig(
      hidden_size=d,
      intermediate_size=f,
      num_local_experts=num_experts,
      num_experts_per_tok=k,
      hidden_act="silu",
    )
    block = MixtralSparseMoeBlock(config).train()
    flops = 3 * (expert_flops(tokens, d, k * f) + 2 * tokens * d * num_experts)
    rows.append(("mixtral", num_experts, fwd_bwd(block), flops))

  times = interleaved_times(
    {i: row[2] for i, row in enumerate(rows)}, reps=args.reps, warmup=args.warmup
  )
  med = {i: statistics.median(t) for i, t in times.items()}
  rate = rows[0][3] / med[0]
  table = []
  for i, (name, experts, _, flops) in enumerate(rows):
    table.append(
      {
        "name": name,
        "num_experts": experts,
        "threads": args.threads,
        "reps": args.reps,
        "median_ms": med[i] * 1e3,
        "min_ms": min(times[i]) * 1e3,
        "max_ms": max(times[i]) * 1e3,
        "vs_dense": med[i] / med[1] if i else "",
        "gflop_per_s": flops / med[i] / 1e9,
        "mfu": flops / med[i] / rate,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "glibc_tunables": malloc_tunables(),
      }
    )
  path = write_rows(table, COLUMNS, args.out)
  print(
    f"torch {torch.__version__}, transformers {transformers.__version__}, "
    f"{args.threads} threads; GLIBC_TUNABLES={malloc_tunables()!r}"
  )
  print("| row | E | median ms | × dense | GFLOP/s | MFU |\n|---|---|---|---|---|---|")
  for r in table:
    vs = "" if r["vs_dense"] == "" else f"{r['vs_dense']:.2f}"
    print(
      f"| {r['name']} | {r['num_experts']} | {r['median_ms']:.1f} | {vs} | "
      f"{r['gflop_per_s']:.1f} | {r['mfu']:.3f} |"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
