"""Metric records: `WORKDIR/metrics.jsonl` (one JSON object a line) and TensorBoard."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class MetricWriter:
  """Appends `{"step": N, name: value, ...}` lines to `metrics.jsonl` and scalars to TensorBoard.

  Only one process writes (`enabled`). On resume from step S, records of steps after S
  (written before an interruption, and about to be recomputed) move to
  `metrics.jsonl.after_step_S` beside the log rather than being deleted, so the log reads
  as one uninterrupted run and nothing written is lost.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._set_aside_records_after(resume_step)
    from tensorboardX import SummaryWriter

    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def _set_aside_records_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    keep = [l for l in lines if l.strip() and json.loads(l)["step"] <= step]
    later = [l for l in lines if l.strip() and json.loads(l)["step"] > step]
    if not later:
      return
    aside = f"{self.path}.after_step_{step}"
    with open(aside, "a", encoding="utf-8") as f:
      f.writelines(later)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)
    log.warning(
      "resuming at step %d: moved %d metric records of later steps to %s", step, len(later), aside
    )

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, **record}) + "\n")
    for name, value in record.items():
      if isinstance(value, (int, float)):
        self._tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `WORKDIR/metrics.jsonl`, in order."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
