r"""MoE-layer frequency at fixed total AND active expert/FFN parameters (Snowflake
Arctic's MoE-every-layer vs every-other-layer study).

Arm `every_N` makes every N-th layer MoE (`moe_layer_interval = N`, layers N-1, 2N-1, ...)
and the others dense. The dense FFN has the MoE layer's active hidden (d_ff = k · f), so
every layer costs the same per token; the MoE layers get E_N = N·E - (N-1)·k experts so
that the total FFN hidden over the L layers, L/N · E_N · f + (L - L/N) · k · f = L·E·f,
is the every-layer model's. Fewer MoE layers = more experts per MoE layer.

    E = 8, k = 2: E_1 = 8, E_2 = 14, E_4 = 26.
    f = 32, 4 layers (smoke); f = 256, 4 layers (cpu); pod: E = 64, k = 8, f = 1024 over
    OLMoE's 16 layers (E_N = 64, 120, 232).

    python -m experiments.ablations.frequency --preset=cpu --workdir=workdirs/ablations/frequency
"""

from __future__ import annotations

import sys

from experiments.ablations import presets
from experiments.ablations.runner import Ablation, Arm, Constraint, main

SHAPE = {  # (experts E of the every-layer arm, top-k, expert hidden f, layers)
  "smoke": (8, 2, 32, 4),
  "cpu": (8, 2, 256, 4),
  "pod": (64, 8, 1024, 16),
}
INTERVALS = (1, 2, 4)
CPU_STEPS = 450


def base(preset: str):
  config = presets.base_config(preset, cpu_steps=CPU_STEPS, cpu_warmup=45)
  config.model.num_layers = SHAPE[preset][3]
  return config


def arms(preset: str) -> list[Arm]:
  e, k, f, _ = SHAPE[preset]
  out = []
  for n in INTERVALS:
    experts = n * e - (n - 1) * k
    out.append(
      Arm(
        f"every_{n}",
        {
          "model.moe_layer_interval": n,
          "model.num_experts": experts,
          "model.top_k": k,
          "model.expert_d_ff": f,
          "model.d_ff": k * f,
        },
        f"MoE every {'layer' if n == 1 else f'{n} layers'}: top-{k} of {experts} "
        f"experts of hidden {f}; dense FFN {k * f}",
      )
    )
  return out


ABLATION = Ablation(
  name="frequency",
  title="MoE-layer frequency at fixed total and active FFN parameters (Arctic)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_total"), Constraint("ffn_active"), Constraint("tokens", 0.0)),
  seeds={"smoke": (0,), "cpu": (0, 1), "pod": (0,)},
  pod_config=presets.POD_CONFIG,
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
