r"""The `pod` preset: nothing trains here; one `python -m moejax.main` command is printed
per run, with every config key in which the run differs from the ablation's pod config
file (and the seed always).

The learning-rate sweep comes first: its commands are printed for every arm that sweeps.
An arm's seed commands need its chosen rate: they are printed for the arms whose rate is
known (fixed with `--learning_rate ARM=LR`, inherited from such an arm, or a one-value
grid); for the others a note says to run the sweep and pass the chosen rates.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.runner.accounting import checked_arms
from experiments.runner.run import learning_rate_plan
from experiments.runner.spec import METRICS, SWEEP_SEED, Ablation, Arm, arm_config
from experiments.runner.workdir import SWEEP_DIR
from moejax.config import flatten, load_config


def _cli_value(value) -> str:
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return repr(value)
  return shlex.quote(str(value))


def pod_overrides(
  ablation: Ablation,
  arm: Arm,
  seed: int,
  base_overrides: Mapping[str, Any] | None = None,
  learning_rate: float | None = None,
) -> dict[str, Any]:
  """The `--config.KEY=VALUE` overrides that turn `ablation.pod_config` into the arm's
  pod config (every key that differs, and the seed)."""
  want = flatten(arm_config(ablation, "pod", arm, seed, base_overrides, learning_rate))
  have = flatten(load_config(ablation.pod_config))
  if set(want) != set(have):
    raise ValueError(f"{ablation.name}: pod config keys differ from {ablation.pod_config}")
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
  learning_rates: Mapping[str, float] | None = None,
  note: Callable[[str], None] = lambda _: None,
) -> list[str]:
  """The sweep commands, then the seed commands of every arm whose learning rate is known;
  `note` receives one line naming the arms still waiting for their sweep."""
  arms, _, _, _ = checked_arms(ablation, "pod", base_overrides)
  plan = learning_rate_plan(ablation, "pod", arms, learning_rates)
  prefix = workdir.rstrip("/")

  def command(arm, seed, lr, run_dir):
    flags = " ".join(
      f"--config.{k}={_cli_value(v)}"
      for k, v in pod_overrides(ablation, arm, seed, base_overrides, lr).items()
    )
    return (
      f"python -m moejax.main --config={ablation.pod_config} --workdir={run_dir} "
      f"--distributed {flags}"
    ).rstrip()

  commands = []
  sweeping = [a for a in arms if plan[a.name] == a.name]
  for arm in sweeping:
    for lr in ablation.learning_rates["pod"]:
      run_dir = f"{prefix}/{SWEEP_DIR}/{arm.name}/lr_{lr:g}/seed_{SWEEP_SEED}"
      commands.append(command(arm, SWEEP_SEED, lr, run_dir))
  waiting = [a.name for a in arms if isinstance(plan[a.name], str)]
  for arm in arms:
    if isinstance(plan[arm.name], str):
      continue
    for seed in seeds:
      commands.append(command(arm, seed, plan[arm.name], f"{prefix}/{arm.name}/seed_{seed}"))
  if waiting:
    note(
      f"arms {', '.join(waiting)}: after the sweep, pass --learning_rate ARM=LR,... (the rate "
      f"of lowest final {METRICS[ablation.lr_metric]} per sweeping arm) to print their seed "
      "commands"
    )
  return commands
