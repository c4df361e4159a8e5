"""The training loop: steps issued asynchronously, evaluations, checkpoints, metrics, and
stopping on a signal or a non-finite update; `train_and_evaluate` runs a config in a
workdir, resuming from its newest intact checkpoint, or starting a fresh run from the model
of `train.init_from` (fine-tuning; `moejax.training.init_from`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from moejax import data as data_lib
from moejax.config import text as config_text
from moejax.models.transformer import moe_layer_indices
from moejax.parallel import sharding
from moejax.runtime import signals
from moejax.training import checkpoint as checkpoint_lib
from moejax.training import data_position, workdir_lock
from moejax.training import workdir as workdir_lib
from moejax.training.init_from import restore_init_from
from moejax.training.metrics import MetricWriter, read_metrics
from moejax.training.run_plan import plan_run, trainable_summary
from moejax.training.steps import evaluate, init_state, make_optimizer, make_steps, nonfinite_terms

log = logging.getLogger(__name__)


def _train_record(metrics: dict[str, Any], moe_layers: tuple[int, ...]) -> dict[str, Any]:
  record: dict[str, Any] = {
    f"train/{k}": float(v) for k, v in metrics.items() if k != "expert_load"
  }
  for layer, load in zip(moe_layers, np.asarray(metrics["expert_load"]), strict=True):
    record[f"train/expert_load/layer_{layer}"] = [round(float(x), 5) for x in load]
  return record


def dropless_drop_warning(step: int, record: dict[str, Any], model) -> str | None:
  """The line a log step prints when `dispatch='dropless'` dropped assignments (only the
  opt-in `dropless_overflow='drop'` can), else None."""
  dropped = record.get("train/dropped_fraction", 0.0)
  if model.dispatch != "dropless" or not dropped > 0:
    return None
  return (
    f"step {step}: dropless dropped {dropped:.2%} of this step's expert assignments "
    f"(model.dropless_overflow={model.dropless_overflow!r} caps each exchange at "
    f"dropless_buffer_factor={model.dropless_buffer_factor:g} times a device's rows; "
    "'rounds' drops none)"
  )


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
    last: dict[str, Any] = next((r for r in reversed(records) if probe in r), {})
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


def jit_train_step(train_step, mesh, state_shardings):
  """The jitted step the train loop runs: `(state, tally, batch, step_number) -> (state,
  tally, metrics)` with the state in `state_shardings`, the batch sharded over the batch
  axes of `mesh`, the rest replicated, the state and tally donated. `moejax.aot` compiles
  this same function for a TPU slice."""
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(
    _with_nonfinite_tally(train_step),
    in_shardings=(state_shardings, replicated, batch_sharding, replicated),
    out_shardings=(state_shardings, replicated, replicated),
    donate_argnums=(0, 1),
  )


def no_nonfinite_tally() -> dict[str, np.ndarray]:
  """The tally `jit_train_step` starts from: no update skipped yet."""
  zero = np.zeros((), np.int32)
  return {"skipped": zero, "first_step": zero, "first_terms": zero}


def _no_nonfinite(sharding) -> dict[str, jax.Array]:
  return jax.device_put(no_nonfinite_tally(), sharding)


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

  A fresh run (no checkpoint in `workdir`) with `train.init_from` takes its model from the
  newest readable checkpoint there, with a new optimizer, at step 0; a resume never reads
  it. Only the parameters `train.trainable` and `train.frozen` select train. With
  `show_progress`, one line at the start says where the run starts and what trains (with
  the optimizer state's bytes), one line per eval gives its loss, and on a terminal a
  progress bar counts the steps (`--quiet` turns all three off).

  Everything `plan_run` checks is checked before the workdir is created or written, and
  the data is found before it is created. The run holds the workdir's lock from before
  its first write (`moejax.training.workdir_lock`): a second run on it is refused. A run already at `train.num_steps` returns its
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
    if num_processes > 1:
      # One process builds an embedded corpus; the others wait for it. The barrier also
      # lines the processes up before Orbax's checkpoint manager is made (its first save
      # writes root metadata that every process must agree is new).
      if process == 0 and not data_lib.uses_token_stores(config.data):
        data_lib.prepare_corpus(config.data.name, config.data.data_dir)
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
  lock = _lock_workdir(plan.workdir, process, num_processes)
  try:
    return _train(config, plan, data or datasets, process, show_progress)
  finally:
    if lock is not None:
      workdir_lock.release(plan.workdir, lock)


def _lock_workdir(workdir, process: int, num_processes: int) -> dict | None:
  """Process 0 takes the workdir's lock (`moejax.training.workdir_lock`); every process learns
  whether it did, and all raise `WorkdirBusy` together when it did not."""
  owner, error = None, None
  if process == 0:
    try:
      owner = workdir_lock.acquire(workdir)
    except workdir_lock.WorkdirBusy as busy:
      error = busy
  if num_processes > 1:
    locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = workdir_lock.WorkdirBusy(
        f"--workdir={workdir} is in use by another run (process 0 could not lock it)."
      )
  if error is not None:
    raise error
  return owner


def _train(config, plan, data, process: int, show_progress: bool) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir is created and locked; `data` the datasets, or
  the function that builds them (a finished run builds them only if it must train)."""
  tc = config.train
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
      # The run keeps its tokenizer: generate reads text with it, anywhere.
      workdir_lib.keep_copies(plan.workdir, data_lib.run_tokenizer_files(config.data))
      if plan.changes:
        log.warning(
          "continuing with a changed config from step %d: %s (logged in %s)",
          start_step,
          config_text.format_differences(plan.changes),
          plan.workdir / workdir_lib.CONFIG_CHANGES_FILE,
        )
    init_step = None
    if start_step == 0 and tc.init_from:
      model_state, init_step = restore_init_from(tc.init_from, state[0], plan.mesh)
      state = nnx.merge_state(state, {0: model_state})
    train_iter, eval_batches = data() if callable(data) else data
    if start_step:
      train_iter.set_state(data_position.own(data_state))
      log.info("resumed from the checkpoint at step %d", start_step)
    if process == 0 and show_progress:
      tqdm.write(_startup_line(plan, config, start_step, init_step))
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


