r"""Fine-tuning a pretrained MoE: which parameters to train, and how much expert dropout.

The HF notes on MoE fine-tuning (after ST-MoE, Zoph et al. 2022, §4.3, and Switch, Fedus
et al. 2022, §2.4): freezing only the MoE layers works well (and saves optimizer memory);
updating only the MoE layers hurts; sparse models overfit more and want more dropout
inside the experts than in the dense layers.

Design. A `cpu`-preset MoE (`configs/tiny.py`: 8 experts, top-2, dropless) is pretrained
on the 38 training plays (`WORKDIR/pretrain`, 600 steps). It is then fine-tuned on two of
the four held-out plays (`data.train_split='validation[:50%]'`: Macbeth and Richard II)
and evaluated on the other two (`validation[50%:]`: The Tempest and Twelfth Night, all
their windows), for 200 steps of 32 × 128 bytes: about 4 epochs of its 2 plays, long
enough to overfit. Every arm starts from the same checkpoint (`train.init_from`), with
dropout 0.1 on the dense layers (`model.dropout`):

* `full`: every parameter trains;
* `freeze_moe`: everything but the MoE layers (routers and experts frozen: `all_but_moe`);
* `only_moe`: only the MoE layers (`only_moe`);
* `full_expert_dropout`: every parameter, plus dropout 0.4 inside the experts (Switch's
  fine-tuning setting, §2.4: 0.1 elsewhere, 0.4 in the experts).

Primary contrast (pre-registered): `only_moe` − `full` on held-out eval bits/byte,
expected higher (updating only the MoE layers hurts). Secondary: `freeze_moe` − `full`
(the notes' "works well": no effect larger than the CI's bound supports it),
`full_expert_dropout` − `full` (expected lower). summary.md also reports each arm's
optimizer-state bytes.

Learning rates. Each arm's rate is the one of its sweep (1e-4, 3e-4, 1e-3 at seed 1000)
with the lowest held-out eval bits/byte (`lr_metric`), not the ablations' lowest train
CE: after several epochs of two plays the train CE rewards memorising them (a first cpu
run chose that way took 3e-3, the grid's top, for every arm, where every arm's held-out
bits/byte was its worst). The choice sees the evaluation plays at the sweep seed; the
contrasts are computed on other seeds, and every arm gets the same choice.

Budget (cpu, 2 cores): pretraining ≈ 16 s + 704 × 0.30 s ≈ 3.8 min; a fine-tune run took
120-210 s measured (its evaluations of every held-out window included); 4 arms × (3 sweep
+ 3 seeds) = 24 runs ≈ 65 min; ≈ 70 min in all.

    python -m experiments.finetune --preset=cpu --workdir=workdirs/finetune
"""

from __future__ import annotations

from experiments.ablations import presets
from experiments.ablations.prerequisites import prerequisite_path
from experiments.ablations.spec import Ablation, Arm, Constraint, Contrast, arm_config, get_arms

PRETRAIN_STEPS = 600
FINETUNE_STEPS = 200
TRAIN_PLAYS, HELD_OUT_PLAYS = "validation[:50%]", "validation[50%:]"


def pretrain_config(preset: str):
  """The MoE fine-tuned from: the preset's base config on the training plays."""
  return presets.base_config(preset, cpu_steps=PRETRAIN_STEPS)


def finetune_base(preset: str, pretrained: str):
  config = presets.base_config(preset, cpu_steps=FINETUNE_STEPS)
  config.train.init_from = pretrained
  config.data.train_split, config.data.eval_split = TRAIN_PLAYS, HELD_OUT_PLAYS
  config.model.dropout = 0.1
  return config


def arms(preset: str) -> list[Arm]:
  del preset
  return [
    Arm("full", {"train.trainable": "all"}, "every parameter trains"),
    Arm(
      "freeze_moe", {"train.trainable": "all_but_moe"}, "the MoE layers (routers, experts) frozen"
    ),
    Arm("only_moe", {"train.trainable": "only_moe"}, "only the MoE layers train"),
    Arm(
      "full_expert_dropout",
      {"train.trainable": "all", "model.expert_dropout": 0.4},
      "every parameter, dropout 0.4 inside the experts",
    ),
  ]


def optimizer_memory(ablation: Ablation, preset: str, rows) -> list[str]:
  """summary.md's table of each arm's trained parameters and optimizer-state bytes,
  counted on the abstract (model, optimizer) state `moejax.steps.build` makes."""
  import jax
  from flax import nnx

  from moejax.steps import build as build_state, optimizer_state_bytes
  from moejax.trainable import trainable_filter

  del rows
  lines = [
    "## Optimizer state per arm",
    "",
    "Frozen parameters get no optimizer state (AdamW: two moments per trained parameter).",
    "",
    "| arm | trainable | parameters trained | optimizer state |",
    "|---|---|---|---|",
  ]
  for arm in get_arms(ablation, preset):
    config = arm_config(ablation, preset, arm)
    pair = nnx.eval_shape(lambda: build_state(config)[:2])
    state = nnx.state(pair)
    trained = nnx.state(pair[0], trainable_filter(config.train, pair[0]))
    count = sum(x.size for x in jax.tree.leaves(trained))
    lines.append(
      f"| `{arm.name}` | `{config.train.trainable}` | {count:,} | "
      f"{optimizer_state_bytes(state) / 2**20:.2f} MiB |"
    )
  return lines


def prepare(workdir: str, preset: str, train) -> None:
  """Pretrains the MoE the arms fine-tune, in WORKDIR/pretrain."""
  train("pretrain", pretrain_config(preset))


def build(workdir: str | None, preset: str) -> Ablation:
  """The fine-tuning ablation, its arms starting from WORKDIR/pretrain."""
  pretrained = prerequisite_path(workdir, "pretrain")
  return Ablation(
    name="finetune",
    title="Fine-tuning a pretrained MoE: what to train, and expert dropout (ST-MoE, Switch)",
    base=lambda p: finetune_base(p, pretrained),
    arms=arms,
    constraints=(Constraint("tokens", 0.0),),
    seeds={"smoke": (0, 1), "cpu": (0, 1, 2), "pod": (0,)},
    primary=Contrast(
      "only_moe",
      "full",
      "higher",
      "HF notes on MoE fine-tuning (after ST-MoE, Zoph et al. 2022): updating only the MoE "
      "layers hurts quality.",
    ),
    secondary=(
      Contrast(
        "freeze_moe",
        "full",
        "lower",
        "freezing only the MoE layers works well (no worse than full fine-tuning)",
      ),
      Contrast(
        "full_expert_dropout",
        "full",
        "lower",
        "sparse models want more dropout inside the experts (Switch §2.4: 0.4 vs 0.1)",
      ),
    ),
    learning_rates={"smoke": (1e-3,), "cpu": (1e-4, 3e-4, 1e-3), "pod": (1e-5, 3e-5, 1e-4)},
    lr_metric="final_eval_bits_per_byte",
    pod_config=presets.POD_CONFIG,
    extra_report=optimizer_memory,
  )
