"""Training: the optimizer, the train and eval steps, and the loop with checkpoints and metrics.

The model and its optimizer live as one NNX state pytree (`nnx.split`), so the jitted
steps are pure functions of (state, batch) and a checkpoint holds everything a resumed
run needs: parameters, optimizer state, the router/dropout RNG streams, the step (inside
the optimizer) and the data iterator's position.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import threading
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from moejax import checkpoint as checkpoint_lib
from moejax import config_text, parallel, signals
from moejax import data as data_lib
from moejax import workdir as workdir_lib
from moejax.metrics import MetricWriter, read_metrics
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


def build(config: ml_collections.ConfigDict):
  """(model, optimizer, learning-rate schedule), initialised from `config.train.seed`."""
  model = TransformerLM(config.model, rngs=nnx.Rngs(config.train.seed))
  tx, schedule = make_optimizer(config.train)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return model, optimizer, schedule


def init_state(config: ml_collections.ConfigDict, mesh):
  """The `(model, optimizer)` NNX state, created directly in its shardings on `mesh`.

  Initialising inside `jit` with `out_shardings` lets every process create just its own
  shards (no host holds the whole model), as multi-host runs need.

  Returns (graphdef, state, state shardings).
  """
  pair = lambda: build(config)[:2]
  graphdef, abstract = nnx.split(nnx.eval_shape(pair))
  shardings = parallel.param_shardings(abstract, mesh)
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

  The train step applies an update only when every loss term and the gradient norm are
  finite; otherwise parameters and optimizer state stay as they were (the RNG streams
  still advance) and `metrics['nonfinite']` names the bad terms as a bit mask over
  `_LOSS_TERMS`.
  """
  lb_weight, z_weight = model_config.lb_loss_weight, model_config.z_loss_weight

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


# ----------------------------------------------------------------------------- before the loop

# Keys a resumed run may change without --allow_config_change: they decide when to log,
# evaluate and save, where the data is, and how devices are laid out (every `mesh.` key),
# not what is computed.
RESUMABLE_KEYS = frozenset(
  {
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.data_dir",
  }
)


def _resumable(key: str) -> bool:
  return key in RESUMABLE_KEYS or key.startswith("mesh.")


