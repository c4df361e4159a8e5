r"""Dense vs MoE at equal training compute (Switch, GShard).

* `moe`: top-k of E experts of hidden f in every layer (cpu: configs/tiny.py's 8 experts
  of 256, top-2, dropless; pod: OLMoE-1B-7B).
* `dense_eq_flops`: the same Transformer with a dense SwiGLU FFN of hidden k·f: the MoE's
  active FFN, so equal forward FLOPs per token (the router's d_model·E matmul per layer is
  the only difference) and, at equal steps x batch x seq_len, equal training compute
  (`configs/dense.py` at cpu is this model).

Primary contrast (pre-registered): `moe` − `dense_eq_flops` on eval bits/byte, expected
lower. This is Switch's claim (an MoE beats the dense model of equal FLOPs); Arctic's, a
lower-compute MoE beating a larger dense model, is not tested here. The earlier
`dense_eq_params` arm (the MoE's total parameters at 2.9x its FLOPs, one seed) is gone: it
cannot be paired, and cost a fifth of the budget.

    f = 32, E = 8, k = 2 (smoke, 2 layers); f = 256, E = 8, k = 2 (cpu);
    pod: f = 1024, E = 64, k = 8 (OLMoE-1B-7B vs a dense 1B-active model).

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x step; step ≈ 0.30 s for `moe`
(configs/tiny.py dropless) and ≈ 0.27 s for `dense_eq_flops`): 2 arms x (3 sweep + 5 seeds)
= 16 runs of 550 steps ≈ 8 x 212 s + 8 x 193 s ≈ 54 min. 2.25M tokens per run, 2.0 tokens
per active parameter.

    python -m experiments.ablations.dense_vs_moe --preset=cpu --workdir=workdirs/ablations/dense_vs_moe
"""

from __future__ import annotations

import sys

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

SHAPE = {"smoke": (8, 2, 32), "cpu": (8, 2, 256), "pod": (64, 8, 1024)}  # (E, k, f)
CPU_STEPS = 550


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS)


def arms(preset: str) -> list[Arm]:
  e, k, f = SHAPE[preset]
  return [
    Arm(
      "moe",
      {
        "model.num_experts": e,
        "model.top_k": k,
        "model.expert_d_ff": f,
        "model.moe_layer_interval": 1,
      },
      f"MoE: top-{k} of {e} experts of hidden {f} in every layer",
    ),
    Arm(
      "dense_eq_flops",
      {"model.num_experts": 0, "model.d_ff": k * f},
      f"dense FFN of hidden {k * f}: the MoE's active FLOPs",
    ),
  ]


ABLATION = Ablation(
  name="dense_vs_moe",
  title="Dense vs MoE at equal training compute (Switch)",
  base=base,
  arms=arms,
  constraints=(Constraint("train_flops"), Constraint("tokens", 0.0)),
  primary=Contrast(
    "moe",
    "dense_eq_flops",
    "lower",
    "Switch Transformer (Fedus et al. 2021), GShard (Lepikhin et al. 2020): an MoE beats "
    "the dense model of equal FLOPs per token at equal training steps.",
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
