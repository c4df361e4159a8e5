r"""The command line of every ablation: `python -m experiments.ablations.NAME [flags]`.

Errors are one line on stderr: exit 2 for a wrong command, arm list or workdir, 1 for a
run that failed, 130 when a signal interrupted a run (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from experiments.runner import pod, report
from experiments.runner.accounting import check_constraints, checked_arms, fmt_number
from experiments.runner.run import ALL_ARMS, learning_rate_plan, run_ablation
from experiments.runner.spec import PRESETS, SWEEP_SEED, Ablation
from experiments.runner.workdir import check_workdir
from moejax.runtime.cli import report_error


def describe(
  ablation: Ablation,
  preset: str,
  base_overrides=None,
  learning_rates: Mapping[str, float] | None = None,
  log: Callable[[str], None] = print,
) -> None:
  arms, configs, rows, _ = checked_arms(ablation, preset, base_overrides)
  t = next(iter(configs.values())).train
  plan = learning_rate_plan(ablation, preset, arms, learning_rates)
  grid = ", ".join(f"{x:g}" for x in ablation.learning_rates[preset])
  log(
    f"{ablation.title} ({ablation.name}), preset {preset}: {t.num_steps} steps x "
    f"{t.batch_size} x {t.seq_len} tokens, seeds {ablation.seeds[preset]}, learning rates "
    f"{grid} (sweep at seed {SWEEP_SEED})"
  )
  log(
    f"primary contrast: {ablation.primary.name} ({ablation.primary.metric}), expected "
    f"{ablation.primary.expected}: {ablation.primary.claim}"
  )
  log(
    f"{'arm':<14} {'active':>11} {'total':>12} {'FFN active':>11} {'FFN total':>12} "
    f"{'FLOPs/tok':>11} {'tok/param':>9} {'lr':>9}  overrides"
  )
  for arm in arms:
    r = rows[arm.name]
    lr = plan[arm.name]
    lr = f"{lr:g}" if not isinstance(lr, str) else ("sweep" if lr == arm.name else f"as {lr}")
    log(
      f"{arm.name:<14} {fmt_number(r['params_active']):>11} {fmt_number(r['params_total']):>12} "
      f"{fmt_number(r['ffn_active']):>11} {fmt_number(r['ffn_total']):>12} "
      f"{fmt_number(r['flops_per_token']):>11} {r['tokens_per_active_param']:>9.2f} {lr:>9}  "
      f"{json.dumps(dict(arm.overrides))}"
    )
  for line in check_constraints(ablation, preset, rows):
    log(f"constraint ok: {line}")


def parse_set(items: Iterable[str]) -> dict[str, Any]:
  """`KEY=VALUE` strings -> {key: value}; VALUE is JSON, True/False/None or a string."""
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


def parse_learning_rates(text: str | None) -> dict[str, float] | None:
  """`LR` (every arm) or `ARM=LR,ARM=LR` -> {arm or ALL_ARMS: lr}; None -> None (sweep)."""
  if text is None:
    return None
  out = {}
  for item in text.split(","):
    arm, sep, value = item.rpartition("=")
    try:
      lr = float(value)
    except ValueError:
      raise ValueError(
        f"--learning_rate {text!r}: expected LR or ARM=LR,... with LR a number"
      ) from None
    if not lr > 0:
      raise ValueError(f"--learning_rate {text!r}: a learning rate must be > 0")
    out[arm.strip() if sep else ALL_ARMS] = lr
  return out


def _parser(ablation: Ablation) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=f"python -m experiments.ablations.{ablation.name}",
    description=f"{ablation.title}. Sweeps each arm's learning rate, runs every arm/seed in "
    "WORKDIR/ARM/seed_S (skipping finished ones), then writes results.csv, contrasts.csv, "
    "summary.md and plots.",
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
    "--learning_rate",
    metavar="LR|ARM=LR,...",
    help="fix the learning rate of every arm (LR) or of the named arms instead of sweeping",
  )
  parser.add_argument(
    "--describe",
    action="store_true",
    help="print the arms, their parameter/FLOP counts and the constraint check",
  )
  parser.add_argument(
    "--estimate",
    action="store_true",
    help="time a few steps of each arm and project the total wall time "
    "(with --workdir: kept in WORKDIR/estimate.json, compared in summary.md)",
  )
  parser.add_argument("--estimate_steps", type=int, default=10)
  parser.add_argument(
    "--collect_only",
    action="store_true",
    help="only rewrite the results, contrasts, summary and plots from finished runs",
  )
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  parser.add_argument(
    "--verbose", action="store_true", help="on an error, the traceback above the one-line message"
  )
  return parser


def main(ablation: Ablation, argv: Sequence[str] | None = None) -> int:
  args = _parser(ablation).parse_args(argv)
  try:
    base_overrides = parse_set(args.set)
    seeds = None if args.seeds is None else tuple(int(s) for s in args.seeds.split(",") if s)
    arms = None if args.arms is None else tuple(a for a in args.arms.split(",") if a)
    rates = parse_learning_rates(args.learning_rate)
    if args.describe:
      describe(ablation, args.preset, base_overrides, rates)
      return 0
    if args.estimate:
      from experiments.runner.estimate import estimate  # imports jax

      estimate(
        ablation,
        args.preset,
        seeds=seeds,
        arms=arms,
        steps=args.estimate_steps,
        base_overrides=base_overrides,
        learning_rates=rates,
        workdir=args.workdir,
      )
      return 0
    if not args.workdir:
      raise ValueError("--workdir is required")
    if args.preset == "pod":
      if arms:
        raise ValueError("--arms is not supported with --preset=pod")
      note = lambda line: print(f"note: {line}", file=sys.stderr)
      for command in pod.pod_commands(
        ablation, args.workdir, seeds or ablation.seeds["pod"], base_overrides, rates, note
      ):
        print(command)
      return 0
    if args.collect_only:
      check_workdir(args.workdir, ablation.name, args.preset, create=False)
      report.collect_results(ablation, args.preset, args.workdir, base_overrides=base_overrides)
      return 0
    result = run_ablation(
      ablation,
      args.preset,
      args.workdir,
      seeds=seeds,
      arms=arms,
      base_overrides=base_overrides,
      learning_rates=rates,
      show_progress=not args.quiet,
    )
    return 130 if result["interrupted"] else 0
  except (ValueError, KeyError, TypeError, RuntimeError, OSError, FloatingPointError) as error:
    # One line; 2: the command, its arms or its workdir are wrong; 1: a run failed.
    return report_error(error, verbose=args.verbose)