def _startup_line(plan, config, start_step: int, init_step: int | None) -> str:
  """`step 0 of N[, the model from DIR at step S]: training T of P parameters
  (train.trainable=...); optimizer state B bytes (M MiB)`, or `resuming at step S of N: ...`."""
  tc = config.train
  if start_step:
    start = f"resuming at step {start_step} of {tc.num_steps}"
  elif init_step is not None:
    start = f"step 0 of {tc.num_steps}, the model from {tc.init_from} at step {init_step}"
  else:
    start = f"step 0 of {tc.num_steps}"
  return f"{start}: training {trainable_summary(plan, config)}"


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
  per_process_data = data_lib.per_process_position(config.data) and jax.process_count() > 1
  train_iter, eval_batches = data
  _, schedule = make_optimizer(tc)
  moe_layers = moe_layer_indices(m)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  tally = _no_nonfinite(replicated)
  batch = sharding.shard_batch(next(train_iter), mesh)
  eval_batches = [sharding.shard_batch(b, mesh) for b in eval_batches]
  step = start_step
  train_step = (
    jit_train_step(train_step, mesh, state_shardings)
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
    disable=not (show_progress and sys.stderr.isatty()),  # a bar only on a terminal
  )
  with progress, PreemptionWatch(jax.process_count()) as preemption:
    clock.start()
    while step < tc.num_steps:
      step += 1
      if batch is None:
        batch = sharding.shard_batch(next(train_iter), mesh)
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
          if warning := dropless_drop_warning(step, record, m):
            log.warning(warning)
          progress.set_postfix(loss=f"{record['train/loss']:.3f}")
        if eval_now:
          last_eval = evaluate(eval_step, state, eval_batches)
          writer.write(step, last_eval)
          if show_progress:
            progress.write(
              f"step {step}: eval loss {last_eval['eval/loss']:.4f}, "
              f"{last_eval['eval/bits_per_byte']:.4f} bits/byte"
            )
        if save_now:
          if per_process_data:  # the gather is a collective: Orbax's last save finished first
            checkpoints.wait_until_finished()
          position = data_position.gather(train_iter.get_state(), per_process=per_process_data)
          checkpoints.save(step, state, position, config)
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
    self._previous: dict[int, Any] = {}
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
