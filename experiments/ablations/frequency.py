r"""MoE-layer frequency at fixed total AND active FFN parameters, in Arctic's setting:
top-1 routing, equal total parameters.

Arm `top1_every_N` makes every N-th layer MoE (`moe_layer_interval = N`, layers N-1,
2N-1, ...) and the others dense, with top-1 routing to experts of hidden f. The dense
FFN has the MoE layer's active hidden (d_ff = f), so every layer costs the same per
token, and the MoE layers get more experts (E_N) so that the total FFN hidden,
L/N · E_N · f + (L − L/N) · f, is the every-layer model's L · E · f: E_2 = 2E − 1.

    cpu and smoke: E = 8, E_2 = 15, f = 256 (smoke 32), 4 layers.
    pod: E = 64 over OLMoE's 16 layers, f = 1024; E_2 = 128 (not 127, so that the experts
    split over an expert axis of 8; +0.8% total FFN parameters, inside the ±2%).

Primary contrast (pre-registered): `top1_every_1` − `top1_every_2` on eval bits/byte,
expected lower (Arctic). Auxiliary losses: the library weights the balancing loss per MoE
layer (total = CE + α · Σ over MoE layers), so the arm with half the MoE layers is not
given twice the per-layer weight, as a mean over layers would.

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x step; step ≈ 0.22 s for
`top1_every_1` and 0.21 s for `top1_every_2`, measured relative to configs/tiny.py's
0.30 s): 2 arms x (3 sweep + 5 seeds) = 16 runs of 600 steps
≈ 8 x 171 s + 8 x 164 s ≈ 45 min. 2.46M tokens per run, 3.5 tokens per active parameter.

    python -m experiments.ablations.frequency --preset=cpu --workdir=workdirs/ablations/frequency
"""

from __future__ import annotations

import sys

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

SHAPE = {  # (layers, expert hidden f, {interval N: experts per MoE layer})
  "smoke": (4, 32, {1: 8, 2: 15}),
  "cpu": (4, 256, {1: 8, 2: 15}),
  "pod": (16, 1024, {1: 64, 2: 128}),
}
CPU_STEPS = 600


def base(preset: str):
  config = presets.base_config(preset, cpu_steps=CPU_STEPS)
  config.model.num_layers = SHAPE[preset][0]
  return config


def arms(preset: str) -> list[Arm]:
  _, f, experts = SHAPE[preset]
  return [
    Arm(
      f"top1_every_{n}",
      {
        "model.moe_layer_interval": n,
        "model.num_experts": e,
        "model.top_k": 1,
        "model.expert_d_ff": f,
        "model.d_ff": f,
      },
      f"MoE every {'layer' if n == 1 else f'{n} layers'}: top-1 of {e} experts of hidden "
      f"{f}; dense FFN {f}",
    )
    for n, e in experts.items()
  ]


ABLATION = Ablation(
  name="frequency",
  title="MoE-layer frequency at fixed total and active FFN parameters, top-1 (Arctic)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_total"), Constraint("ffn_active"), Constraint("tokens", 0.0)),
  primary=Contrast(
    "top1_every_1",
    "top1_every_2",
    "lower",
    "Snowflake Arctic (2024): MoE in every layer beats MoE in every other layer at equal "
    "total parameters (top-1).",
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
