r"""The wall-time estimate of an ablation, from times measured on this machine.

For each arm it builds the model, compiles the train and eval steps, times `steps` train
steps (after one warm-up; the median, robust to other jobs' bursts) and a few eval
batches on synthetic tokens, and times one checkpoint save; the data pipeline's start is
timed once. A run is then projected as

    data start + model build + compile + num_steps · step + evals · eval_batches · eval batch
      + checkpoints · checkpoint save,

with no fudge factor, and the ablation as the sum over its runs: per arm its seeds plus,
if it sweeps, one run per learning rate of the grid. `--estimate --workdir=DIR` keeps the
estimate in DIR/estimate.json, and summary.md then reports measured against estimated
wall time and step times (report.py).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.runner.accounting import checked_arms
from experiments.runner.run import compile_mode, learning_rate_plan
from experiments.runner.spec import Ablation, arm_config
from experiments.runner.workdir import check_workdir, write_keeping_previous


def _count(num_steps: int, every: int) -> int:
  """How often an `every`-step event happens in `num_steps` steps (and at the last)."""
  return num_steps // every + (num_steps % every > 0)


def _time_data(config) -> float:
  from moejax import data as data_lib

  t = config.train
  start = time.perf_counter()
  data_lib.build_datasets(config.data, global_batch_size=t.batch_size, seq_len=t.seq_len, seed=0)
  return time.perf_counter() - start


def _time_arm(config, steps: int) -> dict[str, float]:
  """Seconds to build, compile, step, evaluate one batch and save one checkpoint."""
  import jax
  import numpy as np
  from flax import nnx

  from moejax import data as data_lib
  from moejax.training import checkpoint as checkpoint_lib
  from moejax.training import steps as steps_lib

  t = config.train
  start = time.perf_counter()
  model, optimizer, _ = steps_lib.build(config)
  graphdef, state = nnx.split((model, optimizer))
  build_s = time.perf_counter() - start
  train_step, eval_step = steps_lib.make_steps(graphdef, config.model)
  tokens = np.random.default_rng(0).integers(0, 256, (t.batch_size, t.seq_len + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  if data_lib.uses_token_stores(config.data):  # the arrays a token store's batch carries
    shape = (t.batch_size, t.seq_len)
    layout = {
      "loss_mask": np.ones(shape, np.int32),
      "segment_ids": np.ones(shape, np.int32),
      "positions": np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), shape).copy(),
    }
    batch |= {k: v for k, v in layout.items() if k in data_lib.batch_keys(config.data)}
  eval_batch = batch | {"target_bytes": np.ones((t.batch_size, t.seq_len), np.int32)}
  start = time.perf_counter()
  train_c = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
  eval_c = jax.jit(eval_step).lower(state, eval_batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = train_c(state, batch)
  jax.block_until_ready(metrics)
  step_times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_c(state, batch)
    jax.block_until_ready(metrics)
    step_times.append(time.perf_counter() - start)
  eval_times = []
  for _ in range(4):
    start = time.perf_counter()
    jax.block_until_ready(eval_c(state, eval_batch))
    eval_times.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as directory:
    checkpoints = checkpoint_lib.Checkpointer(directory, keep=1)
    start = time.perf_counter()
    checkpoints.save(1, state, {}, config)
    checkpoints.close()
    checkpoint_s = time.perf_counter() - start
  return {
    "build_s": build_s,
    "compile_s": compile_s,
    "step_s": statistics.median(step_times),
    "eval_batch_s": statistics.median(eval_times[1:]),
    "checkpoint_s": checkpoint_s,
  }


def estimate(
  ablation: Ablation,
  preset: str,
  *,
  seeds: Sequence[int] | None = None,
  arms: Sequence[str] | None = None,
  steps: int = 10,
  base_overrides: Mapping[str, Any] | None = None,
  learning_rates: Mapping[str, float] | None = None,
  workdir: str | None = None,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Projects the wall time of the ablation at `preset` (module docstring). Returns
  {'per_arm': {arm: {..., 'run_s', 'runs'}}, 'total_s', 'seeds', 'data_s', 'measured_at'};
  with `workdir`, also writes it to WORKDIR/estimate.json."""
  if steps < 1:
    raise ValueError(f"--estimate_steps={steps} must be at least 1")
  all_arms, _, _, _ = checked_arms(ablation, preset, base_overrides)
  seeds = tuple(ablation.seeds[preset] if seeds is None else seeds)
  unknown = sorted(set(arms or ()) - {a.name for a in all_arms})
  if unknown:
    raise ValueError(f"{ablation.name}/{preset} has no arm(s) {unknown}")
  chosen = [a for a in all_arms if arms is None or a.name in arms]
  plan = learning_rate_plan(ablation, preset, all_arms, learning_rates)
  sweeps = {plan[a.name] for a in chosen if isinstance(plan[a.name], str)}
  grid = ablation.learning_rates[preset]
  if workdir:
    check_workdir(workdir, ablation.name, preset, create=True)
  total, per_arm = 0.0, {}
  with compile_mode(preset):
    data_s = _time_data(arm_config(ablation, preset, chosen[0], 0, base_overrides))
    for arm in chosen:
      config = arm_config(ablation, preset, arm, 0, base_overrides)
      t, times = config.train, _time_arm(config, steps)
      evals = _count(t.num_steps, t.eval_every)
      run_s = (
        data_s
        + times["build_s"]
        + times["compile_s"]
        + t.num_steps * times["step_s"]
        + evals * config.data.eval_batches * times["eval_batch_s"]
        + _count(t.num_steps, t.checkpoint_every) * times["checkpoint_s"]
      )
      runs = len(seeds) + (len(grid) if arm.name in sweeps else 0)
      per_arm[arm.name] = {**times, "run_s": run_s, "runs": runs}
      total += run_s * runs
      log(
        f"{ablation.name}/{preset} {arm.name}: {times['step_s'] * 1e3:.0f} ms/step "
        f"({t.batch_size * t.seq_len / times['step_s']:.0f} tokens/s), compile "
        f"{times['compile_s']:.1f}s, eval {evals} x {config.data.eval_batches} batches of "
        f"{times['eval_batch_s'] * 1e3:.0f} ms, checkpoint {times['checkpoint_s']:.1f}s -> "
        f"{run_s / 60:.1f} min per run ({t.num_steps} steps) x {runs} runs"
      )
  log(
    f"{ablation.name}/{preset}: projected {total / 60:.1f} min for {len(chosen)} arms, "
    f"seeds {seeds}, learning rates {grid} (measured under the machine's current load)"
  )
  out = {
    "per_arm": per_arm,
    "total_s": total,
    "seeds": list(seeds),
    "data_s": data_s,
    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
  }
  if workdir:
    data = (json.dumps(out, indent=1, sort_keys=True) + "\n").encode()
    write_keeping_previous(os.path.join(workdir, "estimate.json"), data, log=log)
  return out