def fitting_meshes(config: ml_collections.ConfigDict, num_devices: int) -> list[dict[str, int]]:
  """The `{'data': d, 'expert': e}` splits of `num_devices` that `parallel.validate_mesh`
  accepts for this model and batch (other mesh axes at 1)."""
  m, tc = config.model, config.train
  fits = []
  for expert in range(1, num_devices + 1):
    if num_devices % expert:
      continue
    sizes = {name: 1 for name in parallel.MESH_AXES}
    sizes.update({parallel.MESH_AXES[0]: num_devices // expert, parallel.EXPERT: expert})
    mesh = types.SimpleNamespace(
      axis_names=tuple(sizes), axis_sizes=tuple(sizes.values()), shape=sizes
    )
    try:
      parallel.validate_mesh(
        mesh,
        num_experts=m.num_experts,
        global_batch_size=tc.batch_size,
        seq_len=tc.seq_len,
        group_size=m.group_size,
      )
    except ValueError:
      continue
    fits.append(sizes)
  return fits


def make_run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over all devices, checked against the model and batch; a
  mesh that does not fit raises a one-line ValueError that lists the sizes that would."""
  m, tc = config.model, config.train
  try:
    mesh = parallel.make_mesh(config.mesh)
    parallel.validate_mesh(
      mesh,
      num_experts=m.num_experts,
      global_batch_size=tc.batch_size,
      seq_len=tc.seq_len,
      group_size=m.group_size,
    )
  except ValueError as error:
    devices = jax.device_count()
    fits = fitting_meshes(config, devices)
    if fits:
      options = ", ".join(
        " ".join(f"--config.mesh.{k}={v}" for k, v in sizes.items() if k in config.mesh)
        for sizes in fits
      )
      hint = f"Sizes that fit the {devices} devices: {options}."
    else:
      hint = (
        f"No data x expert split of the {devices} devices fits: make train.batch_size a "
        f"multiple of {devices}"
        + (" and model.num_experts divisible by mesh.expert." if m.num_experts else ".")
      )
    raise ValueError(f"{' '.join(str(error).split())} {hint}") from None
  return mesh


@dataclasses.dataclass
class RunPlan:
  """What a run will do, found out before anything is written.

  `workdir` resolved; `mesh` checked against the model and batch; `steps` of the
  checkpoints already there (newest first); `changes`, the config keys that differ from
  the run's saved config (`{key: (saved, now)}`); `num_params` of the model.
  """

  workdir: epath.Path
  mesh: jax.sharding.Mesh
  steps: list[int]
  changes: dict[str, tuple[Any, Any]]
  num_params: int

  @property
  def resume_step(self) -> int:
    return self.steps[0] if self.steps else 0


def plan_run(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> RunPlan:
  """Every check a run makes before it writes anything (ValueError with one line each):
  the train, model and optimizer settings, the mesh, the workdir, the fit of the config
  to the checkpoints there, and, when resuming, that the config is the run's own.

  A resumed run whose config differs from the one saved with its newest readable
  checkpoint (or in `config.json`, before the first checkpoint) in keys outside
  `RESUMABLE_KEYS` and `mesh.` is refused unless `allow_config_change`.
  """
  validate_train_config(config.train)
  _, abstract_state = nnx.split(nnx.eval_shape(lambda: build(config)[:2]))
  num_params = sum(
    math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract_state, nnx.Param))
  )
  mesh = make_run_mesh(config)
  path = workdir_lib.check(workdir)
  steps, saved = [], None
  if path.exists():
    checkpoints = checkpoint_lib.Checkpointer(
      path, keep=config.train.keep_checkpoints, create=False
    )
    try:
      steps = checkpoints.steps()
      checkpoints.check_fits_newest_readable(abstract_state)
      saved = _newest_saved_config(checkpoints, steps)
    finally:
      checkpoints.close()
    if saved is None:
      saved = workdir_lib.read_config(path)
  changes = {} if saved is None else config_text.differences(saved, config_text.as_json(config))
  refused = {k: v for k, v in changes.items() if not _resumable(k)}
  if refused and not allow_config_change:
    raise ValueError(
      f"{workdir} holds a run with another config ({config_text.format_differences(refused)}; "
      "saved -> now). Rerun with the run's own config, pass --allow_config_change to go on "
      "with this one (the change is logged in config_changes.jsonl), or use a new --workdir."
    )
  return RunPlan(path, mesh, steps, changes, num_params)


def _newest_saved_config(checkpoints, steps) -> dict[str, Any] | None:
  for step in steps:
    try:
      return checkpoints.restore_config_dict(step)
    except Exception:  # unreadable: the next older checkpoint's config decides
      continue
  return None


def describe_plan(plan: RunPlan, config: ml_collections.ConfigDict) -> str:
  """What `plan_run` found, for `--dry_run`: a few lines, nothing written."""
  tc = config.train
  sizes = dict(zip(plan.mesh.axis_names, plan.mesh.axis_sizes))
  lines = [
    f"model: {plan.num_params:,} parameters; {tc.num_steps} steps of {tc.batch_size} x "
    f"{tc.seq_len} tokens",
    f"mesh: {', '.join(f'{k}={v}' for k, v in sizes.items())} over {jax.device_count()} "
    f"{jax.devices()[0].platform} devices",
  ]
  if not plan.workdir.exists():
    lines.append(f"workdir: {plan.workdir} does not exist yet; a new run would create it")
  elif not plan.steps:
    lines.append(f"workdir: {plan.workdir} holds no checkpoint; the run would start at step 0")
  elif plan.resume_step >= tc.num_steps:
    lines.append(f"workdir: {plan.workdir} is at step {plan.resume_step} of {tc.num_steps}: done")
  else:
    lines.append(f"workdir: {plan.workdir}: the run would resume from step {plan.resume_step}")
  if plan.changes:
    lines.append(f"config changes: {config_text.format_differences(plan.changes, limit=100)}")
  return "\n".join(lines)


def _finished_result(path: epath.Path, step: int) -> dict[str, Any]:
  """The result of a run already at its last step `step`, from its metrics.jsonl."""
  result: dict[str, Any] = {"preempted": False, "step": step, "start_step": step}
  if jax.process_index() != 0:
    return result
  try:
    records = [r for r in read_metrics(path) if r["step"] <= step]
  except FileNotFoundError:
    records = []
  for prefix, probe in (("train/", "train/loss"), ("eval/", "eval/loss")):
    last = next((r for r in reversed(records) if probe in r), {})
    result.update({k: v for k, v in last.items() if k.startswith(prefix)})
  return result


# ----------------------------------------------------------------------------- the loop

PREEMPTION_SYNC_EVERY = 10  # steps between the processes' exchanges of stop requests


def _with_nonfinite_tally(train_step):
  """The train step, also keeping on device how many updates were skipped as non-finite,
  and the first such step and its terms (`nonfinite` mask): the host reads them only
  when it syncs anyway (log, eval and checkpoint steps), not every step."""

  def step(state, tally, batch, step_number):
    state, metrics = train_step(state, batch)
    bad = metrics["nonfinite"] > 0
    first = bad & (tally["skipped"] == 0)
    tally = {
      "skipped": tally["skipped"] + bad.astype(jnp.int32),
      "first_step": jnp.where(first, step_number, tally["first_step"]),
      "first_terms": jnp.where(first, metrics["nonfinite"], tally["first_terms"]),
    }
    return state, tally, metrics

  return step


def _no_nonfinite(sharding) -> dict[str, jax.Array]:
  zero = np.zeros((), np.int32)
  return jax.device_put({"skipped": zero, "first_step": zero, "first_terms": zero}, sharding)


class _Stopwatch:
  """Seconds and steps of training between two readings, excluding the pauses (compile,
  eval, checkpoints): throughput over whole logging intervals."""

  def __init__(self):
    self.seconds, self.steps, self._since = 0.0, 0, None

  def start(self) -> None:
    self._since = time.perf_counter()

  def pause(self) -> None:
    self.seconds += time.perf_counter() - self._since

  def take(self) -> tuple[float, int]:
    seconds, steps = self.seconds, self.steps
    self.seconds, self.steps = 0.0, 0
    return seconds, steps


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  show_progress: bool = True,
  allow_config_change: bool = False,
) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint if there is one.

  Everything `plan_run` checks is checked before the workdir is created or written, and
  the data is found before it is created. A run already at `train.num_steps` returns its
  last metrics without training. SIGTERM or SIGINT ends the run after the current step
  with a checkpoint (all processes agree on the step). A non-finite loss term or gradient
  is never applied; with `train.nonfinite_policy='stop'` the run ends with
  `FloatingPointError` at the next step the host reads the device (a log, eval or
  checkpoint step), before any later record or checkpoint is written.

  Returns the last train and eval metrics, `preempted` (True if a signal ended it),
  `step` (the step reached) and `start_step` (where this call began).
  """
  tc = config.train
  plan = plan_run(config, workdir, allow_config_change=allow_config_change)
  process, num_processes = jax.process_index(), jax.process_count()

  def datasets():
    if num_processes > 1:  # one process builds the built-in corpus; the others wait for it
      if process == 0:
        data_lib.prepare(config.data.name, config.data.data_dir)
      multihost_utils.sync_global_devices("moejax: dataset prepared")
    return data_lib.build_datasets(
      config.data,
      global_batch_size=tc.batch_size,
      seq_len=tc.seq_len,
      seed=tc.seed,
      shard_index=process,
      shard_count=num_processes,
    )

  # A finished run needs no data (unless its last checkpoint turns out unreadable).
  data = None if plan.resume_step >= tc.num_steps else datasets()
  workdir_lib.create(plan.workdir)
  checkpoints = checkpoint_lib.Checkpointer(plan.workdir, keep=tc.keep_checkpoints)
  try:
    graphdef, state, state_shardings = init_state(config, plan.mesh)
    start_step, state, data_state = checkpoints.restore_newest_intact(state)
    if process == 0:
      checkpoints.remove_incomplete()
    if start_step >= tc.num_steps:
      return _finished_result(plan.workdir, start_step)
    if process == 0:
      workdir_lib.write_config(plan.workdir, config, step=start_step, changes=plan.changes)
      if plan.changes:
        log.warning(
          "continuing with a changed config from step %d: %s (logged in %s)",
          start_step,
          config_text.format_differences(plan.changes),
          plan.workdir / workdir_lib.CONFIG_CHANGES_FILE,
        )
    train_iter, eval_batches = data or datasets()
    if start_step:
      train_iter.set_state(data_state)
      log.info("resumed from the checkpoint at step %d", start_step)
    writer = MetricWriter(plan.workdir, enabled=process == 0, resume_step=start_step)
    try:
      return _train_loop(
        config,
        plan.mesh,
        make_steps(graphdef, config.model),
        (state, state_shardings),
        (train_iter, eval_batches),
        checkpoints,
        writer,
        start_step=start_step,
        show_progress=show_progress and process == 0,
      )
    finally:
      writer.close()
  finally:
    checkpoints.close()


def _train_loop(
  config, mesh, steps, state_and_shardings, data, checkpoints, writer, *, start_step, show_progress
) -> dict[str, Any]:
  """Steps `start_step + 1 ..` to `train.num_steps` (see `train_and_evaluate`).

  The steps are issued asynchronously: the host waits for the device only at log, eval
  and checkpoint steps (and, with several processes, every `PREEMPTION_SYNC_EVERY` steps
  to share stop requests). Both steps are compiled before the clock starts, so
  `train/tokens_per_sec` is the rate over each whole logging interval, without compiles,
  evals or checkpoints.
  """
  tc, m = config.train, config.model
  train_step, eval_step = steps
  state, state_shardings = state_and_shardings
  train_iter, eval_batches = data
  _, schedule = make_optimizer(tc)
  moe_layers = moe_layer_indices(m.num_layers, m.num_experts, m.moe_layer_interval)
  batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  tally = _no_nonfinite(replicated)
  batch = parallel.shard_batch(next(train_iter), mesh)
  eval_batches = [parallel.shard_batch(b, mesh) for b in eval_batches]
  step = start_step
  # Traced under the mesh, MoE layers exchange tokens with all-to-alls over its expert axis.
  with jax.set_mesh(mesh):
    train_step = (
      jax.jit(
        _with_nonfinite_tally(train_step),
        in_shardings=(state_shardings, replicated, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated, replicated),
        donate_argnums=(0, 1),
      )
      .lower(state, tally, batch, np.int32(step + 1))
      .compile()
    )
    eval_step = (
      jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)
      .lower(state, eval_batches[0])
      .compile()
    )

  tokens_per_step = tc.batch_size * tc.seq_len
  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] = {}
  reported_skips = 0
  saved_step = start_step
  clock = _Stopwatch()
  progress = tqdm(
    total=tc.num_steps,
    initial=start_step,
    unit="step",
    dynamic_ncols=True,
    disable=not show_progress,
  )
  with progress, PreemptionWatch(jax.process_count()) as preemption:
    clock.start()
    while step < tc.num_steps:
      step += 1
      if batch is None:
        batch = parallel.shard_batch(next(train_iter), mesh)
      state, tally, metrics = train_step(state, tally, batch, np.int32(step))
      batch = None
      clock.steps += 1
      stop = preemption.requested(step)
      log_now = step % tc.log_every == 0 or step == tc.num_steps
      eval_now = step % tc.eval_every == 0 or step == tc.num_steps
      save_now = step % tc.checkpoint_every == 0 or step == tc.num_steps or stop
      if log_now or eval_now or save_now:  # the host waits for the device here only
        host_metrics, host_tally = jax.device_get((metrics, tally))
        clock.pause()
        skipped = _check_nonfinite(host_tally, tc, saved_step)
        if skipped > reported_skips:
          log.warning(
            "step %d: %d updates skipped so far (non-finite %s, first at step %d)",
            step,
            skipped,
            ", ".join(nonfinite_terms(int(host_tally["first_terms"]))),
            int(host_tally["first_step"]),
          )
          reported_skips = skipped
        if log_now:
          record = _train_record(host_metrics, moe_layers)
          seconds, steps_timed = clock.take()
          record["train/tokens_per_sec"] = steps_timed * tokens_per_step / max(seconds, 1e-9)
          record["train/learning_rate"] = float(schedule(step - 1))
          record["train/skipped_steps"] = skipped
          writer.write(step, record)
          last_train = record
          progress.set_postfix(loss=f"{record['train/loss']:.3f}")
        if eval_now:
          last_eval = evaluate(eval_step, state, eval_batches)
          writer.write(step, last_eval)
          progress.write(
            f"step {step}: eval loss {last_eval['eval/loss']:.4f}, "
            f"{last_eval['eval/bits_per_byte']:.4f} bits/byte"
          )
        if save_now:
          checkpoints.save(step, state, train_iter.get_state(), config)
          saved_step = step
        clock.start()
      progress.update(1)
      if stop:
        progress.write(
          f"stopped by a signal at step {step}; checkpoint saved. Rerun the same command to resume."
        )
        break
  return {
    **last_train,
    **last_eval,
    "preempted": step < tc.num_steps,
    "step": step,
    "start_step": start_step,
  }


