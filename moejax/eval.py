"""Evaluate a checkpoint: `python -m moejax.eval --workdir=DIR [--step=N] [--split=NAME]
[--batches=N]`

Loads the newest readable checkpoint of DIR (or `--step`), never writing to DIR, and runs
it in eval mode over the validation split as training evaluates it (the same batches,
`data.eval_batches` of them unless `--batches`): loss, bits per byte, the dropped share
of expert assignments, and each MoE layer's expert load (share of assignments per
expert; 1/E each when balanced).
"""

from __future__ import annotations

from moejax.runtime import signals

if __name__ == "__main__":  # first thing: a signal at any later moment ends it cleanly
  signals.handle_signals("evaluation stopped; nothing was written.")


import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

from moejax import data as data_lib
from moejax.runtime import cli
from moejax.training.loading import load_model
from moejax.training.steps import document_layout, eval_sums


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Run directory with checkpoints (only read).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest readable).")
  flags.DEFINE_string("split", None, "Split to evaluate (default: the run's data.eval_split).")
  flags.DEFINE_integer(
    "batches", None, "Batches to evaluate (default: the run's data.eval_batches).", lower_bound=1
  )
  flags.mark_flag_as_required("workdir")


def eval_batches(config, *, split: str, max_batches: int) -> list[dict[str, np.ndarray]]:
  """The batches training evaluates on (`[batch_size, seq_len]` inputs and targets); for a
  run on token stores, its held-out tokens (`split` does not apply)."""
  if data_lib.uses_token_stores(config.data):
    return data_lib.token_eval_batches(
      config.data,
      global_batch_size=config.train.batch_size,
      seq_len=config.train.seq_len,
      max_batches=max_batches,
    )
  texts = data_lib.load_split(
    config.data.name, split, config.data.data_dir, text_key=config.data.text_key
  )
  windows = data_lib.pack_documents(texts, config.train.seq_len)
  return data_lib.make_eval_batches(
    windows, global_batch_size=config.train.batch_size, max_batches=max_batches
  )


def evaluate_model(model, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
  """`model` in eval mode over `batches`.

  Returns `loss` (nats per token), `bits_per_byte` (text targets over their bytes), `dropped_fraction`
  (mean over batches) and `expert_load` (`[moe_layers, experts]`, mean over batches).
  """
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    logits, aux = nnx.merge(graphdef, state)(batch["inputs"], **document_layout(batch))
    return eval_sums(logits, aux, batch) | {"expert_load": aux["expert_load"]}

  outputs = [jax.device_get(forward(state, batch)) for batch in batches]
  total = lambda name: float(sum(np.sum(o[name], dtype=np.float64) for o in outputs))
  return {
    "loss": total("ce_sum") / total("tokens"),
    "bits_per_byte": total("text_ce_sum") / total("bytes") / math.log(2),
    "dropped_fraction": total("dropped_fraction") / len(outputs),
    "expert_load": np.mean([o["expert_load"] for o in outputs], axis=0),
  }


def report(result: dict[str, Any], moe_layers: Sequence[int]) -> str:
  """The evaluation as lines of text."""
  lines = [
    f"loss {result['loss']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte, "
    f"dropped {result['dropped_fraction']:.2%} of expert assignments"
  ]
  loads = result["expert_load"]
  if len(moe_layers):
    experts = loads.shape[-1]
    lines.append(f"expert load per MoE layer (share of assignments; balanced = {1 / experts:.3f}):")
    for layer, load in zip(moe_layers, loads, strict=True):
      shares = " ".join(f"{x:.3f}" for x in load)
      lines.append(f"  layer {layer}: {shares}  (max x E = {load.max() * experts:.2f})")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  model, config, step = load_model(FLAGS.workdir, FLAGS.step)
  if FLAGS.split and data_lib.uses_token_stores(config.data):
    raise ValueError(
      "--split: this run reads token stores, whose held-out tokens are data.eval_tokens_dir "
      "or data.eval_fraction; drop --split."
    )
  split = FLAGS.split or config.data.eval_split
  try:
    batches = eval_batches(
      config, split=split, max_batches=FLAGS.batches or config.data.eval_batches
    )
  except ValueError as error:  # an unknown split, or one shorter than a batch
    raise ValueError(f"--split={split}: {cli.one_line(error)}") from error
  result = evaluate_model(model, batches)
  t = config.train
  held_out = config.data.eval_tokens_dir or (
    f"the last {config.data.eval_fraction:g} of the training stores"
    if data_lib.uses_token_stores(config.data)
    else f"{config.data.name}[{split}]"
  )
  print(
    f"checkpoint at step {step} of {FLAGS.workdir}, on {held_out}: "
    f"{len(batches)} batches of {t.batch_size} x {t.seq_len} tokens"
  )
  print(report(result, model.moe_layer_indices), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
