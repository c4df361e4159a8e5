"""How a sweep chooses each arm's learning rate: by the ablation's `lr_metric`, lowest
wins (experiments/runner/run.py), through the runner and into summary.md."""

from __future__ import annotations

import dataclasses

import pytest
from test_ablation_runner import QUIET, FakeTraining, _fake_ablation

import experiments.finetune
from experiments.runner import report
from experiments.runner.run import choose_learning_rate, run_ablation

NAN = float("nan")
ROWS = [
  {"learning_rate": 1e-4, "final_train_ce_loss": 1.60, "final_eval_bits_per_byte": 2.30},
  {"learning_rate": 1e-3, "final_train_ce_loss": 1.40, "final_eval_bits_per_byte": 2.42},
  {"learning_rate": 3e-3, "final_train_ce_loss": NAN, "final_eval_bits_per_byte": NAN},
]


def test_lowest_train_ce_by_default_lowest_eval_where_training_repeats_its_data():
  assert choose_learning_rate(ROWS) == 1e-3
  assert choose_learning_rate(ROWS, "final_eval_bits_per_byte") == 1e-4
  with pytest.raises(ValueError, match="no sweep run of this arm finished with a finite eval"):
    choose_learning_rate(ROWS[2:], "final_eval_bits_per_byte")
  finetune = experiments.finetune.build(None, "cpu")
  assert finetune.lr_metric == "final_eval_bits_per_byte"
  lines = report._sweep_lines(finetune, [dict(ROWS[0], arm="full")], [])
  assert "the lowest final eval bits/byte of its sweep" in "\n".join(lines)
  with pytest.raises(ValueError, match="lr_metric='step_s' must be final_train_ce_loss or"):
    dataclasses.replace(finetune, lr_metric="step_s")


def test_the_runner_chooses_by_the_ablations_metric(tmp_path, monkeypatch):
  """The fake runs' train CE is lowest at each arm's BEST_LR (2e-3, 4e-3); their eval
  bits/byte does not depend on the rate, so by eval the first of equals, 1e-3, wins."""
  FakeTraining(monkeypatch)
  ablation = dataclasses.replace(_fake_ablation(), lr_metric="final_eval_bits_per_byte")
  out = run_ablation(ablation, "smoke", str(tmp_path / "fake"), show_progress=False, log=QUIET)
  assert out["learning_rates"] == {"A": 1e-3, "B": 1e-3, "C": 1e-3}
