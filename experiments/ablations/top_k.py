r"""Top-k at fixed active AND total expert parameters (Snowflake Arctic's top-1 vs top-2).

Arm `eE_kK` routes each token to K of E = 8K experts of hidden 2f/K in every layer:
halving the experts' width and doubling their number keeps both the active (K · 2f/K =
2f per token and layer) and the total (8K · 2f/K = 16f) expert hidden units, so only the
routing granularity of the same budget changes. Dropless, so no arm loses assignments to
a capacity limit (at capacity factor 1.25 the earlier protocol dropped 2-8%, more at
larger k).

    f = 12 (smoke), 192 (cpu), 3072 (pod): experts of hidden 384 / 192 at cpu.

Primary contrast (pre-registered): `e16_k2` − `e8_k1` on eval bits/byte, expected lower.
Only the two arms of Arctic's claim run (top-3 and top-4 were weaker, costlier arms).

Budget (cpu, 2 cores; per run ≈ 16 s start + (steps + 104) x step, the 104 being 3
evaluations of the 108-batch split at ≈ 0.32 step each; step ≈ 0.30 s for configs/tiny.py
dropless, 0.29 s for e8_k1 and 0.33 s for e16_k2 measured relative to it):
2 arms x (3 sweep + 5 seeds) = 16 runs of 500 steps ≈ 8 x 191 s + 8 x 217 s ≈ 54 min.
2.05M tokens per run, 2.2 tokens per active parameter.

    python -m experiments.ablations.top_k --preset=cpu --workdir=workdirs/ablations/top_k
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

BASE_WIDTH = {"smoke": 12, "cpu": 192, "pod": 3072}  # f
TOP_KS = (1, 2)
CPU_STEPS = 500


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS)


def split_budget_arms(hidden: int, factors: Sequence[int], note: str) -> list[Arm]:
  """Arms `e{8g}_k{g}`, one per factor g: the budget of 8 experts of hidden `hidden`, split
  into 8g experts of hidden `hidden / g` with top-g routing in every layer, so that the
  active (g · hidden/g per token) and the total (8g · hidden/g) expert hidden units stay
  fixed. `note` is formatted with `g`, `experts` and `width`. This ablation and
  `granularity` are this one design at two widths."""
  return [
    Arm(
      f"e{8 * g}_k{g}",
      {
        "model.num_experts": 8 * g,
        "model.top_k": g,
        "model.expert_d_ff": hidden // g,
        "model.moe_layer_interval": 1,
      },
      note.format(g=g, experts=8 * g, width=hidden // g),
    )
    for g in factors
  ]


def arms(preset: str) -> list[Arm]:
  return split_budget_arms(
    2 * BASE_WIDTH[preset], TOP_KS, "top-{g} of {experts} experts of hidden {width}"
  )


ABLATION = Ablation(
  name="top_k",
  title="Top-k at fixed active and total expert parameters (Arctic)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_active"), Constraint("ffn_total"), Constraint("tokens", 0.0)),
  primary=Contrast(
    "e16_k2",
    "e8_k1",
    "lower",
    "Snowflake Arctic (2024): top-2 of 2x as many half-width experts beats top-1 at equal "
    "active and total expert parameters.",
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