def _check_nonfinite(tally: dict[str, Any], tc: ml_collections.ConfigDict, saved_step: int) -> int:
  """The number of skipped non-finite updates; with policy 'stop', a FloatingPointError
  naming the first one."""
  skipped = int(tally["skipped"])
  if skipped and tc.nonfinite_policy == "stop":
    terms = ", ".join(nonfinite_terms(int(tally["first_terms"])))
    kept = (
      f"checkpoints up to step {saved_step} are intact"
      if saved_step
      else "no checkpoint had been written yet"
    )
    raise FloatingPointError(
      f"step {int(tally['first_step'])}: non-finite {terms}; the update was not applied "
      f"and the run stopped ({kept}; --config.train.nonfinite_policy=skip skips such "
      "steps instead)."
    )
  return skipped


class PreemptionWatch:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  Under a moejax command (`signals.handle_signals`), the signal thread delivers the request
  and a second signal ends the process at once. Elsewhere (a notebook, a test, another
  program) Python handlers do, in the main thread only, and a second signal raises
  KeyboardInterrupt.

  With several processes, `requested(step)` is true on all of them at the same step:
  every `sync_every` steps they share their flags (an all-gather of one int), so every
  host checkpoints the same step.
  """

  def __init__(self, num_processes: int, sync_every: int = PREEMPTION_SYNC_EVERY):
    self.num_processes = num_processes
    self.sync_every = sync_every
    self._flag = False
    self._previous = {}
    self._requests = None

  def _request(self, signum: int) -> None:
    if not self._flag:
      self._flag = True
      print(
        f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
        "(send it again to stop at once)",
        file=sys.stderr,
        flush=True,
      )

  def _handle(self, signum, frame):
    del frame
    if self._flag:  # a second signal: stop now
      raise KeyboardInterrupt(f"signal {signum} received twice")
    self._request(signum)

  def __enter__(self):
    if signals.signals_handled():
      self._requests = signals.stop_requests(
        self._request, at_once_note="the next run resumes from the newest checkpoint."
      )
      self._requests.__enter__()
    elif threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    if self._requests is not None:
      self._requests.__exit__(*exc)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def requested(self, step: int) -> bool:
    if self.num_processes == 1:
      return self._flag
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self._flag, np.int32))
    return bool(np.any(flags))
