r"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055) vs training the dense model
on vs an MoE from scratch.

Komatsuzaki et al. find that an MoE initialised from a dense checkpoint (every expert a
copy of the dense FFN, a fresh router) beats continuing to train the dense model with the
same extra compute, and beats an MoE trained from scratch, at moderate extra compute
(their Figures 1-3).

Design. A dense model (`configs/dense.py`: 4 layers, d_model 128, SwiGLU FFN of 512) is
pretrained for P = 600 steps on the training plays (`WORKDIR/dense`). `moejax.upcycle`
turns it into an MoE of 8 experts of hidden 512, top-2 with renormalised gates (so at
step 0 it computes the dense model's function exactly: tested in
`tests/test_upcycle.py`), written to `WORKDIR/dense_upcycled`. The arms then spend the same
extra training compute C = M dense steps (M = 300), counted with `moejax.models.flops` (an MoE
step costs 1.65× a dense step here: two experts of 512 plus the router):

* `dense_continued`: the dense model, M more steps (`train.init_from=WORKDIR/dense`);
* `upcycled`: the upcycled MoE, C / (its step FLOPs) steps (`train.init_from=WORKDIR/dense_upcycled`);
* `moe_scratch`: the same MoE from random weights, given the dense model's pretraining
  compute too: (P + M) dense steps' worth, so that it has spent as much compute in all.

Constraint: training FLOPs of `dense_continued` and `upcycled` equal within ±2%.
Primary contrast (pre-registered): `upcycled` − `dense_continued` on eval bits/byte,
expected lower. Secondary: `upcycled` − `moe_scratch`, expected lower.

Budget (cpu, 2 cores): dense pretraining ≈ 16 s + 704 × 0.25 s ≈ 3 min; runs of 300
(dense), 180 (upcycled) and 545 (scratch) steps ≈ 1.8, 1.7, 3.7 min; 3 arms × (3 sweep + 3
seeds) = 18 runs ≈ 43 min; ≈ 46 min in all.

    python -m experiments.upcycle --preset=cpu --workdir=workdirs/upcycle
"""

from __future__ import annotations

import os

from experiments.runner import presets
from experiments.runner.prerequisites import prerequisite_path
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast
from moejax.config import apply_overrides, load_config
from moejax.models.flops import flops_per_token

PRETRAIN_STEPS = {"smoke": 4, "cpu": 600, "pod": 100_000}
# smoke: 7 dense steps' FLOPs are 5 MoE steps within 1% (an MoE step costs 1.39x there).
EXTRA_STEPS = {"smoke": 7, "cpu": 300, "pod": 50_000}
EXPERTS, TOP_K = 8, 2


def dense_config(preset: str):
  """The dense model: configs/dense.py at the preset's shape, trained like the ablations."""
  base = presets.base_config(preset, cpu_steps=PRETRAIN_STEPS["cpu"])
  dense = load_config("configs/dense.py" + {"smoke": ":smoke", "pod": ":pod"}.get(preset, ""))
  model = dense.model.to_dict()
  apply_overrides(base, {f"model.{key}": value for key, value in model.items()})
  return base


def moe_config(preset: str):
  """The upcycled MoE (and its from-scratch twin) at the preset's shape."""
  return apply_overrides(dense_config(preset), moe_model_overrides(preset))


def moe_model_overrides(preset: str) -> dict:
  """The upcycled MoE's model keys: EXPERTS copies of the dense FFN, top-2 renormalised."""
  d_ff = load_config(
    "configs/dense.py" + {"smoke": ":smoke", "pod": ":pod"}.get(preset, "")
  ).model.d_ff
  return {
    "model.num_experts": EXPERTS,
    "model.top_k": TOP_K,
    "model.expert_d_ff": d_ff,
    "model.renormalize": True,
    "model.dispatch": "dropless",
  }


def _steps(preset: str, steps: int) -> dict:
  """The train keys of a run of `steps` (evals and checkpoints at 40%, 80%, 100%)."""
  if preset == "smoke":
    return {"train.num_steps": max(2, round(steps))}
  steps = max(5, 5 * round(steps / 5))
  return {
    "train.num_steps": steps,
    "train.warmup_steps": steps // 10,
    "train.eval_every": steps * 2 // 5,
    "train.checkpoint_every": steps * 2 // 5,
  }


def arms_of(preset: str, dense_dir: str, upcycled_dir: str) -> list[Arm]:
  dense, moe = dense_config(preset), moe_config(preset)
  seq = dense.train.seq_len
  ratio = flops_per_token(moe.model, seq)["active"] / flops_per_token(dense.model, seq)["active"]
  p, m = PRETRAIN_STEPS[preset], EXTRA_STEPS[preset]
  moe_keys = moe_model_overrides(preset)
  return [
    Arm(
      "dense_continued",
      {"train.init_from": dense_dir, **_steps(preset, m)},
      f"the dense model, {m} more steps",
    ),
    Arm(
      "upcycled",
      {"train.init_from": upcycled_dir, **moe_keys, **_steps(preset, m / ratio)},
      f"upcycled to {EXPERTS} experts, top-{TOP_K}: the same extra FLOPs",
    ),
    Arm(
      "moe_scratch",
      {**moe_keys, **_steps(preset, (p + m) / ratio)},
      "the same MoE from scratch: the pretraining's FLOPs plus the extra",
    ),
  ]


def prepare(workdir: str, preset: str, train) -> None:
  """Pretrains the dense model (WORKDIR/dense) and upcycles it (WORKDIR/dense_upcycled)."""
  from moejax.upcycle import upcycle

  dense_dir = train("dense", dense_config(preset))
  upcycled_dir = prerequisite_path(workdir, "dense_upcycled")
  if not os.path.isdir(os.path.join(upcycled_dir, "checkpoints")):
    upcycle(dense_dir, upcycled_dir, moe_config(preset))


def build(workdir: str | None, preset: str) -> Ablation:
  """The upcycling ablation, its arms starting from WORKDIR/dense and WORKDIR/dense_upcycled."""
  dense_dir = prerequisite_path(workdir, "dense")
  upcycled_dir = prerequisite_path(workdir, "dense_upcycled")
  return Ablation(
    name="upcycle",
    title="Sparse upcycling vs continued dense training vs an MoE from scratch (Komatsuzaki et al.)",
    base=dense_config,
    arms=lambda p: arms_of(p, dense_dir, upcycled_dir),
    constraints=(Constraint("train_flops", arms=("dense_continued", "upcycled")),),
    seeds={"smoke": (0, 1), "cpu": (0, 1, 2), "pod": (0,)},
    primary=Contrast(
      "upcycled",
      "dense_continued",
      "lower",
      "Komatsuzaki et al. 2022: upcycling a dense checkpoint beats training it on with the "
      "same extra compute.",
    ),
    secondary=(
      Contrast(
        "upcycled",
        "moe_scratch",
        "lower",
        "Komatsuzaki et al. 2022: and beats an MoE trained from scratch with as much compute in all.",
      ),
    ),
    pod_config="configs/dense.py:pod",
  )
