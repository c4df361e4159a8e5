r"""Top-k at fixed active AND total expert parameters (Snowflake Arctic's top-1 vs top-2
study, extended to top-3 and top-4).

Arm `eE_kK` routes each token to K of E = 8K experts of hidden 2f/K: halving the expert
and doubling the experts keeps both the active (K · 2f/K = 2f per token and MoE layer)
and the total (8K · 2f/K = 16f) expert hidden units fixed, so only the routing
granularity of the same budget changes. Every layer is MoE, SwiGLU experts.

    f = 12 (smoke), 192 (cpu), 3072 (pod): expert hidden 2f, f, 2f/3, f/2.

    python -m experiments.ablations.top_k --preset=cpu --workdir=workdirs/ablations/top_k
    python -m experiments.ablations.top_k --preset=pod --workdir=gs://BUCKET/ablations/top_k
"""

from __future__ import annotations

import sys

from experiments.ablations import presets
from experiments.ablations.runner import Ablation, Arm, Constraint, main

BASE_WIDTH = {"smoke": 12, "cpu": 192, "pod": 3072}  # f; divisible by 6
TOP_KS = (1, 2, 3, 4)
CPU_STEPS = 400


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS, cpu_warmup=40)


def arms(preset: str) -> list[Arm]:
  f = BASE_WIDTH[preset]
  return [
    Arm(
      f"e{8 * k}_k{k}",
      {
        "model.num_experts": 8 * k,
        "model.top_k": k,
        "model.expert_d_ff": 2 * f // k,
        "model.moe_layer_interval": 1,
      },
      f"top-{k} of {8 * k} experts of hidden {2 * f // k}",
    )
    for k in TOP_KS
  ]


ABLATION = Ablation(
  name="top_k",
  title="Top-k at fixed active and total expert parameters (Arctic)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_active"), Constraint("ffn_total"), Constraint("tokens", 0.0)),
  seeds={"smoke": (0,), "cpu": (0, 1), "pod": (0,)},
  pod_config=presets.POD_CONFIG,
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
