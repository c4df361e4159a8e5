r"""A small scaling grid, dense sizes x expert counts, and the bilinear law of Clark et al.
2022 (Unified Scaling Laws for Routed Language Models, eq. 3 with plain log E) fitted to
it: log L = a·log N + b·log E + c·log N·log E + d.

A method demonstration at CPU scale: three sizes of a 4-layer dense model (d_model 32 /
64 / 128, d_ff = 4·d_model, one head per 32 dims), each also with E = 4, 16, 64 experts
of the dense FFN's width in every layer, top-1 (the routed models have the dense model's
FLOPs per token, plus the router). N is the dense model's non-embedding parameter count,
E = 1 the dense model itself, L the final eval bits/byte. Every grid point trains the same
tokens; the MoE arms take their size's dense learning rate (`lr_from`), as Clark et al.
keep the dense model's hyperparameters across expert counts. summary.md gives the fitted
coefficients with standard errors and 95% CIs, the residual RMS, the leave-one-grid-
point-out error and the seed-to-seed spread (what no fit can go below).

Arm `SIZE_eE`: SIZE in small / medium / large, E in 1 / 4 / 16 / 64 (smoke: d_model 8 /
16 / 32; pod: 768 / 1024 / 1536 over OLMoE's 16 layers, for the record).

Primary contrast (pre-registered): `large_e64` − `large_e1` on eval bits/byte, expected
lower (Clark et al.: at fixed N the loss falls with E, b < 0).

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x step; step, relative to
configs/tiny.py's 0.30 s: large 0.25 / 0.27 / 0.33 / 0.55 s for E = 1 / 4 / 16 / 64,
medium ≈ 0.09-0.16 s, small ≈ 0.04-0.07 s): 12 grid points x 2 seeds + 3 sizes x 3 sweep
runs = 33 runs of 400 steps ≈ 2 x (12 x 16 s + 504 x 2.07 s) + 3 x (3 x 16 s + 504 x
0.38 s) ≈ 53 min. 1.64M tokens per run.

    python -m experiments.ablations.scaling --preset=cpu --workdir=workdirs/ablations/scaling
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.runner import presets, stats
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast, arm_config, get_arms
from moejax.models import flops

SIZES = {  # name -> d_model per preset
  "smoke": {"small": 8, "medium": 16, "large": 32},
  "cpu": {"small": 32, "medium": 64, "large": 128},
  "pod": {"small": 768, "medium": 1024, "large": 1536},
}
EXPERTS = (1, 4, 16, 64)
CPU_STEPS = 400


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS)


def arms(preset: str) -> list[Arm]:
  out = []
  for size, d in SIZES[preset].items():
    heads = max(1, d // (128 if preset == "pod" else 32))
    shape = {
      "model.d_model": d,
      "model.num_heads": heads,
      "model.num_kv_heads": heads,
      "model.head_dim": d // heads,
      "model.d_ff": 4 * d,
    }
    for e in EXPERTS:
      if e == 1:
        overrides = {**shape, "model.num_experts": 0}
        note = f"dense, d_model {d}, d_ff {4 * d}"
      else:
        overrides = {
          **shape,
          "model.num_experts": e,
          "model.top_k": 1,
          "model.expert_d_ff": 4 * d,
          "model.moe_layer_interval": 1,
        }
        note = f"d_model {d}, top-1 of {e} experts of hidden {4 * d}"
      out.append(Arm(f"{size}_e{e}", overrides, note, lr_from=None if e == 1 else f"{size}_e1"))
  return out


def dense_size(ablation: Ablation, preset: str, arm_name: str) -> int:
  """N: the non-embedding parameters of the dense model of `arm_name`'s size."""
  arm = next(a for a in get_arms(ablation, preset) if a.name == arm_name.split("_")[0] + "_e1")
  counts = flops.count_params(arm_config(ablation, preset, arm).model)
  return counts["total"] - counts["embedding"]


def law_report(ablation: Ablation, preset: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The bilinear law fitted to the rows' final eval bits/byte (Markdown lines)."""
  runs = [r for r in rows if math.isfinite(r["final_eval_bits_per_byte"])]
  n = [dense_size(ablation, preset, r["arm"]) for r in runs]
  e = [max(1, int(r["num_experts"])) for r in runs]
  lines = ["## Scaling law (Clark et al. 2022): log L = a·log N + b·log E + c·log N·log E + d", ""]
  try:
    fit = stats.fit_bilinear_law(n, e, [r["final_eval_bits_per_byte"] for r in runs])
  except (ValueError, ArithmeticError) as error:
    return lines + [f"Not fitted: {error}."]
  lines += [
    f"Fitted by least squares to {fit.runs} runs at {fit.points} grid points (N: the dense "
    "model's non-embedding parameters; E = 1: dense; L: final eval bits/byte). A method "
    "demonstration at CPU scale: Clark et al. fit models of 15M-1.3B parameters.",
    "",
    f"| term | estimate | se | 95% CI (df {fit.df}) |",
    "|---|---|---|---|",
  ]
  for term, c, s, lo, hi in zip(stats.LAW_TERMS, fit.coef, fit.se, fit.lo, fit.hi, strict=True):
    lines.append(f"| {term} | {c:+.5f} | {s:.5f} | [{lo:+.5f}, {hi:+.5f}] |")
  lines += [
    "",
    f"Fit error in log L: residual RMS {fit.rmse:.5f} over runs, {fit.point_rmse:.5f} over "
    f"grid-point means; leave-one-grid-point-out prediction RMS {fit.loo_rmse:.5f}; "
    + (
      f"between-seed RMS {fit.seed_rms:.5f} (the noise floor). "
      if math.isfinite(fit.seed_rms)
      else "no between-seed spread (one seed per point). "
    )
    + "Clark et al. find b < 0 (more "
    "experts help) and c > 0 (less so for larger N).",
    "",
    "| N | E | seeds | mean L | fitted L |",
    "|---|---|---|---|---|",
  ]
  points: dict[tuple[int, int], list[float]] = {}
  for n_, e_, r in zip(n, e, runs, strict=True):
    points.setdefault((n_, e_), []).append(r["final_eval_bits_per_byte"])
  for (n_, e_), values in sorted(points.items()):
    lines.append(
      f"| {n_:,} | {e_} | {len(values)} | {statistics.mean(values):.4f} | "
      f"{fit.predict(n_, e_):.4f} |"
    )
  return lines


ABLATION = Ablation(
  name="scaling",
  title="Dense size x expert count, and Clark et al.'s bilinear law",
  base=base,
  arms=arms,
  constraints=(Constraint("tokens", 0.0),),
  seeds={"smoke": (0, 1), "cpu": (0, 1), "pod": (0,)},
  primary=Contrast(
    "large_e64",
    "large_e1",
    "lower",
    "Clark et al. 2022: at a fixed dense size N the loss falls with the number of experts.",
  ),
  secondary=(
    Contrast(
      "small_e64",
      "small_e1",
      "lower",
      "Clark et al. 2022: more experts help at every size, more at small N (c > 0).",
    ),
  ),
  learning_rates={"smoke": (3e-3,), "cpu": (2e-3, 4e-3, 8e-3), "pod": (1.5e-4, 3e-4, 6e-4)},
  extra_report=law_report,
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
