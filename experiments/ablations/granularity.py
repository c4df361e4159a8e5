r"""Expert granularity at fixed active AND total expert parameters (OLMoE, Muennighoff et
al. 2024, §4.1: 8 experts top-1 vs 32 top-4 vs 64 top-8).

Arm `eE_kK` splits the same expert budget into E = 8g experts of hidden f/g with top-k
= g, in every layer: active expert hidden per token k · f/g = f and total E · f/g = 8f
stay fixed. Dropless, as OLMoE trains (at capacity factor 1.25 the earlier protocol
dropped 3.4% of the assignments at g = 1 and 13.9% at g = 8, which biased the test
against the finer arms).

    f = 32 (smoke), 512 (cpu), 8192 (pod: OLMoE-1B-7B's 64 experts of 1024 is g = 8).

Primary contrast (pre-registered): `e32_k4` − `e8_k1` on eval bits/byte, expected lower
(OLMoE's large step, 8 -> 32 experts). The 64-expert arm, whose further gain OLMoE finds
small, is left out: it is the slowest arm on CPU and the weaker test.

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x step; step ≈ 0.31 s for e8_k1 and
≈ 0.35 s for e32_k4, measured relative to configs/tiny.py's 0.30 s): 2 arms x (3 sweep +
5 seeds) = 16 runs of 500 steps ≈ 8 x 203 s + 8 x 227 s ≈ 57 min. 2.05M tokens per run,
1.8 tokens per active parameter.

    python -m experiments.ablations.granularity --preset=cpu --workdir=workdirs/ablations/granularity
"""

from __future__ import annotations

import sys

from experiments.ablations.top_k import split_budget_arms
from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

BASE_WIDTH = {"smoke": 32, "cpu": 512, "pod": 8192}  # f: the hidden of one of 8 experts
GRANULARITIES = (1, 4)
CPU_STEPS = 500


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS)


def arms(preset: str) -> list[Arm]:
  note = "granularity {g}: top-{g} of {experts} experts of hidden {width}"
  return split_budget_arms(BASE_WIDTH[preset], GRANULARITIES, note)


ABLATION = Ablation(
  name="granularity",
  title="Expert granularity at fixed active and total expert parameters (OLMoE)",
  base=base,
  arms=arms,
  constraints=(Constraint("ffn_active"), Constraint("ffn_total"), Constraint("tokens", 0.0)),
  primary=Contrast(
    "e32_k4",
    "e8_k1",
    "lower",
    "OLMoE (Muennighoff et al. 2024, §4.1): 32 experts of a quarter the width, top-4, "
    "beat 8 experts top-1 at equal active and total parameters.",
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
