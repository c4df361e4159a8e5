"""One run per workdir: a lock file that names its owner.

A training run holds `WORKDIR/run.lock` from before its first write to its end (with
several processes, process 0 holds it). The file is JSON: the owner's host, pid, and the
pid's start time on that host (so a reused pid is not taken for the owner).

* A second run on the workdir is refused in one line naming the owner (`WorkdirBusy`,
  a `ValueError`: the command is wrong, exit 2), and writes nothing.
* A lock left by a process that no longer runs on this host (killed with `kill -9`, or
  its machine restarted) is stale: the next run takes it over, with a warning naming it.
* A lock from another host cannot be checked from here: it is refused like a live one,
  and the message says which file to delete once that run is known to be gone.

Local workdirs are locked atomically (`O_CREAT | O_EXCL`). A bucket (`gs://`) has no
exclusive create through `etils.epath`: there the lock is checked, then written, which
catches a second run started later but not two started in the same instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time

from etils import epath

from moejax.training.workdir import is_remote

LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


class WorkdirBusy(ValueError):
  """Another run holds the workdir."""


def _start_time(pid: int) -> str | None:
  """The start time of process `pid` on this host (Linux `/proc`), None when unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22, after the command name in parentheses (which may hold spaces).
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _owner() -> dict:
  pid = os.getpid()
  return dict(host=socket.gethostname(), pid=pid, pid_start=_start_time(pid), since=time.time())


def _is_alive(owner: dict) -> bool | None:
  """Whether the lock's owner still runs: True or False on this host, None elsewhere."""
  if owner.get("host") != socket.gethostname():
    return None
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  recorded = owner.get("pid_start")
  return recorded is None or _start_time(pid) in (None, recorded)


def _describe(owner: dict) -> str:
  since = owner.get("since")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
  return f"pid {owner.get('pid')} on host {owner.get('host')}, since {when}"


def _read(path: epath.Path) -> dict:
  try:
    owner = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # being written, or not ours: treated as a live owner we cannot name
  return owner if isinstance(owner, dict) else {}


def _create(path: epath.Path, owner: dict) -> bool:
  """Writes `owner` to `path` if no file is there; False if one is."""
  text = json.dumps(owner)
  if is_remote(path):
    if path.exists():
      return False
    path.write_text(text)
    return True
  try:
    fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return True


def acquire(workdir: epath.Path) -> dict:
  """Takes the workdir's lock for this process (taking over a stale one) and returns the
  owner record written; raises `WorkdirBusy` when another run holds it."""
  path = workdir / LOCK_FILE
  owner = _owner()
  for _ in range(3):  # a stale lock moved aside by another taker: try again
    if _create(path, owner):
      return owner
    held = _read(path)
    alive = _is_alive(held) if held else True
    if alive is False:
      stale = workdir / f"{LOCK_FILE}.stale-{held.get('pid')}"
      with contextlib.suppress(OSError):
        path.rename(stale)
        log.warning("took over the lock of a run that no longer runs (%s)", _describe(held))
        stale.unlink()
      continue
    where = "" if alive else f"; if that run is gone, delete {path}"
    raise WorkdirBusy(
      f"--workdir={workdir} is in use by another run ({_describe(held) if held else 'unknown'})"
      f"{where}; wait for it, or pass another --workdir."
    )
  raise WorkdirBusy(f"--workdir={workdir}: could not take its lock {path}; try again.")


def release(workdir: epath.Path, owner: dict) -> None:
  """Removes the lock if it is still `owner`'s."""
  path = workdir / LOCK_FILE
  if _read(path) == json.loads(json.dumps(owner)):
    with contextlib.suppress(OSError):
      path.unlink()
