"""Evaluate a checkpoint: `python -m moejax.eval --workdir=DIR [--step=N] [--split=NAME]
[--batches=N] [--tokens_dir=STORE | --data_name=NAME]`

Loads the newest readable checkpoint of DIR (or `--step`), never writing to DIR, and runs
it in eval mode over the validation split as training evaluates it (the same batches,
`data.eval_batches` of them unless `--batches`): loss, bits per byte, the dropped share
of expert assignments, and each MoE layer's expert load (share of assignments per
expert; 1/E each when balanced).

Other data: `--tokens_dir=STORE` scores a whole token store (prepared with the model's
tokenizer: `moejax.data.token_data.check_model_data`), `--data_name=NAME` a TFDS or
embedded dataset's `--split` as bytes (a byte model only). A model with a vocabulary of
its own is never scored on bytes, and a non-finite result is a failed evaluation (exit 1).
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
from moejax.data.sources import check_dataset
from moejax.data.token_data import check_model_data
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
  flags.DEFINE_string(
    "tokens_dir", None, "Score this token store (all of it) instead of the run's held-out data."
  )
  flags.DEFINE_string(
    "data_name",
    None,
    "Score this TFDS or embedded dataset's --split (as bytes) instead of the run's data.",
  )
  flags.mark_flag_as_required("workdir")


def with_eval_data(config, *, tokens_dir: str | None, data_name: str | None):
  """`config` (a copy) reading its eval data from token store `tokens_dir` (the whole
  store) or from dataset `data_name` (bytes), else unchanged; the run's batch, sequence,
  packing and document-masking settings are kept."""
  if tokens_dir and data_name:
    raise ValueError("--tokens_dir and --data_name both name data to score; pass one.")
  if not (tokens_dir or data_name):
    return config
  config = config.copy_and_resolve_references()
  d = config.data
  d.mixture = d.eval_fraction = None
  d.tokens_dir = d.eval_tokens_dir = tokens_dir
  if data_name:
    d.name = data_name
  return config


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


def check_finite(result: dict[str, Any], step: int, workdir: str) -> None:
  """A one-line RuntimeError (a failed evaluation, exit 1) when the loss or bits per byte
  of `evaluate_model`'s `result` is NaN or infinite."""
  if not all(math.isfinite(result[k]) for k in ("loss", "bits_per_byte")):
    raise RuntimeError(
      f"checkpoint {step} of {workdir} scores a non-finite loss ({result['loss']} "
      f"nats/token, {result['bits_per_byte']} bits/byte): its weights hold NaN/Inf, or the "
      "data holds ids past its vocabulary."
    )


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
  config = with_eval_data(config, tokens_dir=FLAGS.tokens_dir, data_name=FLAGS.data_name)
  if FLAGS.split and data_lib.uses_token_stores(config.data):
    raise ValueError(
      "--split: this evaluation reads token stores (the run's held-out tokens, or "
      "--tokens_dir), which have no splits; drop --split."
    )
  check_model_data(
    config.data, FLAGS.workdir, key="--workdir", use="score", store_key="--tokens_dir"
  )
  split = FLAGS.split or config.data.eval_split
  if FLAGS.data_name:
    try:
      check_dataset(FLAGS.data_name, config.data.data_dir, {"--split": split})
    except ValueError as error:  # a wrong name names config.data.name: say which flag set it
      raise ValueError(f"--data_name={FLAGS.data_name}: {error}") from None
  try:
    batches = eval_batches(
      config, split=split, max_batches=FLAGS.batches or config.data.eval_batches
    )
  except ValueError as error:  # an unknown split, or one shorter than a batch
    source = (
      f"--tokens_dir={FLAGS.tokens_dir}"
      if FLAGS.tokens_dir
      else "the run's held-out tokens"
      if data_lib.uses_token_stores(config.data)
      else f"--split={split}"
    )
    raise ValueError(f"{source}: {cli.one_line(error)}") from error
  result = evaluate_model(model, batches)
  check_finite(result, step, FLAGS.workdir)
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
