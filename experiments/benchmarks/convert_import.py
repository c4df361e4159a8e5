r"""The time and peak memory of `moejax.convert import` on a synthetic Mixtral-layout
checkpoint of 16 experts × 8 layers (bfloat16, in shards of 2 GiB).

    python -m experiments.benchmarks.convert_import --dir=/tmp/convert_bench   # 2.9 GiB
    python -m experiments.benchmarks.convert_import --dir=DIR --preset=smoke     # 1.5 MiB

The checkpoint (d_model 1024, experts of hidden 3584, 8 heads of 128, 2 KV heads,
vocabulary 32000) is written once into DIR/hf with random weights; each run imports it
into a fresh DIR/run_N in a child process (`python -m moejax.convert import`) and reports
the wall time and the child's peak resident memory (`ru_maxrss`), next to the size of the
checkpoint and of its largest tensor and expert stack. Prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

PRESETS = {
  "full": dict(d=1024, f=3584, layers=8, experts=16, heads=8, kv=2, vocab=32000),
  "smoke": dict(d=32, f=64, layers=2, experts=4, heads=2, kv=1, vocab=256),
}


def write_synthetic(directory: str, p: dict, shard_bytes: int = 2 * 2**30) -> int:
  """Writes config.json and the safetensors shards; returns the bytes of tensors."""
  os.makedirs(directory, exist_ok=True)
  d, f, hd = p["d"], p["f"], p["d"] // p["heads"]
  shapes = {"model.embed_tokens.weight": (p["vocab"], d), "model.norm.weight": (d,)}
  shapes["lm_head.weight"] = (p["vocab"], d)
  for i in range(p["layers"]):
    q = f"model.layers.{i}."
    shapes.update({q + "input_layernorm.weight": (d,), q + "post_attention_layernorm.weight": (d,)})
    shapes.update(
      {
        q + "self_attn.q_proj.weight": (p["heads"] * hd, d),
        q + "self_attn.o_proj.weight": (d, p["heads"] * hd),
      }
    )
    shapes.update(
      {
        q + "self_attn.k_proj.weight": (p["kv"] * hd, d),
        q + "self_attn.v_proj.weight": (p["kv"] * hd, d),
      }
    )
    shapes[q + "block_sparse_moe.gate.weight"] = (p["experts"], d)
    for e in range(p["experts"]):
      x = f"{q}block_sparse_moe.experts.{e}."
      shapes.update({x + "w1.weight": (f, d), x + "w3.weight": (f, d), x + "w2.weight": (d, f)})
  rng = np.random.default_rng(0)
  shards, size = [[]], 0
  for key, shape in shapes.items():
    nbytes = math.prod(shape) * 2
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  weight_map = {}
  for n, keys in enumerate(shards):
    name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {
      k: (rng.standard_normal(shapes[k], np.float32) * 0.02).astype(ml_dtypes.bfloat16)
      for k in keys
    }
    save_file(tensors, os.path.join(directory, name))
    weight_map.update({k: name for k in keys})
    del tensors
  total = sum(math.prod(s) * 2 for s in shapes.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as file:
    json.dump(index, file)
  config = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": p["vocab"],
    "hidden_size": d,
    "intermediate_size": f,
    "num_hidden_layers": p["layers"],
    "num_attention_heads": p["heads"],
    "num_key_value_heads": p["kv"],
    "num_local_experts": p["experts"],
    "num_experts_per_tok": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
  }
  with open(os.path.join(directory, "config.json"), "w") as file:
    json.dump(config, file)
  return total


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", required=True, help="Where the checkpoint and imports go.")
  parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
  parser.add_argument("--runs", type=int, default=2)
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  source = os.path.join(args.dir, "hf")
  if not os.path.exists(os.path.join(source, "config.json")):
    write_synthetic(source, p)
  total = sum(
    os.path.getsize(os.path.join(source, n))
    for n in os.listdir(source)
    if n.endswith(".safetensors")
  )
  largest = p["vocab"] * p["d"] * 2
  stack = p["experts"] * 3 * p["d"] * p["f"] * 2
  print(
    f"checkpoint: {total / 2**30:.2f} GiB in files; largest tensor {largest / 2**20:.0f} MiB; "
    f"one layer's expert stack {stack / 2**20:.0f} MiB"
  )
  for n in range(args.runs):
    run = os.path.join(args.dir, f"run_{time.strftime('%Y%m%dT%H%M%S')}_{n}")
    start = time.perf_counter()
    done = subprocess.run(
      [sys.executable, "-m", "moejax.convert", "import", f"--from={source}", f"--workdir={run}"],
      capture_output=True,
      text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode:
      print(done.stderr, file=sys.stderr)
      return 1
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # largest child so far
    print(f"run {n}: {wall:.1f} s wall, peak RSS {peak / 2**30:.2f} GiB ({done.stdout.strip()})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
