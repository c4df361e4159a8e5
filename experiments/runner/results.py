r"""From finished runs to result rows: one row per arm and seed (results.csv) and one per
learning-rate sweep run (lr_sweep.csv).

Each row holds the arm's shape, its accounting (`accounting.py`, all `moejax.models.flops`), and
the outcome read from the run's `metrics.jsonl`:

* `final_eval_bits_per_byte`, `final_eval_loss`: the last evaluation, over `eval_batches`
  batches: the eval split's full batches, at most `data.eval_batches` (at the cpu
  preset, the whole validation split);
* `final_train_ce_loss`, `final_train_loss`: mean over the train records of the last 10%
  of steps (each logged batch is scored before the step trains on it; where a run trains
  under one epoch, as every ablation's cpu preset does, this is a held-out estimate on the
  training data, and where it trains several, as `experiments/finetune` does, it is not);
* `eval_drop_last_20pct`: how much the eval bits/byte fell from the last evaluation at or
  before 80% of the steps (`eval_drop_from_step`) to the end: the curve's remaining slope;
* `tokens_per_sec` (median over log intervals, the first, which includes compiling, left
  out) and `step_s` (seconds per train step at that rate);
* `train_dropped_fraction` (last 10% of steps), `eval_dropped_fraction`;
* `expert_load_imbalance`: max expert share × E from `train/expert_load/layer_I`, mean
  over MoE layers and the last 10% of steps (1.0 uniform; empty for dense arms);
  `expert_load_imbalance_all`: the same over every logged step of the run;
* `wall_s`: of the call that finished the run.

Each row also says what produced it, from the run's arm.json: the arm's own `overrides`,
the command's `--set` (`base_overrides`) and the data it trained on (`dataset`); rows of
results written before these columns have '' there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from experiments.runner.accounting import accounting
from experiments.runner.spec import Ablation, get_arms
from experiments.runner.workdir import SWEEP_DIR, read_json, read_records
from moejax.config import text as config_text
from moejax.models.transformer import expert_d_ff_of

RESULT_COLUMNS = (
  "ablation",
  "preset",
  "arm",
  "seed",
  "learning_rate",
  "overrides",
  "base_overrides",
  "dataset",
  "num_layers",
  "d_model",
  "num_experts",
  "top_k",
  "expert_d_ff",
  "moe_layer_interval",
  "d_ff",
  "dense_moe_hybrid",
  "dispatch",
  "capacity_factor",
  "params_active",
  "params_total",
  "ffn_active",
  "ffn_total",
  "flops_per_token",
  "train_flops",
  "tokens",
  "tokens_per_active_param",
  "steps",
  "eval_batches",
  "final_train_loss",
  "final_train_ce_loss",
  "final_eval_loss",
  "final_eval_bits_per_byte",
  "eval_drop_last_20pct",
  "eval_drop_from_step",
  "tokens_per_sec",
  "step_s",
  "train_dropped_fraction",
  "eval_dropped_fraction",
  "expert_load_imbalance",
  "expert_load_imbalance_all",
  "wall_s",
)
TEXT_COLUMNS = ("ablation", "preset", "arm", "overrides", "base_overrides", "dataset", "dispatch")
# Columns added since results were first committed: a row read from an older results.csv
# gets '' (not recorded) in each (`read_results_csv`).
ADDED_COLUMNS = ("base_overrides", "dataset")


def _final_window(records: list[dict[str, Any]], num_steps: int) -> list[dict[str, Any]]:
  """Train records of the last 10% of steps (at least the last record)."""
  window = [r for r in records if r["step"] > 0.9 * num_steps]
  return window or records[-1:]


def summarize_run(run_dir: str, num_steps: int, tokens_per_step: int) -> dict[str, Any]:
  """The outcome columns of one finished run, from its metrics.jsonl."""
  records = read_records(run_dir)
  train_records = [r for r in records if "train/loss" in r]
  eval_records = [r for r in records if "eval/loss" in r]
  if not train_records or not eval_records:
    raise ValueError(f"{run_dir}/metrics.jsonl has no train or no eval records")
  window = _final_window(train_records, num_steps)
  mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
  speeds = [r["train/tokens_per_sec"] for r in train_records[1:]] or [
    r["train/tokens_per_sec"] for r in train_records
  ]  # the first includes compiling

  def imbalance_of(records):  # per record: max share × E, mean over MoE layers
    out = []
    for r in records:
      loads = [v for k, v in r.items() if k.startswith("train/expert_load/layer_")]
      if loads:
        out.append(mean([max(load) * len(load) for load in loads]))
    return out

  imbalance, imbalance_all = imbalance_of(window), imbalance_of(train_records)
  last_eval = eval_records[-1]
  earlier = [r for r in eval_records[:-1] if r["step"] <= 0.8 * num_steps]
  tokens_per_sec = statistics.median(speeds)
  return {
    "final_train_loss": mean([r["train/loss"] for r in window]),
    "final_train_ce_loss": mean([r["train/ce_loss"] for r in window]),
    "final_eval_loss": last_eval["eval/loss"],
    "final_eval_bits_per_byte": last_eval["eval/bits_per_byte"],
    "eval_drop_last_20pct": (
      earlier[-1]["eval/bits_per_byte"] - last_eval["eval/bits_per_byte"]
      if earlier
      else float("nan")
    ),
    "eval_drop_from_step": earlier[-1]["step"] if earlier else float("nan"),
    "tokens_per_sec": tokens_per_sec,
    "step_s": tokens_per_step / tokens_per_sec,
    "train_dropped_fraction": mean([r.get("train/dropped_fraction", 0.0) for r in window]),
    "eval_dropped_fraction": last_eval.get("eval/dropped_fraction", 0.0),
    "expert_load_imbalance": mean(imbalance) if imbalance else float("nan"),
    "expert_load_imbalance_all": mean(imbalance_all) if imbalance_all else float("nan"),
  }


def run_row(ablation: Ablation, preset: str, arm, seed: int, run_dir: str) -> dict[str, Any]:
  """The result row of one finished run, from its arm.json (the config it trained),
  done.json and metrics.jsonl."""
  spec = read_json(os.path.join(run_dir, "arm.json"))
  config = config_text.from_saved(spec["config"])
  done = read_json(os.path.join(run_dir, "done.json"))
  m, t = config.model, config.train
  moe = m.num_experts > 0
  row = {
    "ablation": ablation.name,
    "preset": preset,
    "arm": arm.name,
    "seed": seed,
    "learning_rate": t.learning_rate,
    "overrides": json.dumps(dict(arm.overrides), sort_keys=True),
    "base_overrides": json.dumps(spec.get("base_overrides") or {}, sort_keys=True),
    "dataset": dataset_of(config),
    "num_layers": m.num_layers,
    "d_model": m.d_model,
    "num_experts": m.num_experts,
    "top_k": m.top_k if moe else 0,
    "expert_d_ff": expert_d_ff_of(m) if moe else 0,
    "moe_layer_interval": m.moe_layer_interval if moe else 0,
    "d_ff": m.d_ff,
    "dense_moe_hybrid": int(bool(m.dense_moe_hybrid)),
    "dispatch": m.dispatch if moe else "",
    "capacity_factor": m.capacity_factor if moe and m.dispatch != "dropless" else float("nan"),
    **accounting(config),
    "steps": t.num_steps,
    "eval_batches": eval_batches_of(config),
    **summarize_run(run_dir, t.num_steps, t.batch_size * t.seq_len),
    "wall_s": done.get("wall_s", float("nan")),
  }
  return {k: row[k] for k in RESULT_COLUMNS}


def dataset_of(config) -> str:
  """What a run trained on: its token store (`data.tokens_dir`), `mixture:` and its
  `data.mixture`, or the TFDS split it read (`shakespeare_plays[train]`)."""
  d = config.data
  if d.mixture:
    return f"mixture:{d.mixture}"
  return d.tokens_dir or f"{d.name}[{d.train_split}]"


def eval_batches_of(config) -> int:
  """The number of batches a run of `config` evaluated on: its eval split's full batches,
  at most `data.eval_batches` (the batches `moejax.eval.eval_batches` builds)."""
  d, t = config.data, config.train
  key = (d.name, d.eval_split, d.data_dir, d.text_key, t.seq_len, t.batch_size, d.eval_batches)
  if key not in _EVAL_BATCHES:
    from moejax.eval import eval_batches

    _EVAL_BATCHES[key] = len(eval_batches(config, split=d.eval_split, max_batches=d.eval_batches))
  return _EVAL_BATCHES[key]


_EVAL_BATCHES: dict[tuple, int] = {}  # eval_batches_of's answers, by data settings


def _seed_dirs(directory: str) -> list[int]:
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n[5:]) for n in names if re.fullmatch(r"seed_\d+", n))


def collect_rows(
  ablation: Ablation, preset: str, workdir: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
  """Every finished run under `workdir` (any seeds found): {'rows': of the seed runs,
  'sweep_rows': of the sweep runs, 'curves': {(arm, seed): (eval bits/byte by step, train
  CE by step)} of the seed runs, 'pending': runs without done.json}."""
  rows, sweep_rows, curves, pending = [], [], {}, []

  def add(arm, seed, run_dir, out, label):
    if not os.path.exists(os.path.join(run_dir, "done.json")):
      pending.append(label)
      return False
    try:
      out.append(run_row(ablation, preset, arm, seed, run_dir))
    except (ValueError, OSError, KeyError) as error:  # one bad run must not hide the rest
      log(f"left out {label}: {error}")
      pending.append(f"{label} (unreadable)")
      return False
    return True

  for arm in get_arms(ablation, preset):
    sweep_root = os.path.join(workdir, SWEEP_DIR, arm.name)
    lr_dirs = os.listdir(sweep_root) if os.path.isdir(sweep_root) else []
    for lr_dir in sorted(lr_dirs, key=lambda n: float(n[3:]) if n.startswith("lr_") else 0.0):
      for seed in _seed_dirs(os.path.join(sweep_root, lr_dir)):
        run_dir = os.path.join(sweep_root, lr_dir, f"seed_{seed}")
        add(arm, seed, run_dir, sweep_rows, f"{SWEEP_DIR}/{arm.name}/{lr_dir}/seed_{seed}")
    for seed in _seed_dirs(os.path.join(workdir, arm.name)):
      run_dir = os.path.join(workdir, arm.name, f"seed_{seed}")
      if add(arm, seed, run_dir, rows, f"{arm.name}/seed_{seed}"):
        records = read_records(run_dir)
        curves[arm.name, seed] = (
          [(r["step"], r["eval/bits_per_byte"]) for r in records if "eval/bits_per_byte" in r],
          [(r["step"], r["train/ce_loss"]) for r in records if "train/ce_loss" in r],
        )
  return {"rows": rows, "sweep_rows": sweep_rows, "curves": curves, "pending": pending}


def _csv_value(v):
  if isinstance(v, float):
    if math.isnan(v):
      return ""
    return repr(v) if not v.is_integer() else str(int(v)) if abs(v) < 1e15 else repr(v)
  return v


def csv_bytes(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> bytes:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: _csv_value(row[k]) for k in columns})
  return out.getvalue().encode()


def read_results_csv(path: str) -> list[dict[str, Any]]:
  """Rows of a results.csv (this version's or an earlier one's columns), numbers as float
  (NaN for empty cells) and `seed` as int; a results or sweep file written before the
  `ADDED_COLUMNS` has '' (not recorded) in each. Any other CSV (contrasts.csv) is read as
  written."""

  def value(key, text):
    if key in TEXT_COLUMNS:
      return text
    if key == "seed":
      return int(text)
    try:
      return float(text) if text != "" else float("nan")
    except ValueError:
      return text

  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    rows = [{k: value(k, v) for k, v in row.items()} for row in reader]
  if "overrides" in (reader.fieldnames or ()):  # a results or sweep file
    for row in rows:
      for key in ADDED_COLUMNS:
        row.setdefault(key, "")
  return rows
