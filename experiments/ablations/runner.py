r"""The shared machinery of the ablations: arms, the parameter/FLOP constraint check, the
sequential runner with skip/resume, results (CSV, Markdown summary, loss-curve plots),
the `pod` command printer and the wall-time estimate.

An ablation (`Ablation`) is a base config per preset plus a list of named arms; an arm
(`Arm`) is a dict of dotted config overrides (`{"model.num_experts": 16, ...}`) applied
to the base. Every arm/seed trains in `WORKDIR/ARM/seed_S` with
`moejax.train.train_and_evaluate`.

What a workdir holds (nothing in it is ever deleted or silently overwritten):

    WORKDIR/ablation.json            which ablation and preset the workdir belongs to
    WORKDIR/ARM/seed_S/arm.json      the arm, its overrides and the full config it trains
    WORKDIR/ARM/seed_S/done.json     written when the run finished: the finished marker
    WORKDIR/ARM/seed_S/...           metrics.jsonl, checkpoints/, tensorboard/ (moejax.train)
    WORKDIR/results.csv, summary.md, eval_bits_per_byte.png, train_loss.png
    WORKDIR/.runner.lock             an advisory lock: one runner per workdir at a time

Skip and resume: an arm/seed with `done.json` is skipped; one without it whose final
checkpoint and final eval record exist (a run killed after its last step) is marked done
and skipped; any other is (re)started, and `train_and_evaluate` resumes it from its
newest checkpoint. A run directory whose `arm.json` holds a different config than the
arm would train now (another preset, edited arms, `--set`; keys added to
moejax/config.py since are not differences) stops the runner with an error naming the
first differing keys, as does a run directory it did not create.
The derived files (results, summary, plots) are rewritten only when their content
changes, and then the previous version is kept beside as `NAME.~N~`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections

from moejax import flops
from moejax.config import apply_overrides, flatten, load_config
from moejax.model import expert_d_ff_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = ("smoke", "cpu", "pod")
# Presets that compile with XLA's optimisations mostly off: the smoke shapes are so small
# that compiling dominates (about 8 s -> 1.7 s per train step on 2 busy cores).
FAST_COMPILE_PRESETS = ("smoke",)
DEFAULT_TOLERANCE = 0.02


class ConstraintError(ValueError):
  """An arm list breaks its ablation's parameter/FLOP constraint (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: a directory-safe `name`, dotted config `overrides`, a one-line `note`;
  `max_seeds` (None: all) runs only the first that many of the seeds (for a costly
  optional arm)."""

  name: str
  overrides: Mapping[str, Any]
  note: str = ""
  max_seeds: int | None = None

  def seeds_of(self, seeds: Sequence[int]) -> tuple[int, ...]:
    return tuple(seeds)[: self.max_seeds] if self.max_seeds is not None else tuple(seeds)


# What a constraint can compare, and how each is computed (all from moejax.flops):
QUANTITIES = {
  "ffn_active": "active expert/FFN parameters (routed experts used per token, shared "
  "experts, dense FFNs; router excluded)",
  "ffn_total": "total expert/FFN parameters (all routed experts, shared experts, dense "
  "FFNs; router excluded)",
  "params_active": "active parameters of the whole model",
  "params_total": "total parameters of the whole model",
  "flops_per_token": "forward FLOPs per token of the whole model (active)",
  "train_flops": "training FLOPs of the whole run (3 x forward FLOPs/token x tokens)",
  "tokens": "training tokens (steps x batch x seq_len)",
}


@dataclasses.dataclass(frozen=True)
class Constraint:
  """`quantity` (a key of QUANTITIES) must agree within `tolerance` (relative) across
  `arms` (None: every arm), against the first of them (the reference arm)."""

  quantity: str
  tolerance: float = DEFAULT_TOLERANCE
  arms: tuple[str, ...] | None = None

  def describe(self) -> str:
    who = "all arms" if self.arms is None else "arms " + ", ".join(f"`{a}`" for a in self.arms)
    tol = "exactly" if self.tolerance == 0 else f"within ±{self.tolerance:.0%}"
    return f"{QUANTITIES[self.quantity]} equal {tol} across {who}"


@dataclasses.dataclass(frozen=True)
class Ablation:
  """An ablation: `base(preset)` -> config, `arms(preset)` -> arms, the constraints the
  arms must meet, default seeds per preset and the config file the pod commands use."""

  name: str
  title: str
  base: Callable[[str], ml_collections.ConfigDict]
  arms: Callable[[str], list[Arm]]
  constraints: tuple[Constraint, ...]
  seeds: Mapping[str, tuple[int, ...]]
  pod_config: str


# ----------------------------------------------------------------------------- configs


def arm_config(
  ablation: Ablation,
  preset: str,
  arm: Arm,
  seed: int = 0,
  base_overrides: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
  """The full config of `arm` at `preset` and `seed`: base, then `base_overrides` (the
  CLI's `--set`), then the arm's overrides, then `train.seed`."""
  config = ablation.base(preset)
  apply_overrides(config, base_overrides or {}, "--set ")
  apply_overrides(config, arm.overrides, f"arm {arm.name!r}: ")
  config.train.seed = seed
  return config


def get_arms(ablation: Ablation, preset: str) -> list[Arm]:
  if preset not in PRESETS:
    raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
  arms = ablation.arms(preset)
  names = [a.name for a in arms]
  for name in names:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
      raise ValueError(f"{ablation.name}: arm name {name!r} is not a safe directory name")
  if len(set(names)) != len(names):
    raise ValueError(f"{ablation.name}: arm names repeat: {names}")
  return arms


# ----------------------------------------------------------------------------- accounting


def ffn_params(model_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Total and active expert/FFN parameters: routed experts, shared experts and dense
  FFNs (of non-MoE layers and of a dense-MoE hybrid's dense branch); not the router.

  Computed with `moejax.flops.count_params` alone: its counts are affine in `d_ff` and
  in `expert_d_ff` (every FFN weight is d_model x width), so the count at zero FFN width,
  extrapolated from widths 1 and 2, is everything but the FFN weights (attention, norms,
  embeddings, router), and the FFN part is the difference.
  """
  num_experts = model_config.num_experts

  def count(d_ff: int, e_ff: int) -> dict[str, float]:
    c = copy.deepcopy(model_config)
    c.d_ff = d_ff
    if num_experts:
      c.expert_d_ff = e_ff
    return flops.count_params(c)

  full = flops.count_params(model_config)
  c11, c21, c12 = count(1, 1), count(2, 1), count(1, 2)
  out = {}
  for key in ("total", "active"):
    zero = 3 * c11[key] - c21[key] - c12[key]
    value = full[key] - zero
    out[key] = int(round(value)) if float(value).is_integer() else value
  return out


def accounting(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The parameter and FLOP numbers of one arm config (moejax.flops conventions)."""
  m, t = config.model, config.train
  params = flops.count_params(m)
  ffn = ffn_params(m)
  fwd = flops.flops_per_token(m, t.seq_len)["active"]
  tokens = t.num_steps * t.batch_size * t.seq_len
  return {
    "params_active": params["active"],
    "params_total": params["total"],
    "ffn_active": ffn["active"],
    "ffn_total": ffn["total"],
    "flops_per_token": fwd,
    "train_flops": 3 * fwd * tokens,
    "tokens": tokens,
  }


def _fmt_number(x: float) -> str:
  if isinstance(x, float) and not x.is_integer():
    return f"{x:,.1f}"
  if abs(x) >= 1e12:
    return f"{x:.4g}"
  return f"{int(x):,}"


def check_constraints(
  ablation: Ablation,
  preset: str,
  rows: Mapping[str, Mapping[str, Any]],
  constraints: Sequence[Constraint] | None = None,
) -> list[str]:
  """Raises ConstraintError (one line, naming the arm and the numbers) if an arm breaks a
  constraint; returns one line per constraint with its largest deviation otherwise.

  `rows`: arm name -> `accounting(...)` of that arm, in arm order.
  """
  lines = []
  for c in ablation.constraints if constraints is None else constraints:
    if c.quantity not in QUANTITIES:
      raise ValueError(f"{ablation.name}: unknown constraint quantity {c.quantity!r}")
    names = list(rows) if c.arms is None else list(c.arms)
    missing = [n for n in names if n not in rows]
    if missing:
      raise ValueError(
        f"{ablation.name}/{preset}: constraint on {c.quantity} names arms "
        f"{missing} that the {preset} preset does not have"
      )
    ref_name = names[0]
    ref = rows[ref_name][c.quantity]
    worst = 0.0
    for name in names[1:]:
      value = rows[name][c.quantity]
      rel = (value - ref) / ref
      if abs(rel) > c.tolerance + 1e-12:
        raise ConstraintError(
          f"{ablation.name}/{preset}: arm {name!r} breaks the constraint on {c.quantity}: "
          f"{_fmt_number(value)} vs {_fmt_number(ref)} for reference arm {ref_name!r} "
          f"({rel:+.2%}; tolerance ±{c.tolerance:.0%}) [{QUANTITIES[c.quantity]}]"
        )
      worst = max(worst, abs(rel))
    lines.append(
      f"{c.quantity}: {c.describe()}; largest deviation {worst:.3%} "
      f"(reference `{ref_name}` = {_fmt_number(ref)})"
    )
  return lines


def checked_arms(ablation: Ablation, preset: str, base_overrides: Mapping[str, Any] | None = None):
  """Arms, their configs (seed 0) and accounting; raises ConstraintError if broken."""
  arms = get_arms(ablation, preset)
  configs = {a.name: arm_config(ablation, preset, a, 0, base_overrides) for a in arms}
  rows = {name: accounting(c) for name, c in configs.items()}
  lines = check_constraints(ablation, preset, rows)
  return arms, configs, rows, lines


# ----------------------------------------------------------------------------- files


def _json_roundtrip(obj):
  return json.loads(json.dumps(obj))


def _write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_keeping_previous(path: str, data: bytes, log: Callable[[str], None] = print) -> str:
  """Writes `data` to `path` unless it already holds exactly that (then the file, and its
  mtime, stay untouched). A different existing file is kept as `path.~N~` first.

  Returns 'unchanged', 'new' or 'replaced'.
  """
  if os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return "unchanged"
    n = 1
    while os.path.exists(f"{path}.~{n}~"):
      n += 1
    os.replace(path, f"{path}.~{n}~")
    log(f"kept the previous {os.path.basename(path)} as {os.path.basename(path)}.~{n}~")
    status = "replaced"
  else:
    status = "new"
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return status


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Keys whose values differ or that `new` lacks. Keys only `new` has are not
  differences: they were added to moejax/config.py since (with defaults that keep the
  old behaviour), and must not orphan earlier runs."""
  diffs = []
  for key in sorted(old):
    a, b = old[key], new.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _config_diff(a, b, f"{prefix}{key}.")
    elif a != b:
      diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
  return diffs


def _checkpoint_steps(run_dir: str) -> list[int]:
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _read_records(run_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  from moejax.metrics import read_metrics

  return read_metrics(run_dir)


def run_dir_of(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, arm, f"seed_{seed}")


def arm_status(run_dir: str, config: ml_collections.ConfigDict) -> str:
  """'done', 'partial' (some of it exists: resume) or 'new'."""
  if os.path.exists(os.path.join(run_dir, "done.json")):
    return "done"
  if not os.path.isdir(run_dir) or not os.listdir(run_dir):
    return "new"
  steps = config.train.num_steps
  if steps in _checkpoint_steps(run_dir) and any(
    r["step"] == steps and "eval/loss" in r for r in _read_records(run_dir)
  ):
    return "finished_unmarked"
  return "partial"


def _check_run_dir(run_dir: str, spec: dict[str, Any]) -> None:
  """Refuses a run directory that holds a run of another config or not ours."""
  path = os.path.join(run_dir, "arm.json")
  if os.path.exists(path):
    old = _read_json(path)
    diffs = _config_diff(old.get("config", {}), spec["config"])
    if diffs:
      shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
      raise ValueError(
        f"{run_dir} holds a run of a different config ({shown}); "
        "rerun with the original settings or pass another --workdir"
      )
  elif os.path.isdir(run_dir) and os.listdir(run_dir):
    raise ValueError(
      f"{run_dir} holds files but no arm.json (not a run of this runner); "
      "move it away or pass another --workdir"
    )


def _check_workdir(workdir: str, ablation: Ablation, preset: str, create: bool) -> None:
  path = os.path.join(workdir, "ablation.json")
  want = {"ablation": ablation.name, "preset": preset}
  if os.path.exists(path):
    have = _read_json(path)
    if {k: have.get(k) for k in want} != want:
      raise ValueError(
        f"{workdir} holds the {have.get('preset')!r} preset of ablation "
        f"{have.get('ablation')!r}, not {preset!r} of {ablation.name!r}; "
        "pass another --workdir"
      )
  elif create:
    os.makedirs(workdir, exist_ok=True)
    _write_json_atomic(path, want)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """An advisory lock so that two runners never train in the same workdir at once."""
  import fcntl

  path = os.path.join(workdir, ".runner.lock")
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise RuntimeError(f"another runner is using {workdir} (lock {path} is held)") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def compile_mode(preset: str):
  """Compiles with most XLA optimisations off for FAST_COMPILE_PRESETS; afterwards the
  in-memory compile caches are cleared so nothing compiled that way is reused."""
  if preset not in FAST_COMPILE_PRESETS:
    yield
    return
  import jax

  previous = bool(jax.config.values.get("jax_disable_most_optimizations", False))
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
    jax.clear_caches()


# ----------------------------------------------------------------------------- running


def _final_window(records: list[dict[str, Any]], num_steps: int) -> list[dict[str, Any]]:
  """Train records of the last 10% of steps (at least the last record)."""
  window = [r for r in records if r["step"] > 0.9 * num_steps]
  return window or records[-1:]


def summarize_run(run_dir: str, num_steps: int, num_experts: int) -> dict[str, Any]:
  """Final metrics of one finished run, from its metrics.jsonl."""
  records = _read_records(run_dir)
  train_records = [r for r in records if "train/loss" in r]
  eval_records = [r for r in records if "eval/loss" in r]
  if not train_records or not eval_records:
    raise ValueError(f"{run_dir}/metrics.jsonl has no train or no eval records")
  window = _final_window(train_records, num_steps)
  mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
  speeds = [r["train/tokens_per_sec"] for r in train_records[1:]] or [
    r["train/tokens_per_sec"] for r in train_records
  ]  # the first includes compiling
  imbalance = []
  for r in window:
    loads = [v for k, v in r.items() if k.startswith("train/expert_load/layer_")]
    if loads:
      imbalance.append(mean([max(load) * len(load) for load in loads]))
  last_eval = eval_records[-1]
  return {
    "final_step": train_records[-1]["step"],
    "final_train_loss": mean([r["train/loss"] for r in window]),
    "final_train_ce_loss": mean([r["train/ce_loss"] for r in window]),
    "final_eval_loss": last_eval["eval/loss"],
    "final_eval_bits_per_byte": last_eval["eval/bits_per_byte"],
    "tokens_per_sec": statistics.median(speeds),
    "train_dropped_fraction": mean([r.get("train/dropped_fraction", 0.0) for r in window]),
    "eval_dropped_fraction": last_eval.get("eval/dropped_fraction", 0.0),
    "expert_load_imbalance": mean(imbalance) if num_experts else float("nan"),
  }


def run_ablation(
  ablation: Ablation,
  preset: str,
  workdir: str,
  *,
  seeds: Sequence[int] | None = None,
  arms: Sequence[str] | None = None,
  base_overrides: Mapping[str, Any] | None = None,
  show_progress: bool = True,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Checks the constraints, trains every arm/seed not yet finished (one after another),
  then writes results.csv, summary.md and the plots of all finished arms/seeds.

  Returns {'rows': the result rows, 'trained': [(arm, seed)...], 'skipped': [...],
  'interrupted': bool}.
  """
  if preset == "pod":
    raise ValueError(
      "the pod preset does not train here; it prints the commands "
      "(python -m experiments.ablations.NAME --preset=pod --workdir=...)"
    )
  all_arms, configs, _, constraint_lines = checked_arms(ablation, preset, base_overrides)
  for line in constraint_lines:
    log(f"constraint ok: {line}")
  seeds = tuple(ablation.seeds[preset] if seeds is None else seeds)
  chosen = all_arms if arms is None else [a for a in all_arms if a.name in arms]
  unknown = sorted(set(arms or ()) - {a.name for a in all_arms})
  if unknown:
    raise ValueError(
      f"{ablation.name}/{preset} has no arm(s) {unknown}; arms: "
      f"{', '.join(a.name for a in all_arms)}"
    )
  _check_workdir(workdir, ablation, preset, create=True)

  from moejax import train  # deferred: the accounting above needs no jax backend

  trained, skipped, interrupted, compiling_entered = [], [], False, False
  with _workdir_lock(workdir), contextlib.ExitStack() as compiling:
    jobs = [(a, s) for a in chosen for s in a.seeds_of(seeds)]
    specs = {}
    for arm, seed in jobs:  # refuse mismatching run directories before training anything
      run_dir = run_dir_of(workdir, arm.name, seed)
      config = arm_config(ablation, preset, arm, seed, base_overrides)
      spec = {
        "ablation": ablation.name,
        "preset": preset,
        "arm": arm.name,
        "seed": seed,
        "overrides": dict(arm.overrides),
        "base_overrides": dict(base_overrides or {}),
        "config": _json_roundtrip(config.to_dict()),
      }
      _check_run_dir(run_dir, spec)
      specs[arm.name, seed] = (run_dir, config, spec)
    for i, (arm, seed) in enumerate(jobs, 1):
      run_dir, config, spec = specs[arm.name, seed]
      tag = f"[{ablation.name}/{preset} {i}/{len(jobs)}] {arm.name} seed {seed}"
      status = arm_status(run_dir, config)
      if status == "done":
        log(f"{tag}: finished earlier, skipped")
        skipped.append((arm.name, seed))
        continue
      if status == "finished_unmarked":
        log(f"{tag}: final checkpoint and eval found without done.json; marked done, skipped")
        _write_json_atomic(
          os.path.join(run_dir, "done.json"),
          {"recovered": True, "num_steps": config.train.num_steps},
        )
        skipped.append((arm.name, seed))
        continue
      if not compiling_entered:  # once, and only when something is trained
        compiling.enter_context(compile_mode(preset))
        compiling_entered = True
      os.makedirs(run_dir, exist_ok=True)
      if not os.path.exists(os.path.join(run_dir, "arm.json")):
        _write_json_atomic(os.path.join(run_dir, "arm.json"), spec)
      log(
        f"{tag}: {'resuming' if status == 'partial' else 'training'} "
        f"{config.train.num_steps} steps in {run_dir}"
      )
      start = time.perf_counter()
      final = train.train_and_evaluate(config, run_dir, show_progress=show_progress)
      wall = time.perf_counter() - start
      if final.get("preempted"):
        log(f"{tag}: interrupted; rerun the same command to resume")
        interrupted = True
        break
      _write_json_atomic(
        os.path.join(run_dir, "done.json"),
        {
          "num_steps": config.train.num_steps,
          "wall_s": wall,
          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "final": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        },
      )
      trained.append((arm.name, seed))
      log(
        f"{tag}: done in {wall:.0f}s: eval {final.get('eval/bits_per_byte', float('nan')):.4f} "
        "bits/byte"
      )
    rows = collect_results(
      ablation,
      preset,
      workdir,
      base_overrides=base_overrides,
      log=log,
      constraint_lines=constraint_lines,
    )
  return {"rows": rows, "trained": trained, "skipped": skipped, "interrupted": interrupted}


# ----------------------------------------------------------------------------- results

RESULT_COLUMNS = (
  "ablation",
  "preset",
  "arm",
  "seed",
  "overrides",
  "num_layers",
  "d_model",
  "num_experts",
  "top_k",
  "expert_d_ff",
  "moe_layer_interval",
  "d_ff",
  "params_active",
  "params_total",
  "ffn_active",
  "ffn_total",
  "flops_per_token",
  "train_flops",
  "tokens",
  "steps",
  "final_train_loss",
  "final_train_ce_loss",
  "final_eval_loss",
  "final_eval_bits_per_byte",
  "tokens_per_sec",
  "train_dropped_fraction",
  "eval_dropped_fraction",
  "expert_load_imbalance",
  "wall_s",
)


def collect_results(
  ablation: Ablation,
  preset: str,
  workdir: str,
  *,
  base_overrides: Mapping[str, Any] | None = None,
  log: Callable[[str], None] = print,
  constraint_lines: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
  """Rows of every finished arm/seed under `workdir` (any seeds found), written to
  results.csv, summary.md and the plots (see `write_keeping_previous`)."""
  arms, _, _, lines = checked_arms(ablation, preset, base_overrides)
  constraint_lines = lines if constraint_lines is None else constraint_lines
  rows, curves, pending = [], {}, []
  for arm in arms:
    arm_dir = os.path.join(workdir, arm.name)
    seeds = sorted(
      int(n[5:])
      for n in (os.listdir(arm_dir) if os.path.isdir(arm_dir) else [])
      if re.fullmatch(r"seed_\d+", n)
    )
    for seed in seeds:
      run_dir = run_dir_of(workdir, arm.name, seed)
      if not os.path.exists(os.path.join(run_dir, "done.json")):
        pending.append(f"{arm.name}/seed_{seed}")
        continue
      config = arm_config(ablation, preset, arm, seed, base_overrides)
      m, t = config.model, config.train
      done = _read_json(os.path.join(run_dir, "done.json"))
      try:
        outcome = summarize_run(run_dir, t.num_steps, m.num_experts)
      except (ValueError, OSError, KeyError) as error:  # one bad run must not hide the rest
        log(f"left out {arm.name}/seed_{seed}: {error}")
        pending.append(f"{arm.name}/seed_{seed} (unreadable metrics)")
        continue
      row = {
        "ablation": ablation.name,
        "preset": preset,
        "arm": arm.name,
        "seed": seed,
        "overrides": json.dumps(dict(arm.overrides), sort_keys=True),
        "num_layers": m.num_layers,
        "d_model": m.d_model,
        "num_experts": m.num_experts,
        "top_k": m.top_k if m.num_experts else 0,
        "expert_d_ff": expert_d_ff_of(m) if m.num_experts else 0,
        "moe_layer_interval": m.moe_layer_interval if m.num_experts else 0,
        "d_ff": m.d_ff,
        **accounting(config),
        "steps": t.num_steps,
        **outcome,
        "wall_s": done.get("wall_s", float("nan")),
      }
      rows.append({k: row[k] for k in RESULT_COLUMNS})
      records = _read_records(run_dir)
      curves[arm.name, seed] = (
        [(r["step"], r["eval/bits_per_byte"]) for r in records if "eval/bits_per_byte" in r],
        [(r["step"], r["train/loss"]) for r in records if "train/loss" in r],
      )
  if not rows:
    log(f"no finished runs under {workdir} yet")
    return rows
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_value(v) for k, v in row.items()})
  files = {
    "results.csv": out.getvalue().encode(),
    "summary.md": summary_markdown(
      ablation, preset, arms, rows, constraint_lines, pending
    ).encode(),
  }
  files.update(plot_curves(ablation, preset, arms, curves))
  for name, data in files.items():
    write_keeping_previous(os.path.join(workdir, name), data, log=log)
  log(
    f"results: {os.path.join(workdir, 'results.csv')} ({len(rows)} runs), summary.md, "
    "eval_bits_per_byte.png, train_loss.png"
  )
  return rows


def _csv_value(v):
  if isinstance(v, float):
    if math.isnan(v):
      return ""
    return repr(v) if not v.is_integer() else str(int(v)) if abs(v) < 1e15 else repr(v)
  return v


def _mean_std(values: Sequence[float], fmt: str) -> str:
  values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
  if not values:
    return "–"
  if len(values) == 1:
    return format(values[0], fmt)
  return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def summary_markdown(
  ablation: Ablation,
  preset: str,
  arms: Sequence[Arm],
  rows: Sequence[Mapping[str, Any]],
  constraint_lines: Sequence[str],
  pending: Sequence[str],
) -> str:
  lines = [f"# {ablation.title} ({ablation.name}, preset `{preset}`)", ""]
  lines += ["Constraints (checked with `moejax.flops` before training):", ""]
  lines += [f"- {c}" for c in constraint_lines] + [""]
  lines += [
    "Mean ± sample std over seeds. Final train loss: mean over the last 10% of steps; "
    "eval: the last evaluation; imbalance: max expert share × E, mean over MoE layers "
    "and the last 10% of steps (1.0 = uniform); tokens/s: median over log intervals.",
    "",
  ]
  header = (
    "| arm | what | E | k | expert d_ff | MoE every | active params | total params | "
    "FFN active | FFN total | fwd FLOPs/token | seeds | eval bits/byte | eval loss | "
    "train loss | tokens/s | dropped (train) | imbalance |"
  )
  lines += [header, "|" + "---|" * (header.count("|") - 1)]
  for arm in arms:
    rs = [r for r in rows if r["arm"] == arm.name]
    if not rs:
      continue
    r0 = rs[0]
    col = lambda key, fmt: _mean_std([r[key] for r in rs], fmt)
    moe = r0["num_experts"] > 0
    lines.append(
      f"| `{arm.name}` | {arm.note} | {r0['num_experts'] if moe else '–'} | "
      f"{r0['top_k'] if moe else '–'} | {r0['expert_d_ff'] if moe else '–'} | "
      f"{r0['moe_layer_interval'] if moe else '–'} | {_human(r0['params_active'])} | "
      f"{_human(r0['params_total'])} | {_human(r0['ffn_active'])} | {_human(r0['ffn_total'])} | "
      f"{_human(r0['flops_per_token'])} | {len(rs)} | {col('final_eval_bits_per_byte', '.4f')} | "
      f"{col('final_eval_loss', '.4f')} | {col('final_train_loss', '.4f')} | "
      f"{col('tokens_per_sec', '.0f')} | {col('train_dropped_fraction', '.3f')} | "
      f"{col('expert_load_imbalance', '.2f') if moe else '–'} |"
    )
  missing = [a.name for a in arms if not any(r["arm"] == a.name for r in rows)]
  lines.append("")
  if missing or pending:
    lines.append(f"Not finished yet: {', '.join(missing + list(pending))}.")
    lines.append("")
  lines += [
    "![eval bits per byte](eval_bits_per_byte.png)",
    "",
    "![train loss](train_loss.png)",
    "",
  ]
  return "\n".join(lines)


def plot_curves(
  ablation: Ablation,
  preset: str,
  arms: Sequence[Arm],
  curves: Mapping[tuple[str, int], tuple[list, list]],
) -> dict[str, bytes]:
  """PNG bytes of eval bits/byte and train loss vs step, one line per arm (the mean over
  seeds; the band spans the seeds' min to max)."""
  # Figure objects of their own: no pyplot state, no backend switch for the caller.
  from matplotlib import colormaps
  from matplotlib.figure import Figure

  out = {}
  for index, (name, label) in enumerate(
    (("eval_bits_per_byte", "eval bits per byte"), ("train_loss", "train loss (nats/token)"))
  ):
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.subplots()
    for color, arm in zip(colormaps["tab10"].colors * 3, arms):
      series = [dict(curves[key][index]) for key in sorted(curves) if key[0] == arm.name]
      if not series:
        continue
      steps = sorted(set.intersection(*(set(s) for s in series)))
      mean = [statistics.mean(s[x] for s in series) for x in steps]
      ax.plot(
        steps,
        mean,
        color=color,
        label=f"{arm.name} ({len(series)} seed{'s' if len(series) > 1 else ''})",
        marker="o" if index == 0 else None,
        markersize=3,
      )
      if len(series) > 1:
        ax.fill_between(
          steps,
          [min(s[x] for s in series) for x in steps],
          [max(s[x] for s in series) for x in steps],
          color=color,
          alpha=0.2,
        )
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{ablation.title} ({preset})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    out[f"{name}.png"] = buffer.getvalue()
  return out


# ----------------------------------------------------------------------------- pod


def _cli_value(value) -> str:
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  return shlex.quote(str(value))


def pod_overrides(
  ablation: Ablation, arm: Arm, seed: int, base_overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """The `--config.KEY=VALUE` overrides that turn `ablation.pod_config` into the arm's
  pod config (every key that differs)."""
  want = flatten(arm_config(ablation, "pod", arm, seed, base_overrides))
  have = flatten(load_config(ablation.pod_config))
  if set(want) != set(have):
    raise ValueError(f"{ablation.name}: pod config keys differ from {ablation.pod_config}")
  # The seed always, for the record; then every key that differs.
  diff = {k: want[k] for k in want if want[k] != have[k] or k == "train.seed"}
  nones = [k for k, v in diff.items() if v is None]
  if nones:
    raise ValueError(
      f"{ablation.name}/pod arm {arm.name!r} sets {nones} to None, which "
      "cannot be passed as --config.KEY=VALUE"
    )
  return diff


def pod_commands(
  ablation: Ablation,
  workdir: str,
  seeds: Sequence[int],
  base_overrides: Mapping[str, Any] | None = None,
) -> list[str]:
  arms, _, _, _ = checked_arms(ablation, "pod", base_overrides)
  commands = []
  for arm in arms:
    for seed in arm.seeds_of(seeds):
      flags = " ".join(
        f"--config.{k}={_cli_value(v)}"
        for k, v in pod_overrides(ablation, arm, seed, base_overrides).items()
      )
      commands.append(
        f"python -m moejax.main --config={ablation.pod_config} "
        f"--workdir={workdir.rstrip('/')}/{arm.name}/seed_{seed} --distributed "
        f"{flags}".rstrip()
      )
  return commands


# ----------------------------------------------------------------------------- estimate


def estimate(
  ablation: Ablation,
  preset: str,
  *,
  seeds: Sequence[int] | None = None,
  arms: Sequence[str] | None = None,
  steps: int = 10,
  base_overrides: Mapping[str, Any] | None = None,
  startup_s: float = 6.0,
  checkpoint_s: float = 2.0,
  loop_overhead: float = 1.1,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Times `steps` train steps (after one warm-up) and one eval batch of each arm on
  synthetic tokens, and projects the wall time of the whole ablation at `preset`: per
  run, `startup_s` (data, model init) + compile + `loop_overhead`·num_steps·step (the
  input pipeline and logging of the real loop) + evals·eval_batches·eval_batch +
  checkpoints·`checkpoint_s`, summed over the arms' seeds. The overheads are calibrated
  on a 100-step cpu run of `top_k`. Measured under whatever else runs on the machine."""
  import jax
  import numpy as np
  from flax import nnx
  from moejax import train

  all_arms, _, _, _ = checked_arms(ablation, preset, base_overrides)
  seeds = tuple(ablation.seeds[preset] if seeds is None else seeds)
  chosen = [a for a in all_arms if arms is None or a.name in arms]
  total, per_arm = 0.0, {}
  with compile_mode(preset):
    for arm in chosen:
      config = arm_config(ablation, preset, arm, 0, base_overrides)
      t = config.train
      start = time.perf_counter()
      model, optimizer, _ = train.build(config)
      graphdef, state = nnx.split((model, optimizer))
      train_step, eval_step = train.make_steps(graphdef, config.model)
      tokens = np.random.default_rng(0).integers(0, 256, (t.batch_size, t.seq_len + 1))
      batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
      train_c = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
      eval_c = jax.jit(eval_step).lower(state, batch).compile()
      compile_s = time.perf_counter() - start
      state, metrics = train_c(state, batch)
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = train_c(state, batch)
      jax.block_until_ready(metrics)
      step_s = (time.perf_counter() - start) / steps
      jax.block_until_ready(eval_c(state, batch))
      start = time.perf_counter()
      jax.block_until_ready(eval_c(state, batch))
      eval_s = time.perf_counter() - start
      evals = t.num_steps // t.eval_every + (t.num_steps % t.eval_every > 0)
      checkpoints = t.num_steps // t.checkpoint_every + (t.num_steps % t.checkpoint_every > 0)
      run_s = (
        startup_s
        + compile_s
        + loop_overhead * t.num_steps * step_s
        + evals * config.data.eval_batches * eval_s
        + checkpoints * checkpoint_s
      )
      per_arm[arm.name] = {
        "steps_per_s": 1 / step_s,
        "compile_s": compile_s,
        "eval_batch_s": eval_s,
        "run_s": run_s,
        "tokens_per_s": t.batch_size * t.seq_len / step_s,
      }
      runs = len(arm.seeds_of(seeds))
      total += run_s * runs
      log(
        f"{ablation.name}/{preset} {arm.name}: {1 / step_s:.2f} steps/s "
        f"({t.batch_size * t.seq_len / step_s:.0f} tokens/s), compile {compile_s:.1f}s, "
        f"eval batch {eval_s:.2f}s -> {run_s / 60:.1f} min per run ({t.num_steps} steps) "
        f"x {runs} seed{'s' if runs > 1 else ''}"
      )
  log(
    f"{ablation.name}/{preset}: projected {total / 60:.1f} min for {len(chosen)} arms, "
    f"seeds {seeds}"
  )
  return {"per_arm": per_arm, "total_s": total, "seeds": seeds}


# ----------------------------------------------------------------------------- CLI


def describe(
  ablation: Ablation, preset: str, base_overrides=None, log: Callable[[str], None] = print
) -> None:
  arms, configs, rows, _ = checked_arms(ablation, preset, base_overrides)
  t = next(iter(configs.values())).train
  log(
    f"{ablation.title} ({ablation.name}), preset {preset}: {t.num_steps} steps x "
    f"{t.batch_size} x {t.seq_len} tokens, seeds {ablation.seeds[preset]}"
  )
  log(
    f"{'arm':<16} {'active':>13} {'total':>13} {'FFN active':>13} {'FFN total':>13} "
    f"{'fwd FLOPs/tok':>14}  overrides"
  )
  for arm in arms:
    r = rows[arm.name]
    seeds = "" if arm.max_seeds is None else f"  (first {arm.max_seeds} seed(s) only)"
    log(
      f"{arm.name:<16} {_fmt_number(r['params_active']):>13} {_fmt_number(r['params_total']):>13} "
      f"{_fmt_number(r['ffn_active']):>13} {_fmt_number(r['ffn_total']):>13} "
      f"{_fmt_number(r['flops_per_token']):>14}  {json.dumps(dict(arm.overrides))}{seeds}"
    )
  for line in check_constraints(ablation, preset, rows):
    log(f"constraint ok: {line}")


def _parse_set(items: Iterable[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = {"True": True, "False": False, "None": None}.get(text, text)
    out[key.strip()] = value
  return out


def main(ablation: Ablation, argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog=f"python -m experiments.ablations.{ablation.name}",
    description=f"{ablation.title}. Runs every arm/seed in WORKDIR/ARM/seed_S (skipping "
    "finished ones), then writes results.csv, summary.md and plots.",
  )
  parser.add_argument("--preset", choices=PRESETS, default="cpu")
  parser.add_argument(
    "--workdir",
    help="the ablation's directory (pod: the prefix of the printed --workdir of each run)",
  )
  parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
  parser.add_argument("--arms", help="comma-separated subset of arms (default: all)")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config key of every arm, e.g. data.data_dir=/data",
  )
  parser.add_argument(
    "--describe",
    action="store_true",
    help="print the arms, their parameter/FLOP counts and the constraint check",
  )
  parser.add_argument(
    "--estimate",
    action="store_true",
    help="time a few steps of each arm and project the total wall time",
  )
  parser.add_argument("--estimate_steps", type=int, default=10)
  parser.add_argument(
    "--collect_only",
    action="store_true",
    help="only rewrite results.csv, summary.md and plots from finished runs",
  )
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  try:
    base_overrides = _parse_set(args.set)
    seeds = None if args.seeds is None else tuple(int(s) for s in args.seeds.split(",") if s)
    arms = None if args.arms is None else tuple(a for a in args.arms.split(",") if a)
    if args.describe:
      describe(ablation, args.preset, base_overrides)
      return 0
    if args.estimate:
      estimate(
        ablation,
        args.preset,
        seeds=seeds,
        arms=arms,
        steps=args.estimate_steps,
        base_overrides=base_overrides,
      )
      return 0
    if not args.workdir:
      raise ValueError("--workdir is required")
    if args.preset == "pod":
      if arms:
        raise ValueError("--arms is not supported with --preset=pod")
      for command in pod_commands(
        ablation, args.workdir, seeds or ablation.seeds["pod"], base_overrides
      ):
        print(command)
      return 0
    if args.collect_only:
      _check_workdir(args.workdir, ablation, args.preset, create=False)
      collect_results(ablation, args.preset, args.workdir, base_overrides=base_overrides)
      return 0
    result = run_ablation(
      ablation,
      args.preset,
      args.workdir,
      seeds=seeds,
      arms=arms,
      base_overrides=base_overrides,
      show_progress=not args.quiet,
    )
    return 130 if result["interrupted"] else 0
  except (ValueError, KeyError, TypeError, RuntimeError, OSError, FloatingPointError) as error:
    message = " ".join(str(error).strip("'\"").split())
    print(f"error: {message}", file=sys.stderr)
    # 2: the command, its arms or its workdir are wrong; 1: a run failed.
    return 2 if isinstance(error, (ValueError, KeyError, TypeError)) else 1
