r"""Parameter and FLOP accounting of the arms (all from `moejax.models.flops`), and the check that
an arm list holds its ablation's quantities equal.

Before anything trains (and before `--describe`, `--estimate` and the pod commands) each
arm's numbers are computed from its config alone, and an arm list that breaks a
constraint beyond its tolerance is refused with one line naming the arm and the numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from experiments.runner.spec import (
  QUANTITIES,
  Ablation,
  Constraint,
  ConstraintError,
  arm_config,
  get_arms,
)
from moejax.models import flops


def ffn_params(model_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Total and active expert/FFN parameters: routed experts, shared experts and dense
  FFNs (of non-MoE layers and of a dense-MoE hybrid's dense branch); not the router.

  Computed with `moejax.models.flops.count_params` alone: its counts are affine in `d_ff` and
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
  """The parameter, FLOP and token numbers of one arm config (moejax.models.flops conventions).

  `tokens_per_active_param`: training tokens per active parameter (embeddings included),
  the Chinchilla-style measure of how far a run trains its model (about 20 is
  compute-optimal for dense models, Hoffmann et al. 2022)."""
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
    "tokens_per_active_param": tokens / params["active"],
  }


def fmt_number(x: float) -> str:
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
          f"{fmt_number(value)} vs {fmt_number(ref)} for reference arm {ref_name!r} "
          f"({rel:+.2%}; tolerance ±{c.tolerance:.0%}) [{QUANTITIES[c.quantity]}]"
        )
      worst = max(worst, abs(rel))
    lines.append(
      f"{c.quantity}: {c.describe()}; largest deviation {worst:.3%} "
      f"(reference `{ref_name}` = {fmt_number(ref)})"
    )
  return lines


def checked_arms(ablation: Ablation, preset: str, base_overrides: Mapping[str, Any] | None = None):
  """Arms, their configs (seed 0, the base learning rate) and accounting; raises
  ConstraintError if an arm breaks a constraint."""
  arms = get_arms(ablation, preset)
  configs = {a.name: arm_config(ablation, preset, a, 0, base_overrides) for a in arms}
  rows = {name: accounting(c) for name, c in configs.items()}
  lines = check_constraints(ablation, preset, rows)
  return arms, configs, rows, lines
