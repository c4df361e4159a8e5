r"""Muon vs AdamW on an OLMoE-shaped MoE, and Muon's balancing: the loss or the bias.

Every arm is the same model: top-8 of 64 fine-grained experts (OLMoE's routing shape,
Muennighoff et al. 2024), dropless, with DeepSeek-V3's routing (sigmoid scores, gates
renormalised over the chosen experts) so that both balancing methods apply to it:

* `adamw_aux`: AdamW; the Switch load-balancing loss, 0.01 per MoE layer;
* `muon_aux`: Muon on the hidden matrices and expert stacks (each expert orthogonalised
  separately), AdamW on the rest (`train.optimizer='muon'`); the same loss;
* `muon_bias`: Muon; no balancing loss, DeepSeek-V3's aux-loss-free selection bias moved
  by 0.001 · sign(mean load − load) after each step.

Each arm sweeps the learning rate (Muon's updates are scaled to AdamW's RMS, so the same
grid serves both: Liu et al. 2025, §2.2).

    cpu: configs/tiny.py's width (d_model 128, 4 layers) with 64 experts of hidden 64,
    top-8: the active FFN hidden (512) of tiny's top-2 of 8 experts of 256. 400 steps.

Primary contrast (pre-registered): `muon_aux` − `adamw_aux` on eval bits/byte, expected
lower (Liu et al. 2025, "Muon is Scalable for LLM Training", arXiv:2502.16982: Muon
reaches AdamW's loss with about half the training compute, MoE models included).
Secondary: `muon_bias` − `muon_aux`, expected lower (DeepSeek-V3 §2.1.2 found the
aux-loss-free strategy better under AdamW; Kimi K2 trains with Muon).

    python -m experiments.ablations muon --preset=cpu --workdir=workdirs/ablations/muon
"""

from __future__ import annotations

import sys

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

CPU_STEPS = 400
EXPERTS = {"smoke": (16, 4, 16), "cpu": (64, 8, 64), "pod": (64, 8, 1024)}  # E, k, hidden


def base(preset: str):
  config = presets.base_config(preset, cpu_steps=CPU_STEPS)
  experts, k, hidden = EXPERTS[preset]
  m = config.model
  m.num_experts, m.top_k, m.expert_d_ff = experts, k, hidden
  m.score_fn, m.renormalize, m.dispatch = "sigmoid", True, "dropless"
  return config


def arms(preset: str) -> list[Arm]:
  del preset  # the same arms at every preset; the base sets the model's size
  aux = {"model.lb_loss_weight": 0.01, "model.bias_update_rate": 0.0}
  bias = {"model.lb_loss_weight": 0.0, "model.bias_update_rate": 0.001}
  return [
    Arm("adamw_aux", {"train.optimizer": "adamw", **aux}, "AdamW; balancing loss 0.01"),
    Arm("muon_aux", {"train.optimizer": "muon", **aux}, "Muon; balancing loss 0.01"),
    Arm("muon_bias", {"train.optimizer": "muon", **bias}, "Muon; aux-loss-free bias 0.001"),
  ]


ABLATION = Ablation(
  name="muon",
  title="Muon vs AdamW on a top-8-of-64 MoE, and Muon with bias or loss balancing",
  base=base,
  arms=arms,
  constraints=(
    Constraint("params_total", 0.0),
    Constraint("ffn_active", 0.0),
    Constraint("tokens", 0.0),
  ),
  primary=Contrast(
    "muon_aux",
    "adamw_aux",
    "lower",
    "Liu et al. (2025), Moonlight: Muon needs about half of AdamW's training compute for "
    "the same loss.",
  ),
  secondary=(
    Contrast(
      "muon_bias",
      "muon_aux",
      "lower",
      "DeepSeek-V3 (2024) §2.1.2: aux-loss-free balancing beats the balancing loss (under "
      "AdamW); here under Muon.",
    ),
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
