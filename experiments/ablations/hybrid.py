r"""Snowflake Arctic's dense-MoE hybrid vs a pure MoE at equal active AND total parameters.

* `hybrid` (`model.dense_moe_hybrid=True`): every layer has a dense FFN of hidden m·f and,
  residually beside it on the same input, a top-k MoE of E experts of hidden f (Arctic:
  a 10B dense transformer plus a residual 128 x 3.66B top-2 MoE).
* `pure_moe`: every layer is a top-(k+m) MoE of E+m experts of hidden f: the dense FFN's
  width becomes m more routable experts and m more routed slots per token, so active
  (k+m)·f and total (E+m)·f FFN hidden equal the hybrid's m·f + k·f and m·f + E·f.

With m = 1 the dense branch is an always-on expert: DeepSeekMoE's shared expert (Dai et
al. 2024), whose ablation finds isolating it better than routing that capacity.

    cpu: E = 8, k = 2, f = 128, m = 1 (hybrid: dense 128 + top-2 of 8; pure: top-3 of 9).
    smoke: f = 16. pod: E = 64, k = 8, f = 1024, m = 8 (OLMoE's experts plus a dense 8192;
    pure: top-16 of 72, which an expert axis of 8 divides).

Primary contrast (pre-registered): `hybrid` − `pure_moe` on eval bits/byte, expected
lower. Both dropless.

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x step; step ≈ 0.25 s for `hybrid`,
≈ 0.29 s for `pure_moe`, measured relative to configs/tiny.py's 0.30 s): 2 arms x (3 sweep
+ 5 seeds) = 16 runs of 550 steps ≈ 8 x 180 s + 8 x 206 s ≈ 51 min. 2.25M tokens per
run, 2.4 tokens per active parameter.

    python -m experiments.ablations.hybrid --preset=cpu --workdir=workdirs/ablations/hybrid
"""

from __future__ import annotations

import sys

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

SHAPE = {"smoke": (8, 2, 16, 1), "cpu": (8, 2, 128, 1), "pod": (64, 8, 1024, 8)}  # E, k, f, m
CPU_STEPS = 550


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS)


def arms(preset: str) -> list[Arm]:
  e, k, f, m = SHAPE[preset]
  return [
    Arm(
      "hybrid",
      {
        "model.dense_moe_hybrid": True,
        "model.d_ff": m * f,
        "model.num_experts": e,
        "model.top_k": k,
        "model.expert_d_ff": f,
        "model.moe_layer_interval": 1,
      },
      f"dense FFN {m * f} + residual top-{k} of {e} experts of hidden {f}",
    ),
    Arm(
      "pure_moe",
      {
        "model.num_experts": e + m,
        "model.top_k": k + m,
        "model.expert_d_ff": f,
        "model.moe_layer_interval": 1,
      },
      f"top-{k + m} of {e + m} experts of hidden {f}",
    ),
  ]


ABLATION = Ablation(
  name="hybrid",
  title="Dense-MoE hybrid vs pure MoE at equal active and total parameters (Arctic)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_active"), Constraint("ffn_total"), Constraint("tokens", 0.0)),
  primary=Contrast(
    "hybrid",
    "pure_moe",
    "lower",
    "Snowflake Arctic (2024) builds on a dense FFN plus a residual MoE; DeepSeekMoE (Dai et "
    "al. 2024) finds an always-on shared expert better than routing that capacity.",
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
