r"""Expert granularity at fixed active AND total expert parameters (OLMoE, Muennighoff et
al. 2024, §4.1: 8 experts top-1 vs 32 top-4 vs 64 top-8).

Arm `eE_kK` splits the same expert budget into E = 8g experts of hidden f/g with top-k
= g, for granularity g = 1, 2, 4, 8: active expert hidden per token k · f/g = f and
total E · f/g = 8f stay fixed. Every layer is MoE, SwiGLU experts.

    f = 32 (smoke), 512 (cpu), 8192 (pod: OLMoE-1B-7B's 64 experts of 1024 is g = 8).

    python -m experiments.ablations.granularity --preset=cpu --workdir=workdirs/ablations/granularity
"""

from __future__ import annotations

import sys

from experiments.ablations import presets
from experiments.ablations.runner import Ablation, Arm, Constraint, main

BASE_WIDTH = {"smoke": 32, "cpu": 512, "pod": 8192}  # f: the hidden of one of 8 experts
GRANULARITIES = (1, 2, 4, 8)
CPU_STEPS = 300


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS, cpu_warmup=30)


def arms(preset: str) -> list[Arm]:
  f = BASE_WIDTH[preset]
  return [
    Arm(
      f"e{8 * g}_k{g}",
      {
        "model.num_experts": 8 * g,
        "model.top_k": g,
        "model.expert_d_ff": f // g,
        "model.moe_layer_interval": 1,
      },
      f"granularity {g}: top-{g} of {8 * g} experts of hidden {f // g}",
    )
    for g in GRANULARITIES
  ]


ABLATION = Ablation(
  name="granularity",
  title="Expert granularity at fixed active and total expert parameters (OLMoE)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_active"), Constraint("ffn_total"), Constraint("tokens", 0.0)),
  seeds={"smoke": (0,), "cpu": (0, 1), "pod": (0,)},
  pod_config=presets.POD_CONFIG,
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
