"""Ablation result rows say what produced them: the arm's overrides, the command's `--set`
(`base_overrides`) and the data the run trained on (`dataset`); results committed before
those columns still load, with '' in them."""

import glob
import json
import os

from experiments.runner import results
from experiments.runner.spec import Ablation, Arm, arm_config
from moejax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ablation():
  arm = Arm("A", {"model.num_experts": 0}, "a dense arm")
  return Ablation(
    name="fake", title="one arm", base=lambda preset: base_config(), arms=lambda p: [arm],
    constraints=(), seeds={"smoke": (0,), "cpu": (0,), "pod": (0,)}, primary=None,
    secondary=(), learning_rates={"smoke": (1e-3,), "cpu": (1e-3,), "pod": (1e-3,)},
  ), arm  # fmt: skip


def _finished_run(run_dir, config, arm, base_overrides):
  """A run directory as the runner leaves it: arm.json, done.json and metrics.jsonl."""
  os.makedirs(run_dir)
  spec = {
    "overrides": dict(arm.overrides),
    "base_overrides": base_overrides,
    "config": json.loads(config.to_json()),
  }
  with open(os.path.join(run_dir, "arm.json"), "w") as f:
    json.dump(spec, f)
  with open(os.path.join(run_dir, "done.json"), "w") as f:
    json.dump({"wall_s": 3.0}, f)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for step in (1, 2):
      train = {"train/loss": 2.0, "train/ce_loss": 1.9, "train/tokens_per_sec": 100.0}
      f.write(json.dumps({"step": step, **train}) + "\n")
    f.write(json.dumps({"step": 2, "eval/loss": 1.5, "eval/bits_per_byte": 2.1}) + "\n")


def test_a_row_names_its_dataset_and_the_set_overrides(tmp_path, monkeypatch):
  monkeypatch.setattr(results, "eval_batches_of", lambda config: 1)  # reads no data
  ablation, arm = _ablation()
  base = {"data.train_split": "plays", "train.num_steps": 2, "train.warmup_steps": 1}
  config = arm_config(ablation, "smoke", arm, 0, base)
  _finished_run(str(tmp_path / "tfds"), config, arm, base)
  row = results.run_row(ablation, "smoke", arm, 0, str(tmp_path / "tfds"))
  assert row["dataset"] == "shakespeare_plays[plays]"
  assert json.loads(row["base_overrides"]) == base
  config.data.tokens_dir = "/stores/kjv"
  _finished_run(str(tmp_path / "store"), config, arm, {})
  row = results.run_row(ablation, "smoke", arm, 0, str(tmp_path / "store"))
  assert (row["dataset"], row["base_overrides"]) == ("/stores/kjv", "{}")
  path = tmp_path / "results.csv"
  path.write_bytes(results.csv_bytes([row], results.RESULT_COLUMNS))
  (back,) = results.read_results_csv(str(path))
  assert (back["dataset"], back["base_overrides"]) == ("/stores/kjv", "{}")


def test_committed_results_load_without_the_added_columns():
  paths = glob.glob(os.path.join(REPO, "docs", "results", "*", "*.csv"))
  assert paths
  for path in paths:
    rows = results.read_results_csv(path)
    if os.path.basename(path) == "contrasts.csv":
      assert all("dataset" not in row for row in rows), path
      continue
    assert rows and all(row["dataset"] in ("", rows[0]["dataset"]) for row in rows), path
    assert all(isinstance(row["base_overrides"], str) for row in rows), path
