r"""Capacity factor 1.0 / 1.25 / 2.0 / dropless, at top-1 and top-2 (Switch Transformer).

Arm `kK_cfC` routes each token to K of 8 experts with a capacity of C · T·K/E assignments
per expert and routing group (`model.dispatch='auto'`: sort on CPU/GPU, einsum on TPU;
every top-1 choice is placed before any top-2 choice, and assignments past capacity are
dropped); `kK_dropless` has no capacity (`model.dispatch='dropless'`). Evaluation uses
`eval_capacity_factor` 2.0 for the capacity arms, as Switch does. The arms of one k have
the same parameters and shapes, so each takes the learning rate its dropless arm's sweep
chooses (`lr_from`).

    cpu: a smaller model than the other ablations, so that 8 arms x 5 seeds fit the hour:
    4 layers, d_model 64, 2 heads, 8 experts of hidden 128. smoke: configs/tiny.py:smoke's
    8 experts of 32. pod: OLMoE-1B-7B's 64 experts of 1024.

Primary contrast (pre-registered): `k1_cf1.0` − `k1_dropless` on eval bits/byte, expected
higher (Switch Table 1: Switch-Base at capacity factor 1.0 reaches −1.561 neg. log
perplexity, at 1.25 −1.553, at 2.0 −1.554; and 1.0 is the fastest). Secondary: the same
at top-2 and at 1.25 / 2.0, and step time at 1.0 vs dropless. summary.md reports each
arm's quality, dropped fraction (train and eval) and ms per step.

Budget (cpu, 2 cores; per run ≈ 16 s + (steps + 104) x step; step ≈ 0.12 s for this
model (0.10-0.15 s over the arms, measured relative to configs/tiny.py's 0.30 s)):
8 arms x 5 seeds + 2 sweeps x 3 = 46 runs of 400 steps ≈ 46 x 76 s ≈ 58 min. 1.64M tokens
per run, 8.2 (top-1) / 5.5 (top-2) tokens per active parameter.

    python -m experiments.ablations.capacity --preset=cpu --workdir=workdirs/ablations/capacity
"""

from __future__ import annotations

import sys

from experiments.runner import presets
from experiments.runner.cli import main
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast

EXPERT_WIDTH = {"smoke": 32, "cpu": 128, "pod": 1024}
NUM_EXPERTS = {"smoke": 8, "cpu": 8, "pod": 64}
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
TOP_KS = (1, 2)
CPU_STEPS = 400


def base(preset: str):
  config = presets.base_config(preset, cpu_steps=CPU_STEPS)
  m = config.model
  if preset == "cpu":
    m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 64, 2, 2, 256
  m.num_experts, m.expert_d_ff, m.moe_layer_interval = NUM_EXPERTS[preset], EXPERT_WIDTH[preset], 1
  m.eval_capacity_factor = 2.0
  return config


def arms(preset: str) -> list[Arm]:
  out = []
  for k in TOP_KS:
    dropless = f"k{k}_dropless"
    for c in CAPACITY_FACTORS:
      out.append(
        Arm(
          f"k{k}_cf{c}",
          {"model.top_k": k, "model.dispatch": "auto", "model.capacity_factor": c},
          f"top-{k}, capacity factor {c:g}",
          lr_from=dropless,
        )
      )
    out.append(
      Arm(dropless, {"model.top_k": k, "model.dispatch": "dropless"}, f"top-{k}, dropless")
    )
  return out


def _drop(k: int, c: str) -> Contrast:
  return Contrast(
    f"k{k}_cf{c}",
    f"k{k}_dropless",
    "higher",
    f"Switch (Fedus et al. 2021, Table 1): less capacity, more dropped tokens, worse loss "
    f"(top-{k}, capacity factor {c}).",
  )


def _speed(k: int) -> Contrast:
  return Contrast(
    f"k{k}_cf1.0",
    f"k{k}_dropless",
    "lower",
    f"Switch (Table 1): capacity factor 1.0 is the fastest (top-{k}; ms per step here).",
    metric="step_s",
  )


ABLATION = Ablation(
  name="capacity",
  title="Capacity factor vs dropless at top-1 and top-2 (Switch)",
  base=base,
  arms=arms,
  constraints=(
    Constraint("ffn_total"),
    *(
      Constraint("ffn_active", arms=tuple(a.name for a in arms("smoke") if a.name[:2] == f"k{k}"))
      for k in TOP_KS
    ),
    Constraint("tokens", 0.0),
  ),
  primary=_drop(1, "1.0"),
  secondary=(
    _drop(2, "1.0"),
    _drop(1, "1.25"),
    _drop(2, "1.25"),
    _drop(1, "2.0"),
    _drop(2, "2.0"),
    _speed(1),
    _speed(2),
  ),
)

if __name__ == "__main__":
  sys.exit(main(ABLATION))
