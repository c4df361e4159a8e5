"""The fine-tuning and upcycling experiments at the smoke preset: their prerequisite runs
are made first, and every arm starts from them (`train.init_from`)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np

import moejax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  """`python -m MODULE ARGS` on one CPU device (the test process has 8 simulated ones,
  over which training would shard even the smoke models); exit code 0 asserted."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-3000:]


def _rows(workdir):
  with open(workdir / "results.csv") as f:
    return list(csv.DictReader(f))


def test_finetune_pretrains_then_its_arm_starts_from_that_model(tmp_path):
  args = [
    "--preset=smoke",
    f"--workdir={tmp_path}",
    "--arms=freeze_moe",
    "--seeds=0",
    "--quiet",
  ]
  _run("experiments.finetune", *args)
  pretrained, pretrain_config = moejax.load(tmp_path / "pretrain")
  frozen_run, config = moejax.load(tmp_path / "freeze_moe" / "seed_0")
  assert config.train.init_from == str(tmp_path / "pretrain")
  assert pretrain_config.data.train_split == "plays"
  assert (config.data.train_split, config.data.eval_split) == ("sonnets_and_short_poems", "lucrece")
  # freeze_moe kept the pretrained experts bit for bit and trained the attention.
  np.testing.assert_array_equal(
    np.asarray(frozen_run.layer(0).moe.experts.w_in[...]),
    np.asarray(pretrained.layer(0).moe.experts.w_in[...]),
  )
  assert not np.array_equal(
    np.asarray(frozen_run.layer(0).attention.q_proj.kernel[...]),
    np.asarray(pretrained.layer(0).attention.q_proj.kernel[...]),
  )
  assert [r["arm"] for r in _rows(tmp_path)] == ["freeze_moe"]
  summary = (tmp_path / "summary.md").read_text()
  assert "## Optimizer state per arm" in summary and "| `freeze_moe` | `all_but_moe` |" in summary
  # The pretrained model, scored on the arms' held-out batches, against moejax.eval's
  # numbers recomputed here; the arm's one seed is its gain over it.
  from moejax.eval import eval_batches, evaluate_model

  reference = json.loads((tmp_path / "pretrained_on_held_out.json").read_text())
  batches = eval_batches(config, split="lucrece", max_batches=config.data.eval_batches)
  row = _rows(tmp_path)[0]
  assert reference["batches"] == len(batches) == int(row["eval_batches"])
  assert reference["split"] == config.data.eval_split == "lucrece"
  expected = evaluate_model(pretrained, batches)["bits_per_byte"]
  np.testing.assert_allclose(reference["eval_bits_per_byte"], expected, rtol=1e-6)
  # The gain is over the reference file's number, checked against `expected` just above
  # (to rtol 1e-6, so the test rounds the file's number, not `expected`, to 4 decimals).
  gain = float(row["final_eval_bits_per_byte"]) - reference["eval_bits_per_byte"]
  assert abs(gain - (float(row["final_eval_bits_per_byte"]) - expected)) < 1e-5
  assert f"| `freeze_moe` | 1 | {gain:+.4f} (one seed) | – |" in summary


def test_upcycle_trains_the_dense_model_upcycles_it_and_holds_the_flops_equal(tmp_path):
  from experiments import upcycle
  from experiments.runner.accounting import accounting
  from experiments.runner.spec import arm_config, get_arms

  args = ["--preset=smoke", f"--workdir={tmp_path}", "--arms=upcycled,dense_continued"]
  args += ["--seeds=0", "--quiet"]
  _run("experiments.upcycle", *args)
  record = json.loads((tmp_path / "dense_upcycled" / "upcycle.json").read_text())
  assert record["from"] == str(tmp_path / "dense")
  _, config = moejax.load(tmp_path / "upcycled" / "seed_0")
  assert config.train.init_from == str(tmp_path / "dense_upcycled")
  assert config.model.num_experts == upcycle.EXPERTS
  rows = _rows(tmp_path)
  assert sorted(r["arm"] for r in rows) == ["dense_continued", "upcycled"]
  # Equal FLOPs, unequal steps: summary.md's protocol line gives each arm's.
  steps = {r["arm"]: int(float(r["steps"])) for r in rows}
  assert steps["dense_continued"] > steps["upcycled"]
  header = (tmp_path / "summary.md").read_text()
  assert all(f"`{arm}` {n}" in header.split("\n\n")[1] for arm, n in steps.items())
  ablation = upcycle.build(str(tmp_path), "smoke")
  flops = {
    arm.name: accounting(arm_config(ablation, "smoke", arm))["train_flops"]
    for arm in get_arms(ablation, "smoke")
  }
  assert abs(flops["upcycled"] / flops["dense_continued"] - 1) < 0.02
  assert flops["moe_scratch"] > 1.5 * flops["upcycled"]  # it also pays for the pretraining


def test_the_pretrained_reference_is_used_only_where_the_arms_were_scored_alike(tmp_path):
  """Gains over the pretrained model: a one-sample t interval over seeds (hand-computed
  here), and no table at all when the arms' batches differ from the reference's."""
  from experiments import finetune

  reference = {"step": 600, "split": "lucrece", "batches": 20, "batch_tokens": 4096}
  reference["eval_bits_per_byte"] = 2.0
  (tmp_path / finetune.REFERENCE_FILE).write_text(json.dumps(reference))
  row = dict(arm="full", eval_batches=20, tokens=409600.0, steps=100)
  rows = [dict(row, seed=s, final_eval_bits_per_byte=v) for s, v in enumerate((1.9, 1.8))]
  lines = finetune.gain_over_pretrained(str(tmp_path), rows)
  # differences -0.1, -0.2: mean -0.15, sd 0.0707, se 0.05; t(1) 97.5% = 12.7062;
  # t = 3 on 1 df (Cauchy): p = 1 - 2·atan(3)/π = 0.205
  assert "| `full` | 2 | -0.1500 [-0.7853, +0.4853] | 0.2 |" in lines
  rows[1]["eval_batches"] = 21
  text = "\n".join(finetune.gain_over_pretrained(str(tmp_path), rows))
  assert "Not comparable" in text and "| `full` |" not in text
