r"""Ablations whose arms start from a model trained first: fine-tuning a pretrained MoE
(`experiments.finetune`) and upcycling a pretrained dense model (`experiments.upcycle`).

Such an ablation is two functions: `build(workdir, preset)`, the `Ablation` whose arms'
configs name the prerequisite runs (`train.init_from=WORKDIR/NAME`), and
`prepare(workdir, preset, train)`, which makes those runs, calling `train(name, config)`
to train (or resume, or find finished) each in `WORKDIR/NAME`. When the command trains,
the arms' constraints are checked first, then `prepare` runs, then the ablations' runner
(`experiments.runner.cli`): the learning-rate sweep, seeds, paired contrasts,
computed verdicts. `--describe`, `--estimate`, `--collect_only` and the pod preset only
build.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import ml_collections

from experiments.runner.accounting import checked_arms
from experiments.runner.cli import main as ablation_main
from experiments.runner.cli import parse_set
from experiments.runner.run import compile_mode
from experiments.runner.spec import Ablation
from experiments.runner.workdir import check_workdir, workdir_lock
from moejax.config import apply_overrides
from moejax.runtime.cli import report_error


class Interrupted(Exception):
  """A prerequisite run stopped on a signal (rerun the same command to resume it)."""


def train_prerequisite(
  workdir: str, name: str, config: ml_collections.ConfigDict, *, show_progress: bool = True
) -> str:
  """Trains `config` in `WORKDIR/name` (resuming it; a finished run returns at once) and
  returns that directory's absolute path."""
  from moejax.training.train import train_and_evaluate  # imports jax

  path = prerequisite_path(workdir, name)
  print(f"[{name}] {config.train.num_steps} steps in {path}", flush=True)
  result = train_and_evaluate(config, path, show_progress=show_progress)
  if result.get("preempted"):
    raise Interrupted(f"{path} stopped at step {result['step']}; rerun the same command")
  return path


def prerequisite_path(workdir: str | None, name: str) -> str:
  """Where prerequisite `name` is (or would be) trained."""
  return os.path.abspath(os.path.join(workdir, name)) if workdir else f"WORKDIR/{name}"


def main_starting_from(
  build: Callable[[str | None, str], Ablation],
  prepare: Callable[[str, str, Callable[[str, ml_collections.ConfigDict], str]], None],
  argv: Sequence[str] | None = None,
) -> int:
  """The ablation command, with its prerequisites made first when the command trains."""
  argv = list(sys.argv[1:] if argv is None else argv)
  peek = argparse.ArgumentParser(add_help=False)
  peek.add_argument("--workdir")
  peek.add_argument("--preset", default="cpu")
  peek.add_argument("--set", action="append", default=[])
  for flag in ("--describe", "--estimate", "--collect_only", "--verbose", "--quiet"):
    peek.add_argument(flag, action="store_true")
  known, _ = peek.parse_known_args(argv)
  trains = bool(known.workdir) and known.preset in ("smoke", "cpu")
  trains = trains and not (known.describe or known.estimate or known.collect_only)
  try:
    ablation = build(known.workdir, known.preset)
    if trains:
      overrides = parse_set(known.set)  # `--set KEY=VALUE`: every arm's and prerequisite's
      checked_arms(ablation, known.preset, overrides)  # before anything trains
      check_workdir(known.workdir, ablation.name, known.preset, create=True)
      train = lambda name, config: train_prerequisite(
        known.workdir, name, apply_overrides(config, overrides), show_progress=not known.quiet
      )
      with workdir_lock(known.workdir), compile_mode(known.preset):
        prepare(known.workdir, known.preset, train)
  except Interrupted as stop:
    print(f"stopped: {stop}", file=sys.stderr)
    return 130
  except (ValueError, KeyError, TypeError, RuntimeError, OSError, FloatingPointError) as error:
    return report_error(error, verbose=known.verbose)
  return ablation_main(ablation, argv)
