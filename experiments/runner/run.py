r"""Running an ablation: the learning-rate sweep, then every arm at every seed, one run
after another, with skip and resume.

1. **Sweep.** Each arm that sweeps (its own `lr_from` is None, no `--learning_rate` fixes
   it, and its preset's grid has more than one value) trains once per learning rate of
   the grid at `SWEEP_SEED`, in `WORKDIR/lr_sweep/ARM/lr_X/seed_1000`.
2. **Choice.** An arm's learning rate is the grid value with the lowest `lr_metric` of
   its sweep: by default the final train cross-entropy (`final_train_ce_loss`: scored on
   training batches before the step that trains on them, under one epoch: a held-out
   estimate that leaves the validation split to the contrasts); an arm with `lr_from`
   takes that arm's choice.
3. **Seeds.** Every arm trains at its learning rate at every seed, in `WORKDIR/ARM/seed_S`.

Skip and resume: a run with `done.json` is skipped; one without it whose final checkpoint
and final eval record exist (killed after its last step) is marked done and skipped; any
other is (re)started, and `moejax.training.train.train_and_evaluate` resumes it from its newest
checkpoint. A run directory holding another config stops the runner before anything
trains (the learning rate of swept arms is checked once the sweep has chosen it).
SIGINT/SIGTERM end the current run with a checkpoint; the runner then stops unfinished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from experiments.runner import report
from experiments.runner.accounting import checked_arms
from experiments.runner.results import summarize_run
from experiments.runner.spec import METRICS, SWEEP_SEED, Ablation, Arm, arm_config
from experiments.runner.workdir import (
  check_run_dir,
  check_workdir,
  json_roundtrip,
  run_dir_of,
  run_status,
  sweep_dir_of,
  workdir_lock,
  write_json_atomic,
)

# Presets that compile with XLA's optimisations mostly off: the smoke shapes are so small
# that compiling dominates (about 8 s -> 1.7 s per train step on 2 busy cores).
FAST_COMPILE_PRESETS = ("smoke",)
ALL_ARMS = "*"  # the key of a `--learning_rate` value that fixes every arm's


@contextlib.contextmanager
def most_optimizations_off():
  """Compiles with most XLA optimisations off inside (programs far quicker to compile than
  to run: smoke runs, tests of what a program computes); afterwards the in-memory compile
  caches are cleared so nothing compiled that way is reused."""
  import jax

  previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
    jax.clear_caches()


@contextlib.contextmanager
def compile_mode(preset: str):
  """`most_optimizations_off` for FAST_COMPILE_PRESETS, XLA's defaults otherwise."""
  if preset not in FAST_COMPILE_PRESETS:
    yield
    return
  with most_optimizations_off():
    yield


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run: `arm` at `seed` and `learning_rate` in `run_dir` (`sweep`: a run
  of the learning-rate sweep)."""

  arm: Arm
  seed: int
  learning_rate: float
  run_dir: str
  sweep: bool
  config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
  spec: dict = dataclasses.field(compare=False, repr=False)


def _job(ablation, preset, workdir, arm, seed, lr, sweep, base_overrides) -> Job:
  config = arm_config(ablation, preset, arm, seed, base_overrides, lr)
  spec = {
    "ablation": ablation.name,
    "preset": preset,
    "arm": arm.name,
    "seed": seed,
    "learning_rate": lr,
    "sweep": sweep,
    "overrides": dict(arm.overrides),
    "base_overrides": dict(base_overrides or {}),
    "config": json_roundtrip(config.to_dict()),
  }
  run_dir = (
    sweep_dir_of(workdir, arm.name, lr, seed) if sweep else run_dir_of(workdir, arm.name, seed)
  )
  return Job(arm, seed, lr, run_dir, sweep, config, spec)


def learning_rate_plan(
  ablation: Ablation, preset: str, arms: Sequence[Arm], fixed: Mapping[str, float] | None
) -> dict[str, float | str]:
  """Each arm's learning rate, or the name of the arm whose sweep decides it (itself when
  it sweeps). `fixed`: arm -> learning rate (`ALL_ARMS` for every arm), from the CLI."""
  fixed = dict(fixed or {})
  names = {a.name for a in arms}
  unknown = sorted(set(fixed) - names - {ALL_ARMS})
  if unknown:
    raise ValueError(f"--learning_rate names no arm {unknown}; arms: {', '.join(sorted(names))}")
  grid = tuple(ablation.learning_rates[preset])
  plan: dict[str, float | str] = {}
  for arm in arms:
    source = arm.lr_from or arm.name
    for key in (arm.name, source, ALL_ARMS):
      if key in fixed:
        plan[arm.name] = float(fixed[key])
        break
    else:
      plan[arm.name] = grid[0] if len(grid) == 1 else source
  return plan


def choose_learning_rate(
  sweep_rows: Sequence[Mapping[str, Any]], metric: str = "final_train_ce_loss"
) -> float:
  """The learning rate of the sweep run with the lowest `metric` (a key of METRICS)."""
  finite = [r for r in sweep_rows if math.isfinite(r[metric])]
  if not finite:
    raise ValueError(f"no sweep run of this arm finished with a finite {METRICS[metric]}")
  return min(finite, key=lambda r: r[metric])["learning_rate"]


def _sweep_outcomes(jobs: Sequence[Job]) -> list[dict[str, float]]:
  out = []
  for job in jobs:
    t = job.config.train
    outcome = summarize_run(job.run_dir, t.num_steps, t.batch_size * t.seq_len)
    out.append({"learning_rate": job.learning_rate, **outcome})
  return out


def run_ablation(
  ablation: Ablation,
  preset: str,
  workdir: str,
  *,
  seeds: Sequence[int] | None = None,
  arms: Sequence[str] | None = None,
  base_overrides: Mapping[str, Any] | None = None,
  learning_rates: Mapping[str, float] | None = None,
  show_progress: bool = True,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Checks the constraints, runs the sweep, chooses the learning rates, trains every
  arm/seed not yet finished, then writes the results and the summary (report.py).

  `learning_rates`: arm -> learning rate fixed instead of swept (`ALL_ARMS`: every arm).
  Returns {'rows': the result rows, 'trained': [(arm, seed)...], 'skipped': [...],
  'learning_rates': {arm: lr}, 'interrupted': bool}; sweep runs count as
  (f"{arm}@lr={lr}", seed).
  """
  if preset == "pod":
    raise ValueError(
      "the pod preset does not train here; it prints the commands "
      "(python -m experiments.ablations.NAME --preset=pod --workdir=...)"
    )
  for key in ("train.learning_rate", "train.seed"):
    if key in (base_overrides or {}):
      raise ValueError(f"--set {key}: use --learning_rate / --seeds instead")
  all_arms, _, _, constraint_lines = checked_arms(ablation, preset, base_overrides)
  for line in constraint_lines:
    log(f"constraint ok: {line}")
  seeds = tuple(ablation.seeds[preset] if seeds is None else seeds)
  unknown = sorted(set(arms or ()) - {a.name for a in all_arms})
  if unknown:
    raise ValueError(
      f"{ablation.name}/{preset} has no arm(s) {unknown}; arms: "
      f"{', '.join(a.name for a in all_arms)}"
    )
  chosen = all_arms if arms is None else [a for a in all_arms if a.name in arms]
  plan = learning_rate_plan(ablation, preset, all_arms, learning_rates)
  sources = {plan[a.name] for a in chosen if isinstance(plan[a.name], str)}
  sweeping = [a for a in all_arms if a.name in sources]
  grid = ablation.learning_rates[preset]
  check_workdir(workdir, ablation.name, preset, create=True)

  from moejax.training import train  # deferred: the accounting above needs no jax backend

  trained, skipped = [], []
  job = lambda arm, seed, lr, sweep: _job(
    ablation, preset, workdir, arm, seed, lr, sweep, base_overrides
  )
  with workdir_lock(workdir), contextlib.ExitStack() as compiling:
    sweep_jobs = [job(arm, SWEEP_SEED, lr, True) for arm in sweeping for lr in grid]
    for j in sweep_jobs:  # refuse mismatching run directories before training anything
      check_run_dir(j.run_dir, j.spec)
    for arm in chosen:
      for seed in seeds:
        j = job(arm, seed, grid[0], False)
        check_run_dir(j.run_dir, j.spec, ignore=("train.learning_rate",))

    entered = []

    def train_job(j: Job, tag: str) -> bool:
      """Trains `j` unless finished; False if a signal interrupted it."""
      label = (f"{j.arm.name}@lr={j.learning_rate:g}" if j.sweep else j.arm.name, j.seed)
      status = run_status(j.run_dir, j.config)
      if status == "done":
        log(f"{tag}: finished earlier, skipped")
        skipped.append(label)
        return True
      if status == "finished_unmarked":
        log(f"{tag}: final checkpoint and eval found without done.json; marked done, skipped")
        write_json_atomic(
          os.path.join(j.run_dir, "done.json"),
          {"recovered": True, "num_steps": j.config.train.num_steps},
        )
        skipped.append(label)
        return True
      if not entered:  # once, and only when something is trained
        compiling.enter_context(compile_mode(preset))
        entered.append(True)
      os.makedirs(j.run_dir, exist_ok=True)
      if not os.path.exists(os.path.join(j.run_dir, "arm.json")):
        write_json_atomic(os.path.join(j.run_dir, "arm.json"), j.spec)
      log(
        f"{tag}: {'resuming' if status == 'partial' else 'training'} "
        f"{j.config.train.num_steps} steps in {j.run_dir}"
      )
      start = time.perf_counter()
      final = train.train_and_evaluate(j.config, j.run_dir, show_progress=show_progress)
      wall = time.perf_counter() - start
      if final.get("preempted"):
        log(f"{tag}: interrupted; rerun the same command to resume")
        return False
      write_json_atomic(
        os.path.join(j.run_dir, "done.json"),
        {
          "num_steps": j.config.train.num_steps,
          "wall_s": wall,
          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "final": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        },
      )
      trained.append(label)
      log(
        f"{tag}: done in {wall:.0f}s: eval {final.get('eval/bits_per_byte', float('nan')):.4f} "
        f"bits/byte, train CE {final.get('train/ce_loss', float('nan')):.4f}"
      )
      return True

    def finish(interrupted: bool, rates: Mapping[str, float]) -> dict[str, Any]:
      rows = report.collect_results(
        ablation, preset, workdir, base_overrides=base_overrides, log=log,
        constraint_lines=constraint_lines,
      )  # fmt: skip
      return {
        "rows": rows,
        "trained": trained,
        "skipped": skipped,
        "learning_rates": dict(rates),
        "interrupted": interrupted,
      }

    prefix = f"{ablation.name}/{preset}"
    for i, j in enumerate(sweep_jobs, 1):
      tag = f"[{prefix} sweep {i}/{len(sweep_jobs)}] {j.arm.name} lr {j.learning_rate:g}"
      if not train_job(j, tag):
        return finish(True, {})
    rates = {}
    for arm in sweeping:
      rates[arm.name] = choose_learning_rate(
        _sweep_outcomes([j for j in sweep_jobs if j.arm.name == arm.name]), ablation.lr_metric
      )
      lowest = METRICS[ablation.lr_metric]
      log(f"{prefix} {arm.name}: learning rate {rates[arm.name]:g} (lowest final {lowest})")
    rates = {
      a.name: plan[a.name] if not isinstance(plan[a.name], str) else rates[plan[a.name]]
      for a in chosen
    }
    seed_jobs = [job(arm, seed, rates[arm.name], False) for arm in chosen for seed in seeds]
    for j in seed_jobs:
      check_run_dir(j.run_dir, j.spec)
    for i, j in enumerate(seed_jobs, 1):
      tag = f"[{prefix} {i}/{len(seed_jobs)}] {j.arm.name} seed {j.seed}"
      if not train_job(j, tag):
        return finish(True, rates)
    return finish(False, rates)
