r"""Dense vs MoE at equal training compute, and the dense model at equal total parameters.

* `moe`: top-k of E experts of hidden f in every layer (`configs/tiny.py` at cpu:
  8 experts of 256, top-2; OLMoE-1B-7B at pod).
* `dense_eq_flops`: the same Transformer with a dense SwiGLU FFN of hidden k·f in every
  layer: the MoE's active FFN, so equal forward FLOPs per token (the router's d_model·E
  matmul per layer is the only difference) and, with the same steps x batch x seq_len,
  equal training compute (`configs/dense.py` at cpu is this model).
* `dense_eq_params`: dense FFN of hidden E·f: as many FFN parameters as the MoE in total,
  at E/k times its FLOPs per token (the upper bound the MoE approximates). Optional and
  costly (4x the FLOPs at cpu): it runs the first seed only (`max_seeds=1`).

    f = 32, E = 8, k = 2 (smoke, 2 layers); f = 256, E = 8, k = 2 (cpu);
    pod: f = 1024, E = 64, k = 8 (OLMoE-1B-7B vs dense 1B-active and 7B-total models).

    python -m experiments.ablations.dense_vs_moe --preset=cpu --workdir=workdirs/ablations/dense_vs_moe
"""

from __future__ import annotations

import sys

from experiments.ablations import presets
from experiments.ablations.runner import Ablation, Arm, Constraint, main

SHAPE = {"smoke": (8, 2, 32), "cpu": (8, 2, 256), "pod": (64, 8, 1024)}  # (E, k, f)
CPU_STEPS = 330


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS, cpu_warmup=33)


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
    Arm(
      "dense_eq_params",
      {"model.num_experts": 0, "model.d_ff": e * f},
      f"dense FFN of hidden {e * f}: the MoE's total FFN parameters (first seed only)",
      max_seeds=1,
    ),
  ]


ABLATION = Ablation(
  name="dense_vs_moe",
  title="Dense vs MoE at equal training compute",
  base=base,
  arms=arms,
  constraints=(
    Constraint("train_flops", arms=("moe", "dense_eq_flops")),
    Constraint("ffn_total", arms=("moe", "dense_eq_params")),
    Constraint("tokens", 0.0),
  ),
  seeds={"smoke": (0,), "cpu": (0, 1), "pod": (0,)},
  pod_config=presets.POD_CONFIG,
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
