"""The run directory (`--workdir`): a local path or a URI such as `gs://bucket/run`.

Every file of a run (checkpoints, metrics, TensorBoard, the config) is reached through
`etils.epath`, the path layer Orbax uses, so a bucket works wherever a local directory
does (`gs://` needs the `gcs` extra: `pip install 'moejax[gcs]'`). A workdir is checked
before anything is written, and created only once the run is known to be valid.

Files written here: `config.json`, the run's config as readable JSON (rewritten when a
resumed run is allowed a changed config, the change appended to `config_changes.jsonl`).
A training run holds `run.lock` while it runs (`moejax.training.workdir_lock`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import fsspec
import ml_collections
from etils import epath

from moejax.config import text as config_text

CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is a URI (`gs://...`, `s3://...`) rather than a local path."""
  return "://" in os.fspath(path)


def resolve(workdir: epath.PathLike) -> epath.Path:
  """`workdir` as an epath.Path: a URI as given, a local path absolute and user-expanded.
  A URI whose filesystem package is missing (gcsfs for `gs://`) is refused with the
  install line."""
  if is_remote(workdir):
    protocol = os.fspath(workdir).split("://", 1)[0]
    try:
      fsspec.get_filesystem_class(protocol)
    except ImportError as error:
      extra = "the gcs extra: pip install 'moejax[gcs]'" if protocol in ("gs", "gcs") else error
      raise ValueError(f"{workdir}: {protocol}:// paths need {extra}.") from None
    return epath.Path(workdir)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(workdir))))


def check(workdir: epath.PathLike) -> epath.Path:
  """Raises, creating nothing, when `workdir` cannot hold a run: ValueError if it or one of
  its parents is a file, PermissionError if a local one cannot be created or written.

  Returns the resolved path.
  """
  path = resolve(workdir)
  if path.exists() and not path.is_dir():
    raise ValueError(
      f"--workdir={workdir} is a file, not a directory; pass a directory (a new one, or "
      "the workdir of the run to resume)."
    )
  if is_remote(path):
    return path  # a bucket's permissions show on the first write
  ancestor = path
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise ValueError(
      f"--workdir={workdir} cannot be created: {ancestor} is a file; pass a directory path."
    )
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise PermissionError(
      f"--workdir={workdir} is not writable ({ancestor} does not allow writing); pass a "
      "--workdir you can write to."
    )
  return path


def create(path: epath.Path) -> None:
  """Creates the run directory (parents included) and makes sure files can be written there."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not is_remote(path):
      with tempfile.NamedTemporaryFile(dir=os.fspath(path)):
        pass
  except OSError as error:
    raise PermissionError(
      f"--workdir={path} is not writable ({error.strerror or error}); pass a --workdir you "
      "can write to."
    ) from None


def write_text_atomically(path: epath.Path, text: str) -> None:
  """Writes `path` through a temporary file and a rename: a reader (or a killed writer)
  sees the old contents or the new, never half of them."""
  temporary = path.parent / f"{path.name}.tmp"
  temporary.write_text(text)
  temporary.replace(path)


def read_config(path: epath.Path) -> dict[str, Any] | None:
  """The saved `config.json` of the run in `path`, or None if there is none."""
  file = path / CONFIG_FILE
  if not file.exists():
    return None
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(
      f"{file} is not valid JSON ({error}); restore it or move it away (the checkpoints hold "
      "the run's config too)."
    ) from None


def write_config(
  path: epath.Path,
  config: ml_collections.ConfigDict,
  *,
  step: int,
  changes: dict[str, tuple[Any, Any]],
) -> None:
  """Writes `config.json`; with `changes` (a resumed run's allowed config change), first
  appends `{"step": step, "changes": {key: [old, new]}}` to `config_changes.jsonl`."""
  if changes:
    log = path / CONFIG_CHANGES_FILE
    before = log.read_text() if log.exists() else ""
    record = {"step": step, "changes": {k: list(v) for k, v in changes.items()}}
    write_text_atomically(log, before + json.dumps(record) + "\n")
  text = json.dumps(config_text.as_json(config), indent=2, sort_keys=True) + "\n"
  file = path / CONFIG_FILE
  if not file.exists() or file.read_text() != text:
    write_text_atomically(file, text)


def keep_copies(path: epath.PathLike, files: dict[str, str]) -> None:
  """Copies `files` (`{name: source path}`) into the run directory `path`, each unless a
  file of that name is there already (a resumed run keeps what it started with)."""
  path = resolve(path)
  for name, source in files.items():
    if not (path / name).exists():
      epath.Path(source).copy(path / name)
