r"""Fine-tuning a pretrained MoE: which parameters to train, and how much expert dropout.

The HF notes on MoE fine-tuning (after ST-MoE, Zoph et al. 2022, §4.3, and Switch, Fedus
et al. 2022, §2.4): freezing only the MoE layers works well (and saves optimizer memory);
updating only the MoE layers hurts; sparse models overfit more and want more dropout
inside the experts than in the dense layers.

Design. A `cpu`-preset MoE (`configs/tiny.py`: 8 experts, top-2, dropless) is pretrained
on the 33 training plays alone (`data.train_split='plays'`, 600 steps), so that the
sonnet and rhyme-royal stanzas of the poems are mostly new to it (the plays are mostly
blank verse and prose). It is then fine-tuned on the sonnets and the three short poems
(`sonnets_and_short_poems`, 120,717 bytes) for 100 steps of 32 × 128 bytes (about 3.4
epochs of them), and evaluated on The Rape of Lucrece (`lucrece`, 86,173 bytes), a long
poem none of its training saw: all its full batches (20, 640 of its 668 windows). (A
first design fine-tuned on two held-out plays and evaluated on the other two; no arm
beat the pretrained model, because two more plays taught it nothing the training plays
had not, so it measured how little each arm overfits.) Every arm starts
from the same checkpoint (`train.init_from`), with dropout 0.1 on the dense layers
(`model.dropout`):

* `full`: every parameter trains;
* `freeze_moe`: everything but the MoE layers (routers and experts frozen: `all_but_moe`);
* `only_moe`: only the MoE layers (`only_moe`);
* `full_expert_dropout`: every parameter, plus dropout 0.4 inside the experts (Switch's
  fine-tuning setting, §2.4: 0.1 elsewhere, 0.4 in the experts).

Primary contrast (pre-registered): `only_moe` − `full` on held-out eval bits/byte,
expected higher (updating only the MoE layers hurts). Secondary: `freeze_moe` − `full`
(the notes' "works well": no effect larger than the CI's bound supports it),
`full_expert_dropout` − `full` (expected lower). The pretrained model itself is
evaluated on the same windows (`WORKDIR/pretrained_on_held_out.json`), and summary.md
gives each arm's gain over it, with its 95% CI over seeds, beside each arm's
optimizer-state bytes.

Learning rates. Each arm's rate is the one of its sweep (1e-4, 3e-4, 1e-3 at seed 1000)
with the lowest held-out eval bits/byte (`lr_metric`), not the ablations' lowest train
CE: after several epochs of a small set the train CE rewards memorising it. The choice
sees the evaluation poem at the sweep seed; the contrasts are computed on other seeds,
and every arm gets the same choice.

Budget (cpu, 2 cores): pretraining ≈ 16 s + 704 × 0.30 s ≈ 3.8 min; a fine-tune run of
100 steps ≈ 40 s of steps plus 3 evaluations of 20 batches and a compile; 4 arms × (3
sweep + 3 seeds) = 24 runs. Measured, on cores shared with other work: about 4.7 min of
pretraining, then 24 runs in 23.4 min (58 s each).

    python -m experiments.finetune --preset=cpu --workdir=workdirs/finetune
"""

from __future__ import annotations

import json
import math
import os

from experiments.runner import presets, stats
from experiments.runner.prerequisites import prerequisite_path
from experiments.runner.report import format_p
from experiments.runner.spec import Ablation, Arm, Constraint, Contrast, arm_config, get_arms

PRETRAIN_STEPS = 600
FINETUNE_STEPS = 100
PRETRAIN_SPLIT = "plays"  # `shakespeare_plays` splits (moejax/data/shakespeare.py)
FINETUNE_SPLIT, HELD_OUT_SPLIT = "sonnets_and_short_poems", "lucrece"
REFERENCE_FILE = "pretrained_on_held_out.json"


def pretrain_config(preset: str):
  """The MoE fine-tuned from: the preset's base config on the training plays alone."""
  config = presets.base_config(preset, cpu_steps=PRETRAIN_STEPS)
  config.data.train_split = PRETRAIN_SPLIT
  return config


