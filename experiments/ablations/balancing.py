r"""Auxiliary-loss balancing vs aux-loss-free bias balancing (Wang et al. 2024; DeepSeek-V3).

Every arm routes as DeepSeek-V3 does (sigmoid scores, top-k, gates normalised over the
chosen experts), dropless, and differs only in how it balances the load:

* `aux_loss`: the Switch load-balancing loss, weight 0.01 per MoE layer (no bias);
* `bias`: no balancing loss; a per-expert bias on the scores, for selection only, moved
  after every step by `bias_update_rate` · sign(mean load − load) (DeepSeek-V3's γ = 0.001);
* `bias_seq`: the bias and DeepSeek-V3's small sequence-wise loss, α = 0.0001 per layer.

The balance each reaches is reported as `expert_load_imbalance` (max expert share × E:
1.0 is uniform; DeepSeek-V3's MaxVio + 1) over the last 10% of steps and over the whole
run (`expert_load_imbalance_all`). Being dropless, no arm drops an assignment
(`train_dropped_fraction` is 0 by construction); imbalance is what a capacity-bound or
expert-parallel system would pay for.

    cpu: configs/tiny.py (E = 8, top-2, experts of hidden 256), 400 steps.

Primary contrast (pre-registered): `bias` − `aux_loss` on eval bits/byte, expected lower
(DeepSeek-V3, §2.1.2 and Table 5: aux-loss-free balancing gives better quality at
comparable balance).

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x 0.30 s): 3 arms x (3 sweep + 5
seeds) = 24 runs of 400 steps ≈ 24 x 167 s ≈ 67 min. 1.6M tokens per run.

    python -m experiments.ablations.balancing --preset=cpu --workdir=workdirs/ablations/balancing
"""

from __future__ import annotations

import sys

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

CPU_STEPS = 400
DEEPSEEK_ROUTING = {"model.score_fn": "sigmoid", "model.renormalize": True}


def base(preset: str):
  return presets.base_config(preset, cpu_steps=CPU_STEPS)


def arms(preset: str) -> list[Arm]:
  del preset  # the same arms at every preset; the base sets the model's size
  return [
    Arm(
      "aux_loss",
      {**DEEPSEEK_ROUTING, "model.lb_loss_weight": 0.01, "model.bias_update_rate": 0.0},
      "load-balancing loss 0.01 per MoE layer",
    ),
    Arm(
      "bias",
      {**DEEPSEEK_ROUTING, "model.lb_loss_weight": 0.0, "model.bias_update_rate": 0.001},
      "aux-loss-free: selection bias, update rate 0.001",
    ),
    Arm(
      "bias_seq",
      {
        **DEEPSEEK_ROUTING,
        "model.lb_loss_weight": 0.0,
        "model.bias_update_rate": 0.001,
        "model.seq_aux_loss_weight": 0.0001,
      },
      "selection bias and the sequence-wise loss 0.0001",
    ),
  ]


ABLATION = Ablation(
  name="balancing",
  title="Aux-loss balancing vs aux-loss-free bias balancing (DeepSeek-V3)",
  base=base,
  arms=arms,
  constraints=(
    Constraint("params_total", 0.0),
    Constraint("ffn_active", 0.0),
    Constraint("tokens", 0.0),
  ),
  primary=Contrast(
    "bias",
    "aux_loss",
    "lower",
    "DeepSeek-V3 (2024), §2.1.2: the auxiliary-loss-free strategy achieves better model "
    "performance than relying purely on auxiliary losses (Wang et al. 2024).",
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
