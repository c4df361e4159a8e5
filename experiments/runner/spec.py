r"""What an ablation is: a base config per preset, named arms of config overrides, the
quantities the arms must hold equal, the seeds, the learning-rate sweep and the one
pre-registered contrast the ablation exists to decide.

An arm (`Arm`) is a dict of dotted config overrides (`{"model.num_experts": 16, ...}`)
applied to the base. A contrast (`Contrast`) names two arms and the sign of their
difference a paper reports; `Ablation.primary` is the contrast its verdict is about
(named in the ablation file before any run: pre-registered), `Ablation.secondary` are
reported beside it as exploratory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from experiments.runner import presets, stats
from experiments.runner.workdir import SWEEP_DIR
from moejax.config import apply_overrides

PRESETS = ("smoke", "cpu", "pod")
DEFAULT_TOLERANCE = 0.02
# The seed of the learning-rate sweep runs: not one of the seeds the contrasts use, so the
# runs that pick an arm's learning rate are not the runs that test it.
SWEEP_SEED = 1000
# The sweep grid per preset (factor-2 steps around configs/tiny.py's 3e-3 and OLMoE's
# 3e-4; the smoke preset does not sweep, its runs are 4 steps long).
DEFAULT_LEARNING_RATES = {
  "smoke": (3e-3,),
  "cpu": (1.5e-3, 3e-3, 6e-3),
  "pod": (1.5e-4, 3e-4, 6e-4),
}
# What a contrast can compare: result columns (see results.RESULT_COLUMNS), lower = better
# for all of them.
METRICS = {
  "final_eval_bits_per_byte": "eval bits/byte",
  "final_train_ce_loss": "train CE (nats/token)",
  "step_s": "seconds per train step",
}


class ConstraintError(ValueError):
  """An arm list breaks its ablation's parameter/FLOP constraint (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: a directory-safe `name`, dotted config `overrides`, a one-line `note`.

  `lr_from`: the arm whose learning-rate sweep also sets this arm's learning rate (for
  arms that differ from it in nothing the optimiser sees, e.g. only the capacity factor);
  None: the arm sweeps its own."""

  name: str
  overrides: Mapping[str, Any]
  note: str = ""
  lr_from: str | None = None


@dataclasses.dataclass(frozen=True)
class Contrast:
  """`arm` − `baseline` of `metric` (a key of METRICS), paired by seed.

  `expected`: the sign the paper reports for that difference ('lower' or 'higher');
  `claim`: the paper's finding in one line, with its citation."""

  arm: str
  baseline: str
  expected: str
  claim: str
  metric: str = "final_eval_bits_per_byte"

  def __post_init__(self):
    if self.expected not in stats.EXPECTED:
      raise ValueError(f"Contrast.expected={self.expected!r}; allowed: {stats.EXPECTED}")
    if self.metric not in METRICS:
      raise ValueError(f"Contrast.metric={self.metric!r}; allowed: {', '.join(METRICS)}")

  @property
  def name(self) -> str:
    return f"{self.arm} − {self.baseline}"


# What a constraint can compare, and how each is computed (accounting.py, moejax.models.flops):
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


# Paired seeds per preset: five at `cpu` for a paired 95% CI with 4 degrees of freedom.
DEFAULT_SEEDS = {"smoke": (0, 1), "cpu": (0, 1, 2, 3, 4), "pod": (0,)}


@dataclasses.dataclass(frozen=True)
class Ablation:
  """An ablation: `base(preset)` -> config, `arms(preset)` -> arms (the same names at every
  preset), the constraints the arms must meet, seeds per preset, the pre-registered
  `primary` contrast and exploratory `secondary` ones, the learning-rate grid per preset
  and the config file the pod commands start from (by default the seeds of `DEFAULT_SEEDS`
  and the OLMoE pod recipe, `presets.POD_CONFIG`).

  `extra_report(ablation, preset, rows)`, if given, returns Markdown lines appended to
  summary.md (the scaling law fit).

  `lr_metric` (a key of METRICS) chooses each arm's learning rate from its sweep, lowest
  wins: the final train cross-entropy (default; a held-out estimate while a run sees each
  batch once), or the final eval bits/byte where training repeats its data (fine-tuning
  on a few plays for several epochs, where train CE rewards memorising them)."""

  name: str
  title: str
  base: Callable[[str], ml_collections.ConfigDict]
  arms: Callable[[str], list[Arm]]
  constraints: tuple[Constraint, ...]
  primary: Contrast
  seeds: Mapping[str, tuple[int, ...]] = dataclasses.field(
    default_factory=lambda: dict(DEFAULT_SEEDS)
  )
  pod_config: str = presets.POD_CONFIG
  secondary: tuple[Contrast, ...] = ()
  learning_rates: Mapping[str, tuple[float, ...]] = dataclasses.field(
    default_factory=lambda: dict(DEFAULT_LEARNING_RATES)
  )
  extra_report: Callable[[Ablation, str, Sequence[Mapping[str, Any]]], list[str]] | None = None
  lr_metric: str = "final_train_ce_loss"

  def __post_init__(self):
    if self.lr_metric not in ("final_train_ce_loss", "final_eval_bits_per_byte"):
      raise ValueError(
        f"{self.name}: lr_metric={self.lr_metric!r} must be final_train_ce_loss or "
        "final_eval_bits_per_byte."
      )

  @property
  def contrasts(self) -> tuple[Contrast, ...]:
    return (self.primary, *self.secondary)


def get_arms(ablation: Ablation, preset: str) -> list[Arm]:
  """The arms at `preset`, checked: safe unique names, contrasts and `lr_from` naming arms,
  no arm setting the learning rate or seed (the runner sets those)."""
  if preset not in PRESETS:
    raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
  arms = ablation.arms(preset)
  names = [a.name for a in arms]
  for name in names:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name == SWEEP_DIR:
      raise ValueError(f"{ablation.name}: arm name {name!r} is not a safe directory name")
  if len(set(names)) != len(names):
    raise ValueError(f"{ablation.name}: arm names repeat: {names}")
  for c in ablation.contrasts:
    for arm in (c.arm, c.baseline):
      if arm not in names:
        raise ValueError(f"{ablation.name}: contrast {c.name} names no arm {arm!r}")
  for arm in arms:
    if arm.lr_from is not None and arm.lr_from not in names:
      raise ValueError(f"{ablation.name}: arm {arm.name!r}: lr_from={arm.lr_from!r} is no arm")
    if arm.lr_from is not None and next(a for a in arms if a.name == arm.lr_from).lr_from:
      raise ValueError(f"{ablation.name}: arm {arm.name!r}: lr_from must name an arm that sweeps")
    for key in ("train.learning_rate", "train.seed"):
      if key in arm.overrides:
        raise ValueError(f"{ablation.name}: arm {arm.name!r} sets {key}; the runner sets it")
  return arms


def arm_config(
  ablation: Ablation,
  preset: str,
  arm: Arm,
  seed: int = 0,
  base_overrides: Mapping[str, Any] | None = None,
  learning_rate: float | None = None,
) -> ml_collections.ConfigDict:
  """The full config of `arm` at `preset` and `seed`: base, then `base_overrides` (the
  CLI's `--set`), then the arm's overrides, then `learning_rate` (None: the base's) and
  `train.seed`."""
  config = ablation.base(preset)
  apply_overrides(config, base_overrides or {}, "--set ")
  apply_overrides(config, arm.overrides, f"arm {arm.name!r}: ")
  if learning_rate is not None:
    config.train.learning_rate = float(learning_rate)
  config.train.seed = seed
  return config
