r"""The files of an ablation's workdir, and the rules that keep them safe.

    WORKDIR/ablation.json                 which ablation and preset the workdir belongs to
    WORKDIR/ARM/seed_S/                   one run of the contrasts (S: the preset's seeds)
    WORKDIR/lr_sweep/ARM/lr_X/seed_1000/  one run of ARM's learning-rate sweep
      arm.json                            the arm, its overrides and the full config it trains
      done.json                           written when the run finished: the finished marker
      metrics.jsonl, checkpoints/, ...    of moejax.training.train
    WORKDIR/results.csv, lr_sweep.csv, contrasts.csv, summary.md, *.png   (report.py)
    WORKDIR/estimate.json                 the wall-time estimate (`--estimate --workdir`)
    WORKDIR/.runner.lock                  an advisory lock: one runner per workdir at a time

Nothing in a workdir is ever deleted or silently overwritten: a run directory whose
`arm.json` holds another config is refused (naming the first differing keys), as is one
the runner did not create; derived files are rewritten only when their content changes,
and then the previous version is kept beside as `NAME.~N~`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from moejax.config import text as config_text

SWEEP_DIR = "lr_sweep"


def run_dir_of(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, arm, f"seed_{seed}")


def sweep_dir_of(workdir: str, arm: str, learning_rate: float, seed: int) -> str:
  return os.path.join(workdir, SWEEP_DIR, arm, f"lr_{learning_rate:g}", f"seed_{seed}")


def json_roundtrip(obj):
  return json.loads(json.dumps(obj))


def write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_keeping_previous(path: str, data: bytes, log: Callable[[str], None] = print) -> str:
  """Writes `data` to `path` unless it already holds exactly that (then the file, and its
  mtime, stay untouched). A different existing file is kept as `path.~N~` first.

  Returns 'unchanged', 'new' or 'replaced'.
  """
  if os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() == data:
        return "unchanged"
    n = 1
    while os.path.exists(f"{path}.~{n}~"):
      n += 1
    os.replace(path, f"{path}.~{n}~")
    log(f"kept the previous {os.path.basename(path)} as {os.path.basename(path)}.~{n}~")
    status = "replaced"
  else:
    status = "new"
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return status


def checkpoint_steps(run_dir: str) -> list[int]:
  directory = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def read_records(run_dir: str) -> list[dict[str, Any]]:
  """The records of `run_dir/metrics.jsonl` ([] if there is none)."""
  if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
    return []
  from moejax.training.metrics import read_metrics

  return read_metrics(run_dir)


def run_status(run_dir: str, config: ml_collections.ConfigDict) -> str:
  """'done', 'finished_unmarked' (final checkpoint and eval exist, no marker: killed right
  after its last step), 'partial' (some of it exists: resume) or 'new'."""
  if os.path.exists(os.path.join(run_dir, "done.json")):
    return "done"
  if not os.path.isdir(run_dir) or not os.listdir(run_dir):
    return "new"
  steps = config.train.num_steps
  if steps in checkpoint_steps(run_dir) and any(
    r["step"] == steps and "eval/loss" in r for r in read_records(run_dir)
  ):
    return "finished_unmarked"
  return "partial"


def check_run_dir(run_dir: str, spec: dict[str, Any], ignore: Sequence[str] = ()) -> None:
  """Refuses a run directory that holds a run of another config (but for the dotted keys
  in `ignore`), or not ours."""
  path = os.path.join(run_dir, "arm.json")
  if os.path.exists(path):
    old = read_json(path)
    changes = config_text.differences(old.get("config", {}), spec["config"])
    diffs = [f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changes.items() if k not in ignore]
    if diffs:
      shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
      raise ValueError(
        f"{run_dir} holds a run of a different config ({shown}); "
        "rerun with the original settings or pass another --workdir"
      )
  elif os.path.isdir(run_dir) and os.listdir(run_dir):
    raise ValueError(
      f"{run_dir} holds files but no arm.json (not a run of this runner); "
      "move it away or pass another --workdir"
    )


def check_workdir(workdir: str, ablation: str, preset: str, create: bool) -> None:
  """Refuses a workdir of another ablation or preset; with `create`, claims a new one."""
  path = os.path.join(workdir, "ablation.json")
  want = {"ablation": ablation, "preset": preset}
  if os.path.exists(path):
    have = read_json(path)
    if {k: have.get(k) for k in want} != want:
      raise ValueError(
        f"{workdir} holds the {have.get('preset')!r} preset of ablation "
        f"{have.get('ablation')!r}, not {preset!r} of {ablation!r}; pass another --workdir"
      )
  elif create:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(path, want)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An advisory lock so that two runners never train in the same workdir at once."""
  import fcntl

  path = os.path.join(workdir, ".runner.lock")
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise RuntimeError(f"another runner is using {workdir} (lock {path} is held)") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
