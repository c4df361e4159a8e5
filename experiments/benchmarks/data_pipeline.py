r"""The data path at scale: `prepare`'s speed and peak memory on a synthesised corpus larger
than 1 GiB, and the window reader's speed on the store it writes.

    python -m experiments.benchmarks.data_pipeline --gib=1.1 --workers=2 --dir=DIR

1. A JSONL corpus of `--gib` GiB is synthesised in DIR from the embedded corpora's
   documents (plays, poems and Bible chapters, drawn with replacement by a seeded
   generator), `--files` files of one document a line.
2. `python -m moejax.data.prepare` tokenizes it with the built-in BPE, once with 1 worker
   on the first file alone and once with `--workers` on the whole corpus, each in its own
   process; the peak resident memory of the command and of its largest worker
   (`/usr/bin/time -v`-style `ru_maxrss` of the process tree) is printed beside its size.
3. `python -m moejax.data.bench` reads windows from the whole store.

Every figure comes from the commands it prints; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def synthesise(directory: str, gib: float, files: int, seed: int = 0) -> list[str]:
  """Writes `files` JSONL files of `gib` GiB in all; returns their paths."""
  from moejax.data import documents

  texts = [
    t
    for split in ("train", "validation")
    for name in ("shakespeare_plays", "kjv_bible")
    for t in documents.iter_documents(f"tfds:{name}:{split}")
  ]
  lines = [json.dumps({"text": t}) + "\n" for t in texts]
  sizes = np.array([len(line.encode()) for line in lines])
  rng = np.random.default_rng(seed)
  target = int(gib * (1 << 30)) // files
  paths = []
  for i in range(files):
    path = os.path.join(directory, f"corpus-{i:03d}.jsonl")
    written = 0
    with open(path, "w", encoding="utf-8") as f:
      while written < target:
        picks = rng.integers(0, len(lines), 256)
        f.write("".join(lines[j] for j in picks))
        written += int(sizes[picks].sum())
    paths.append(path)
  return paths


# Runs a command and prints the peak RSS (KiB) of the largest process of its tree, as the
# kernel counts it for waited-for descendants: a fresh process per measured command.
_PEAK = (
  "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
  "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
  "sys.exit(code)"
)


def run(command: list[str]) -> tuple[str, float, float]:
  """(stdout, seconds, peak RSS in MiB of the largest process of the command's tree)."""
  began = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True)
  seconds = time.perf_counter() - began
  if result.returncode:
    sys.exit(f"{' '.join(command)} failed: {result.stderr.strip()}")
  peak_kib = int(result.stderr.strip().splitlines()[-1])
  print(f"$ {' '.join(command)}\n{result.stdout.strip()}", flush=True)
  return result.stdout, seconds, peak_kib / 1024


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", required=True, help="Where the corpus and stores go (new).")
  parser.add_argument("--gib", type=float, default=1.1, help="Corpus size in GiB.")
  parser.add_argument("--files", type=int, default=8, help="JSONL files of the corpus.")
  parser.add_argument("--workers", type=int, default=2, help="prepare's workers.")
  args = parser.parse_args(argv)
  if os.path.exists(args.dir):
    parser.error(f"--dir={args.dir} exists; give a new directory (nothing is overwritten).")
  from moejax.data import builtin

  os.makedirs(args.dir)
  began = time.perf_counter()
  paths = synthesise(args.dir, args.gib, args.files)
  size = sum(os.path.getsize(p) for p in paths)
  print(f"synthesised {size / (1 << 30):.2f} GiB in {len(paths)} files in "
        f"{time.perf_counter() - began:.0f} s")  # fmt: skip
  python = [sys.executable, "-m"]
  prepare = [*python, "moejax.data.prepare", f"--tokenizer={builtin.BPE_2048}"]
  _, _, small_peak = run([*prepare, f"--source=jsonl:{paths[0]}", f"--out={args.dir}/one"])
  print(f"peak RSS, 1 file ({os.path.getsize(paths[0]) / (1 << 20):.0f} MiB), 1 worker: "
        f"{small_peak:.0f} MiB")  # fmt: skip
  pattern = os.path.join(args.dir, "corpus-*.jsonl")
  _, seconds, peak = run(
    [*prepare, f"--source=jsonl:{pattern}", f"--out={args.dir}/all", f"--workers={args.workers}"]
  )
  print(f"peak RSS, {size / (1 << 30):.2f} GiB, {args.workers} workers: {peak:.0f} MiB; "
        f"{size / seconds / 1e6 / args.workers:.2f} MB of JSONL/s per worker (wall clock, "
        "process start included)")  # fmt: skip
  for masking in ("--document_masking", "--nodocument_masking"):
    run([*python, "moejax.data.bench", f"--tokens_dir={args.dir}/all", "--batch_size=256",
         "--seq_len=1024", masking])  # fmt: skip


if __name__ == "__main__":
  main()
