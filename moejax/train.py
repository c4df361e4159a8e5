"""Training: the optimizer, the train and eval steps, and the loop with checkpoints and metrics.

The model and its optimizer live as one NNX state pytree (`nnx.split`), so the jitted
steps are pure functions of (state, batch) and a checkpoint holds everything a resumed
run needs: parameters, optimizer state, the router/dropout RNG streams, the step (inside
the optimizer) and the data iterator's position.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from moejax import checkpoint as checkpoint_lib
from moejax import data as data_lib
from moejax.metrics import MetricWriter
from moejax.model import TransformerLM, moe_layer_indices

log = logging.getLogger(__name__)


def make_optimizer(train_config: ml_collections.ConfigDict):
  """AdamW with linear warmup and cosine decay, global-norm clipping; no decay on vectors.

  Returns (optax transformation, learning-rate schedule).
  """
  tc = train_config
  if tc.warmup_steps >= tc.num_steps:
    raise ValueError(f"train.warmup_steps={tc.warmup_steps} must be < train.num_steps={tc.num_steps}.")
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tc.learning_rate, warmup_steps=tc.warmup_steps,
      decay_steps=tc.num_steps, end_value=tc.learning_rate * tc.min_learning_rate_ratio)
  # Norm scales are vectors; the model has no biases. Only matrices get weight decay.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip_norm),
      optax.adamw(schedule, b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay,
                  mask=decay_mask))
  return tx, schedule


def build(config: ml_collections.ConfigDict):
  """The model and its optimizer, initialised from `config.train.seed`."""
  model = TransformerLM(config.model, rngs=nnx.Rngs(config.train.seed))
  tx, schedule = make_optimizer(config.train)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer, schedule


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy in nats: logits `[batch, seq, vocab]`, targets `[batch, seq]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def make_steps(graphdef, model_config: ml_collections.ConfigDict):
  """The pure train and eval step functions over the `(model, optimizer)` state."""
  lb_weight, z_weight = model_config.lb_loss_weight, model_config.z_loss_weight

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model.train()

    def loss_fn(model):
      logits, aux = model(batch["inputs"])
      ce = jnp.mean(cross_entropy(logits, batch["targets"]))
      loss = ce + lb_weight * aux["lb_loss"] + z_weight * aux["z_loss"]
      return loss, (ce, aux)

    (loss, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = {"loss": loss, "ce_loss": ce, "lb_loss": aux["lb_loss"], "z_loss": aux["z_loss"],
               "dropped_fraction": aux["dropped_fraction"], "expert_load": aux["expert_load"],
               "grad_norm": optax.global_norm(grads)}
    return nnx.state((model, optimizer)), metrics

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    logits, aux = model(batch["inputs"])
    ce = cross_entropy(logits, batch["targets"])
    is_byte = batch["targets"] < 256
    return {"ce_sum": jnp.sum(ce), "tokens": jnp.asarray(ce.size, jnp.float32),
            "byte_ce_sum": jnp.sum(jnp.where(is_byte, ce, 0.0)),
            "bytes": jnp.sum(is_byte).astype(jnp.float32),
            "dropped_fraction": aux["dropped_fraction"]}

  return train_step, eval_step


def evaluate(eval_step, state, batches) -> dict[str, float]:
  """Mean eval loss (nats/token) and bits per byte (specials excluded) over `batches`."""
  totals: dict[str, float] = {}
  for batch in batches:
    for name, value in jax.device_get(eval_step(state, batch)).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return {"eval/loss": totals["ce_sum"] / totals["tokens"],
          "eval/bits_per_byte": totals["byte_ce_sum"] / totals["bytes"] / math.log(2),
          "eval/dropped_fraction": totals["dropped_fraction"] / len(batches)}


def _train_record(metrics: dict[str, Any], moe_layers: tuple[int, ...]) -> dict[str, Any]:
  record = {f"train/{k}": float(v) for k, v in metrics.items() if k != "expert_load"}
  for layer, load in zip(moe_layers, np.asarray(metrics["expert_load"])):
    record[f"train/expert_load/layer_{layer}"] = [round(float(x), 5) for x in load]
  return record


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       show_progress: bool = True) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns the last train and eval metrics.
  """
  tc = config.train
  for key in ("num_steps", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every",
              "keep_checkpoints"):
    if not isinstance(tc[key], int) or tc[key] < 1:
      raise ValueError(f"train.{key}={tc[key]!r} must be a positive integer.")
  process, num_processes = jax.process_index(), jax.process_count()

  model, optimizer, schedule = build(config)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  train_iter, eval_batches = data_lib.build_datasets(
      config.data, global_batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed,
      shard_index=process, shard_count=num_processes)

  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
  start_step = 0
  if checkpoints.latest_step() is not None:
    start_step, state, data_state = checkpoints.restore(state, config)
    train_iter.set_state(data_state)
    log.info("resumed from the checkpoint at step %d", start_step)
  else:
    checkpoints.check_fresh_start()

  m = config.model
  moe_layers = moe_layer_indices(m.num_layers, m.num_experts, m.moe_layer_interval)
  writer = MetricWriter(workdir, enabled=process == 0, resume_step=start_step)
  train_step, eval_step = make_steps(graphdef, config.model)
  train_step = jax.jit(train_step, donate_argnums=0)
  eval_step = jax.jit(eval_step)

  tokens_per_step = tc.batch_size * tc.seq_len
  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] = {}
  interval_start, interval_steps = time.perf_counter(), 0
  progress = tqdm(total=tc.num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                  disable=not (show_progress and process == 0))
  for step in range(start_step + 1, tc.num_steps + 1):
    batch = next(train_iter)
    state, metrics = train_step(state, batch)
    interval_steps += 1
    if step % tc.log_every == 0 or step == tc.num_steps:
      record = _train_record(jax.device_get(metrics), moe_layers)
      elapsed = time.perf_counter() - interval_start
      record["train/tokens_per_sec"] = interval_steps * tokens_per_step / elapsed
      record["train/learning_rate"] = float(schedule(step - 1))
      writer.write(step, record)
      last_train = record
      progress.set_postfix(loss=f"{record['train/loss']:.3f}")
      interval_start, interval_steps = time.perf_counter(), 0
    if step % tc.eval_every == 0 or step == tc.num_steps:
      last_eval = evaluate(eval_step, state, eval_batches)
      writer.write(step, last_eval)
      progress.write(f"step {step}: eval loss {last_eval['eval/loss']:.4f}, "
                     f"{last_eval['eval/bits_per_byte']:.4f} bits/byte")
      interval_start = time.perf_counter()
    if step % tc.checkpoint_every == 0 or step == tc.num_steps:
      checkpoints.save(step, state, train_iter.get_state(), config)
    progress.update(1)
  progress.close()
  checkpoints.close()
  writer.close()
  return {**last_train, **last_eval}
