"""The directory a command writes (an import's or an upcycle's run directory, an export's
`--to`): new or empty before, marked while it is written, and removed when the command
fails or is stopped, so that the same command can be run again.

While a command writes it, the directory holds `WRITING` (JSON: the command, host, pid and
start time), written first and removed last, after the record file that says where the
weights came from (`import.json`, `upcycle.json`). What the marker means:

* the writer fails (any exception: a full disk, a bad tensor): it removes what it wrote
  (`writing`), the marker last;
* the writer is stopped by SIGINT/SIGTERM (`moejax.runtime.signals`): the signal thread
  removes the directory while the main thread may still be writing into it: it renames it
  aside first (atomic: what the writer writes next lands in the tree being removed, or in
  a fresh directory of the old name), removes that, and removes the name again if a late
  write made it reappear (`remove_aside`);
* the writer was killed outright (kill -9, a power cut): the marker stays. The readers here
  (export, upcycle's `--from`, the import record) refuse the directory in one line
  (`check_finished`), and the same command, rerun, replaces it with a note
  (`new_directory`), unless the writer named in the marker still runs on this host.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from typing import Any

from etils import epath

from moejax.runtime import signals
from moejax.training import workdir as workdir_lib

MARKER = "WRITING"


def _writer(path: epath.Path) -> dict[str, Any] | None:
  """The marker in directory `path` as written by `writing`, or None when there is none
  (or the file there is not one moejax wrote: a regular file of JSON naming a command)."""
  marker = path / MARKER
  if not marker.exists():
    return None
  if not workdir_lib.is_remote(marker) and not os.path.isfile(os.fspath(marker)):
    return None
  try:
    owner = json.loads(marker.read_text())
  except (OSError, ValueError):
    return None
  return owner if isinstance(owner, dict) and isinstance(owner.get("command"), str) else None


def _running(owner: dict[str, Any]) -> bool:
  """Whether the writer the marker `owner` names is a live process of this host (not this
  one); a writer on another host is taken to be gone."""
  pid = owner.get("pid")
  if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # exists, owned by someone else
    return True
  return True


def new_directory(target: epath.PathLike, flag: str) -> epath.Path:
  """`target` resolved, checked to be new or empty (nothing written is overwritten).

  A directory holding a `MARKER` is the unfinished output of an interrupted command: it is
  emptied, with a one-line note on stderr, unless its writer still runs on this host."""
  path = workdir_lib.resolve(target)
  owner = _writer(path) if path.is_dir() else None
  if owner is not None:
    if _running(owner):
      raise ValueError(
        f"{flag}={target} is being written by {owner['command']} (pid {owner['pid']}); wait "
        "for it to finish, or choose another directory."
      )
    _remove_in_place(path, existed=True)
    if (path / MARKER).exists():
      raise OSError(f"{flag}={target}: could not remove the interrupted {owner['command']}.")
    print(
      f"note: {flag}={target} held the unfinished output of an interrupted "
      f"{owner['command']}; removed it, writing it again.",
      file=sys.stderr,
      flush=True,
    )
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise ValueError(f"{flag}={target} already exists and is not empty; choose a new directory.")
  return path


def check_finished(path: epath.PathLike, flag: str) -> None:
  """ValueError if the directory `path` (given as `flag`) still holds a `MARKER`: its
  writer is still writing it, or was interrupted and left it incomplete."""
  resolved = workdir_lib.resolve(path)
  if not (resolved / MARKER).exists():
    return
  owner = _writer(resolved) or {"command": "command"}
  if _running(owner):
    raise ValueError(
      f"{flag}={path} is still being written by {owner['command']} (pid {owner['pid']}); "
      "wait for it to finish."
    )
  raise ValueError(
    f"{flag}={path} is the incomplete output of an interrupted {owner['command']} (it "
    f"still holds {MARKER}); rerun that command, which replaces it."
  )


def _remove_in_place(path: epath.Path, existed: bool) -> None:
  """Removes what was written into `path`, the marker last (so that an interrupted removal
  is still recognised), and `path` itself unless it `existed` before. Errors are ignored:
  what stays keeps its marker, and a rerun replaces it."""
  path = epath.Path(path)
  with contextlib.suppress(OSError):
    if not path.exists():
      return
    for child in list(path.iterdir()):
      if child.name != MARKER:
        link = not workdir_lib.is_remote(child) and os.path.islink(os.fspath(child))
        child.rmtree() if child.is_dir() and not link else child.unlink()
    (path / MARKER).unlink(missing_ok=True)
    if not existed:
      path.rmdir()


def remove_aside(path: epath.Path, existed: bool) -> None:
  """Removes the directory `path` while another thread may still write into it (a signal's
  cleanup): renamed aside to a hidden sibling first, so the writer's next files land there
  or in a fresh `path`, then removed; a `path` that reappears is removed again. An empty
  `path` is left in its place if it `existed` before the command."""
  if workdir_lib.is_remote(path):  # no atomic rename in a bucket
    _remove_in_place(path, existed)
    return
  name = os.fspath(path)
  for attempt in range(3):
    if not os.path.lexists(name):
      break
    aside = os.path.join(
      os.path.dirname(name), f".{os.path.basename(name)}.removing-{os.getpid()}-{attempt}"
    )
    try:
      os.rename(name, aside)
    except OSError:  # a mount point, say: empty it where it is
      _remove_in_place(path, existed=True)
      return
    shutil.rmtree(aside, ignore_errors=True)
  if existed:
    with contextlib.suppress(OSError):
      os.makedirs(name, exist_ok=True)


@contextlib.contextmanager
def writing(path: epath.Path, flag: str, command: str) -> Iterator[None]:
  """Within the block, the caller writes into the (new or empty) directory `path`, given
  as `flag`, for `command`: the block creates it and its `MARKER` first and removes the
  marker when the block ends; an exception removes what was written, and a signal that
  stops the process (`signals.cleanup_on_stop`) removes it too (`remove_aside`)."""
  path = epath.Path(path)
  existed = path.exists()
  finished: list[bool] = []  # once the marker goes, a signal no longer removes the finished output

  def cleanup() -> None:
    if not finished:
      remove_aside(path, existed)

  with signals.cleanup_on_stop(cleanup):
    try:
      try:
        path.mkdir(parents=True, exist_ok=True)
        owner = {
          "command": command,
          "host": socket.gethostname(),
          "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (path / MARKER).write_text(json.dumps(owner) + "\n")
      except OSError as error:
        raise OSError(f"{flag}={path} cannot be written: {error.strerror or error}.") from None
      yield
      finished.append(True)
      (path / MARKER).unlink()
    except BaseException:
      _remove_in_place(path, existed)
      raise