def finetune_base(preset: str, pretrained: str):
  config = presets.base_config(preset, cpu_steps=FINETUNE_STEPS)
  config.train.init_from = pretrained
  config.data.train_split, config.data.eval_split = FINETUNE_SPLIT, HELD_OUT_SPLIT
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
  counted on the abstract (model, optimizer) state `moejax.training.steps.build` makes."""
  import jax
  from flax import nnx

  from moejax.training.steps import build as build_state
  from moejax.training.steps import optimizer_state_bytes
  from moejax.training.trainable import trainable_filter

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
    pair = nnx.eval_shape(lambda config=config: build_state(config)[:2])
    state = nnx.state(pair)
    trained = nnx.state(pair[0], trainable_filter(config.train, pair[0]))
    count = sum(x.size for x in jax.tree.leaves(trained))
    lines.append(
      f"| `{arm.name}` | `{config.train.trainable}` | {count:,} | "
      f"{optimizer_state_bytes(state) / 2**20:.2f} MiB |"
    )
  return lines


def evaluate_pretrained(pretrained: str, config) -> dict:
  """The pretrained model, not fine-tuned, on the windows the arms are evaluated on
  (`config`: an arm's; the batches are `moejax.eval`'s, as training evaluates)."""
  from moejax.eval import eval_batches, evaluate_model
  from moejax.training.loading import load_model

  model, _, step = load_model(pretrained)
  batches = eval_batches(config, split=config.data.eval_split, max_batches=config.data.eval_batches)
  result = evaluate_model(model, batches)
  return {
    "checkpoint": pretrained,
    "step": step,
    "split": config.data.eval_split,
    "batches": len(batches),
    "batch_tokens": config.train.batch_size * config.train.seq_len,
    "eval_loss": result["loss"],
    "eval_bits_per_byte": result["bits_per_byte"],
  }


def prepare(workdir: str, preset: str, train) -> None:
  """Pretrains the MoE the arms fine-tune, in WORKDIR/pretrain, then evaluates it on the
  held-out poem into WORKDIR/pretrained_on_held_out.json (kept once written; the report
  uses it only where the arms' rows were evaluated on the same number and size of
  batches). `--set` overrides reach the pretraining, not this preset-config scoring."""
  pretrained = train("pretrain", pretrain_config(preset))
  path = os.path.join(workdir, REFERENCE_FILE)
  if os.path.exists(path):
    return
  record = evaluate_pretrained(pretrained, finetune_base(preset, pretrained))
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)


def gain_over_pretrained(workdir: str | None, rows) -> list[str]:
  """summary.md's table of each arm's held-out bits/byte minus the pretrained model's,
  with a 95% CI over seeds (a one-sample t-test: the reference is one model)."""
  lines = ["## Against the pretrained model, not fine-tuned", ""]
  path = os.path.join(workdir, REFERENCE_FILE) if workdir else None
  if path is None or not os.path.exists(path):
    return lines + ["Not evaluated yet (the command writes it after pretraining)."]
  with open(path) as f:
    reference = json.load(f)
  scored = {(r["eval_batches"], r["tokens"] / r["steps"]) for r in rows}
  if scored != {(reference["batches"], reference.get("batch_tokens"))}:
    return lines + [
      f"Not comparable: the pretrained model was scored on {reference['batches']} batches of "
      f"{reference.get('batch_tokens')} tokens, the arms on (batches, tokens) {sorted(scored)} "
      f"(`--set` changed them?); remove {REFERENCE_FILE} and rerun to score it again."
    ]
  lines += [
    f"The pretrained model (step {reference['step']}) scores "
    f"{reference['eval_bits_per_byte']:.4f} bits/byte on the same {reference['batches']} "
    f"batches of `{reference['split']}`. Negative: the fine-tuning helped.",
    "",
    "| arm | seeds | held-out bits/byte − pretrained's: mean [95% CI] | p |",
    "|---|---|---|---|",
  ]
  for arm in dict.fromkeys(r["arm"] for r in rows):
    scores = [r["final_eval_bits_per_byte"] for r in rows if r["arm"] == arm]
    gains = [x - reference["eval_bits_per_byte"] for x in scores if math.isfinite(x)]
    if len(gains) < 2:
      mean = f"{gains[0]:+.4f} (one seed)" if gains else "–"
      lines.append(f"| `{arm}` | {len(gains)} | {mean} | – |")
      continue
    gain = stats.paired(gains)
    lines.append(
      f"| `{arm}` | {gain.n} | {gain.estimate:+.4f} [{gain.lo:+.4f}, {gain.hi:+.4f}] | "
      f"{format_p(gain.p)} |"
    )
  return lines


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
    extra_report=lambda a, p, rows: (
      gain_over_pretrained(workdir, rows) + [""] + optimizer_memory(a, p, rows)
    ),
  )
