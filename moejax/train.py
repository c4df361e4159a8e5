"""Training: the optimizer, the train and eval steps, and the loop with checkpoints and metrics.

The model and its optimizer live as one NNX state pytree (`nnx.split`), so the jitted
steps are pure functions of (state, batch) and a checkpoint holds everything a resumed
run needs: parameters, optimizer state, the router/dropout RNG streams, the step (inside
the optimizer) and the data iterator's position.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from moejax import checkpoint as checkpoint_lib
from moejax import data as data_lib
from moejax import sharding
from moejax.metrics import MetricWriter
from moejax.model import TransformerLM, moe_layer_indices

log = logging.getLogger(__name__)


def make_optimizer(train_config: ml_collections.ConfigDict):
  """AdamW with linear warmup and cosine decay, global-norm clipping; no decay on vectors.

  Returns (optax transformation, learning-rate schedule).
  """
  tc = train_config
  if tc.warmup_steps >= tc.num_steps:
    raise ValueError(
      f"train.warmup_steps={tc.warmup_steps} must be < train.num_steps={tc.num_steps}."
    )
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=tc.learning_rate,
    warmup_steps=tc.warmup_steps,
    decay_steps=tc.num_steps,
    end_value=tc.learning_rate * tc.min_learning_rate_ratio,
  )
  # Norm scales are vectors; the model has no biases. Only matrices get weight decay.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
    optax.clip_by_global_norm(tc.grad_clip_norm),
    optax.adamw(
      schedule, b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay, mask=decay_mask
    ),
  )
  return tx, schedule


def build(config: ml_collections.ConfigDict, mesh=None):
  """(model, optimizer, learning-rate schedule), initialised from `config.train.seed`; the
  model runs on `mesh` (None: one device's program)."""
  model = TransformerLM(config.model, mesh=mesh, rngs=nnx.Rngs(config.train.seed))
  tx, schedule = make_optimizer(config.train)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer, schedule


def init_state(config: ml_collections.ConfigDict, mesh):
  """The `(model, optimizer)` NNX state, created directly in its shardings on `mesh`.

  Initialising inside `jit` with `out_shardings` lets every process create just its own
  shards (no host holds the whole model), as multi-host runs need.

  Returns (graphdef, state, state shardings).
  """
  pair = lambda: build(config, mesh)[:2]
  graphdef, abstract = nnx.split(nnx.eval_shape(pair))
  shardings = sharding.param_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.state(pair()), out_shardings=shardings)()
  return graphdef, state, shardings


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy in nats: logits `[batch, seq, vocab]`, targets `[batch, seq]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


# What the train step checks for NaN/Inf: the loss terms, the gradients, and the
# parameters after the update (Adam can overflow with finite gradients).
_LOSS_TERMS = ("ce_loss", "lb_loss", "z_loss", "grad_norm", "updated_params")


def make_steps(graphdef, model_config: ml_collections.ConfigDict):
  """The pure train and eval step functions over the `(model, optimizer)` state.

  The loss is CE + Σ over MoE layers of (lb_loss_weight · LB + z_loss_weight · Z): each
  MoE layer gets the same balancing pressure however many there are (Switch, ST-MoE and
  Megatron-Core add each layer's auxiliary loss); the `lb_loss`/`z_loss` metrics are the
  per-layer means.

  The train step applies an update only when every loss term and the gradient norm are
  finite; otherwise parameters and optimizer state stay as they were (the RNG streams
  still advance) and `metrics['nonfinite']` names the bad terms as a bit mask over
  `_LOSS_TERMS`.
  """
  m = model_config
  num_moe_layers = len(moe_layer_indices(m))
  lb_weight, z_weight = num_moe_layers * m.lb_loss_weight, num_moe_layers * m.z_loss_weight

  def train_step(state, batch):
    old_leaves = jax.tree.leaves(state)  # merge may share Variables with `state`
    model, optimizer = nnx.merge(graphdef, state)
    model.train()

    def loss_fn(model):
      logits, aux = model(batch["inputs"])
      ce = jnp.mean(cross_entropy(logits, batch["targets"]))
      loss = ce + lb_weight * aux["lb_loss"] + z_weight * aux["z_loss"]
      return loss, (ce, aux)

    (loss, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = {
      "loss": loss,
      "ce_loss": ce,
      "lb_loss": aux["lb_loss"],
      "z_loss": aux["z_loss"],
      "dropped_fraction": aux["dropped_fraction"],
      "expert_load": aux["expert_load"],
      "grad_norm": optax.tree.norm(grads),
    }
    params_finite = jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param))])
    )
    bad = [~jnp.isfinite(metrics[name]) for name in _LOSS_TERMS[:-1]] + [~params_finite]
    metrics["nonfinite"] = sum(b.astype(jnp.int32) << i for i, b in enumerate(bad))
    new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
    keep_old = metrics["nonfinite"] > 0
    leaves = [
      new if checkpoint_lib.is_prng_key(new) else jnp.where(keep_old, old, new)
      for new, old in zip(new_leaves, old_leaves)
    ]
    return jax.tree.unflatten(treedef, leaves), metrics

  def eval_step(state, batch):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    logits, aux = model(batch["inputs"])
    ce = cross_entropy(logits, batch["targets"])
    is_byte = batch["targets"] < 256
    return {
      "ce_sum": jnp.sum(ce),
      "tokens": jnp.asarray(ce.size, jnp.float32),
      "byte_ce_sum": jnp.sum(jnp.where(is_byte, ce, 0.0)),
      "bytes": jnp.sum(is_byte).astype(jnp.float32),
      "dropped_fraction": aux["dropped_fraction"],
    }

  return train_step, eval_step


def nonfinite_terms(mask: int) -> list[str]:
  """The names of the loss terms flagged in a train step's `nonfinite` bit mask."""
  return [name for i, name in enumerate(_LOSS_TERMS) if mask >> i & 1]


def evaluate(eval_step, state, batches) -> dict[str, float]:
  """Mean eval loss (nats/token) and bits per byte (specials excluded) over `batches`."""
  totals: dict[str, float] = {}
  for batch in batches:
    for name, value in jax.device_get(eval_step(state, batch)).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return {
    "eval/loss": totals["ce_sum"] / totals["tokens"],
    "eval/bits_per_byte": totals["byte_ce_sum"] / totals["bytes"] / math.log(2),
    "eval/dropped_fraction": totals["dropped_fraction"] / len(batches),
  }


def _train_record(metrics: dict[str, Any], moe_layers: tuple[int, ...]) -> dict[str, Any]:
  record = {f"train/{k}": float(v) for k, v in metrics.items() if k != "expert_load"}
  for layer, load in zip(moe_layers, np.asarray(metrics["expert_load"])):
    record[f"train/expert_load/layer_{layer}"] = [round(float(x), 5) for x in load]
  return record


NONFINITE_POLICIES = ("stop", "skip")


def validate_train_config(tc: ml_collections.ConfigDict) -> None:
  for key in (
    "num_steps",
    "batch_size",
    "seq_len",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
  ):
    if not isinstance(tc[key], int) or tc[key] < 1:
      raise ValueError(f"config.train.{key}={tc[key]!r} must be a positive integer.")
  if tc.nonfinite_policy not in NONFINITE_POLICIES:
    raise ValueError(
      f"config.train.nonfinite_policy={tc.nonfinite_policy!r}; allowed: "
      f"{', '.join(NONFINITE_POLICIES)}."
    )
  if not tc.learning_rate > 0:
    raise ValueError(f"config.train.learning_rate={tc.learning_rate!r} must be > 0.")


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and makes sure files can be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise PermissionError(
      f"workdir {workdir!r} is not writable ({error.strerror}); pass a --workdir you can write to."
    ) from None


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, show_progress: bool = True
) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint if there is one.

  SIGTERM or SIGINT ends the run after the current step with a checkpoint (all processes
  agree on the step). A non-finite loss term or gradient is never applied; with
  `train.nonfinite_policy='stop'` it ends the run with `FloatingPointError`.

  Returns the last train and eval metrics, and `preempted` (True if a signal ended it).
  """
  tc = config.train
  validate_train_config(tc)
  check_workdir(workdir)
  process, num_processes = jax.process_index(), jax.process_count()

  m = config.model
  mesh = sharding.make_mesh(config.mesh)
  sharding.validate_mesh(
    mesh,
    num_experts=m.num_experts,
    global_batch_size=tc.batch_size,
    seq_len=tc.seq_len,
    group_size=m.group_size,
  )

  graphdef, state, state_shardings = init_state(config, mesh)
  _, schedule = make_optimizer(tc)

  if num_processes > 1:  # one process builds the built-in corpus; the others wait for it
    if process == 0:
      data_lib.prepare(config.data.name, config.data.data_dir)
    multihost_utils.sync_global_devices("moejax: dataset prepared")
  train_iter, eval_batches = data_lib.build_datasets(
    config.data,
    global_batch_size=tc.batch_size,
    seq_len=tc.seq_len,
    seed=tc.seed,
    shard_index=process,
    shard_count=num_processes,
  )

  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=tc.keep_checkpoints)
  start_step, state, data_state = checkpoints.restore_newest_intact(state)
  if start_step:
    train_iter.set_state(data_state)
    log.info("resumed from the checkpoint at step %d", start_step)

  moe_layers = moe_layer_indices(m)
  writer = MetricWriter(workdir, enabled=process == 0, resume_step=start_step)
  train_step, eval_step = make_steps(graphdef, config.model)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_step = jax.jit(
    train_step,
    in_shardings=(state_shardings, batch_sharding),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated
  )
  eval_batches = [sharding.shard_batch(b, mesh) for b in eval_batches]

  tokens_per_step = tc.batch_size * tc.seq_len
  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] = {}
  skipped = 0
  interval_start, interval_steps = time.perf_counter(), 0
  progress = tqdm(
    total=tc.num_steps,
    initial=start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not (show_progress and process == 0),
  )
  step, saved_step = start_step, start_step
  with PreemptionWatch(num_processes) as preemption:
    try:
      while step < tc.num_steps:
        step += 1
        batch = sharding.shard_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        interval_steps += 1
        bad = int(metrics["nonfinite"])
        if bad:
          terms = ", ".join(nonfinite_terms(bad))
          if tc.nonfinite_policy == "stop":
            raise FloatingPointError(
              f"step {step}: non-finite {terms}; the update was not applied and the run "
              f"stopped (checkpoints up to step {saved_step} are intact; "
              "--config.train.nonfinite_policy=skip skips such steps instead)."
            )
          skipped += 1
          log.warning("step %d: non-finite %s; update skipped (%d so far)", step, terms, skipped)
        if step % tc.log_every == 0 or step == tc.num_steps:
          record = _train_record(jax.device_get(metrics), moe_layers)
          elapsed = time.perf_counter() - interval_start
          record["train/tokens_per_sec"] = interval_steps * tokens_per_step / elapsed
          record["train/learning_rate"] = float(schedule(step - 1))
          record["train/skipped_steps"] = skipped
          writer.write(step, record)
          last_train = record
          progress.set_postfix(loss=f"{record['train/loss']:.3f}")
          interval_start, interval_steps = time.perf_counter(), 0
        if step % tc.eval_every == 0 or step == tc.num_steps:
          last_eval = evaluate(eval_step, state, eval_batches)
          writer.write(step, last_eval)
          progress.write(
            f"step {step}: eval loss {last_eval['eval/loss']:.4f}, "
            f"{last_eval['eval/bits_per_byte']:.4f} bits/byte"
          )
          interval_start = time.perf_counter()
        stop = preemption.requested()
        if step % tc.checkpoint_every == 0 or step == tc.num_steps or stop:
          checkpoints.save(step, state, train_iter.get_state(), config)
          saved_step = step
        progress.update(1)
        if stop:
          progress.write(
            f"stopped by a signal at step {step}; checkpoint saved. "
            "Rerun the same command to resume."
          )
          break
    finally:
      progress.close()
      checkpoints.close()
      writer.close()
  return {**last_train, **last_eval, "preempted": step < tc.num_steps}


class PreemptionWatch:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  With several processes, `requested()` is true on all of them at the same step: each
  step they share their flags (an all-gather of one int), so every host checkpoints the
  same step, as JAX's preemption sync point does on TPU.
  """

  def __init__(self, num_processes: int):
    self.num_processes = num_processes
    self._flag = False
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self._flag:  # a second signal: stop now
      raise KeyboardInterrupt(f"signal {signum} received twice")
    self._flag = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def requested(self) -> bool:
    if self.num_processes == 1:
      return self._flag
    flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
    return bool(np.any(flags))
