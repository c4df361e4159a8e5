"""Metric records: `WORKDIR/metrics.jsonl` (one JSON object a line) and TensorBoard.

Both go through `etils.epath`, so a `gs://bucket/run` workdir gets them as a local one does.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from etils import epath

from moejax.training import workdir as workdir_lib

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Appends `{"step": N, name: value, ...}` lines to `metrics.jsonl` and scalars to TensorBoard.

  Only one process writes (`enabled`). On resume from step S, records of steps after S
  (written before an interruption, and about to be recomputed) move to
  `metrics.jsonl.after_step_S` beside the log rather than being deleted, so the log reads
  as one uninterrupted run and nothing written is lost; so does a last line cut short by
  a kill. Lists of numbers (the per-expert load of a layer) become one TensorBoard scalar
  per entry (`train/expert_load/layer_0/expert_3`).

  A local log is appended to; an object store cannot append, so there the whole log is
  rewritten at each record.
  """

  def __init__(self, workdir: epath.PathLike, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = workdir_lib.resolve(workdir) / METRICS_FILE
    self._tensorboard: Any = None  # a tensorboardX SummaryWriter where enabled
    self._lines: list[str] = []  # the whole log, kept where it cannot be appended to
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lines = self._set_aside_records_after(resume_step)
    from tensorboardX import SummaryWriter

    self._tensorboard = SummaryWriter(_tensorboard_dir(self.path.parent))

  def _set_aside_records_after(self, step: int) -> list[str]:
    """Moves records after `step` (and unreadable lines) to `metrics.jsonl.after_step_S`;
    returns the records kept."""
    if not self.path.exists():
      return []
    lines = [line for line in self.path.read_text().splitlines(keepends=True) if line.strip()]
    keep: list[str] = []
    later: list[str] = []
    for line in lines:
      record = _parse(line)
      (keep if record is not None and record["step"] <= step else later).append(line)
    if later:
      aside = self.path.parent / f"{self.path.name}.after_step_{step}"
      before = aside.read_text() if aside.exists() else ""
      workdir_lib.write_text_atomically(aside, before + "".join(_whole(l) for l in later))
      workdir_lib.write_text_atomically(self.path, "".join(keep))
      log.warning(
        "resuming at step %d: moved %d metric records of later steps to %s",
        step,
        len(later),
        aside,
      )
    return keep

  def write(self, step: int, record: dict[str, Any]) -> None:
    if self._tensorboard is None:  # not enabled
      return
    line = json.dumps({"step": step, **record}) + "\n"
    if workdir_lib.is_remote(self.path):
      self._lines.append(line)
      workdir_lib.write_text_atomically(self.path, "".join(self._lines))
    else:
      with self.path.open("a") as f:
        f.write(line)
    for name, value in record.items():
      if isinstance(value, (int, float)):
        self._tensorboard.add_scalar(name, value, step)
      elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        for i, v in enumerate(value):
          self._tensorboard.add_scalar(f"{name}/expert_{i}", v, step)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _parse(line: str) -> dict[str, Any] | None:
  try:
    record = json.loads(line)
  except json.JSONDecodeError:  # a line cut short when the writer was killed
    return None
  return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _whole(line: str) -> str:
  return line if line.endswith("\n") else line + "\n"


def read_metrics(workdir: epath.PathLike) -> list[dict[str, Any]]:
  """All records of `WORKDIR/metrics.jsonl`, in order (a last line cut short by a kill is
  left out)."""
  path = workdir_lib.resolve(workdir) / METRICS_FILE
  records = [_parse(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in records if r is not None]


# ----------------------------------------------------------------------------- TensorBoard


class _EpathEventFile:
  """An event file in an object store: written whole through epath at each flush (objects
  cannot be appended to), as tensorboardX's own GCS writer does."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory interface, for the URI schemes epath serves."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_dir(workdir: epath.Path) -> str:
  """`WORKDIR/tensorboard`; for a URI workdir, tensorboardX is pointed at epath first."""
  if workdir_lib.is_remote(workdir):
    from tensorboardX import record_writer

    scheme = str(workdir).split("://", 1)[0]
    record_writer.register_writer_factory(scheme, _EpathEventFiles())
  return str(workdir / "tensorboard")
