"""One run per workdir (`moejax.training.workdir_lock`): a second run is refused naming the owner,
a dead owner's lock is taken over (a finished run leaves no lock: `test_train.py`)."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
from etils import epath
from test_train import REPO

from moejax.training import workdir_lock
from moejax.training.workdir_lock import LOCK_FILE, WorkdirBusy


def write_lock(workdir, **owner):
  workdir.mkdir(exist_ok=True)
  record = dict(host=socket.gethostname(), pid=os.getpid(), pid_start=None, since=0.0)
  (workdir / LOCK_FILE).write_text(json.dumps({**record, **owner}))


@pytest.fixture
def live_process():
  """A process that runs for the test: a live owner on this host."""
  process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield process.pid
  process.kill()
  process.wait()


def dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_a_live_owner_refuses_a_second_run_by_name(tmp_path, live_process):
  write_lock(tmp_path, pid=live_process)
  with pytest.raises(WorkdirBusy, match=rf"in use by another run \(pid {live_process} on host"):
    workdir_lock.acquire(epath.Path(tmp_path))
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_process


def test_a_dead_owners_lock_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = dead_pid()
  write_lock(tmp_path, pid=pid)
  with caplog.at_level(logging.WARNING):
    owner = workdir_lock.acquire(epath.Path(tmp_path))
  assert f"no longer runs (pid {pid} on host" in caplog.text
  assert json.loads((tmp_path / LOCK_FILE).read_text()) == owner
  assert owner["pid"] == os.getpid() and sorted(os.listdir(tmp_path)) == [LOCK_FILE]
  workdir_lock.release(epath.Path(tmp_path), owner)
  assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_is_not_the_owner(tmp_path):
  """The recorded pid runs, but it started at another time: another process took the pid."""
  write_lock(tmp_path, pid=os.getpid(), pid_start="1")
  owner = workdir_lock.acquire(epath.Path(tmp_path))
  assert owner["pid_start"] != "1"


def test_another_hosts_lock_is_refused_with_the_file_to_delete(tmp_path):
  write_lock(tmp_path, host="elsewhere", pid=12345)
  with pytest.raises(WorkdirBusy, match=rf"pid 12345 on host elsewhere.*delete .*{LOCK_FILE}"):
    workdir_lock.acquire(epath.Path(tmp_path))


def test_a_second_run_exits_2_in_one_line_and_writes_nothing(tmp_path, live_process):
  """What a second `moejax.main` sees while the first trains: the first's lock."""
  workdir = tmp_path / "run"
  write_lock(workdir, pid=live_process)
  result = subprocess.run(
    [sys.executable, "-m", "moejax.main", "--config=configs/tiny.py:smoke", f"--workdir={workdir}"],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"pid {live_process}" in errors[0], result.stderr[-2000:]
  assert sorted(os.listdir(workdir)) == [LOCK_FILE]
