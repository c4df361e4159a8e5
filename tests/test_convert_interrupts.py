"""Imports, exports and upcycles that fail, are stopped by a signal or are killed outright
(`moejax.convert.output_dir`): what they wrote is removed, or marked so that readers refuse
it and the same command, rerun, replaces it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from helpers import hf_reference, interrupts
from moejax.convert import transfer
from moejax.runtime import signals
from moejax.training import init_from, output_dir
from moejax.training.loading import load_model


def test_a_writer_marks_its_directory_and_removes_what_it_wrote_on_failure_or_signal(tmp_path):
  """`output_dir.writing`: the marker is written first and removed last; an exception
  removes what was written (a directory given empty stays, empty); the cleanup a signal
  runs renames the directory aside and removes it, leaving nothing beside it."""
  path = tmp_path / "out"
  with output_dir.writing(path, "--to", "the command"):
    owner = json.loads((path / "WRITING").read_text())
    assert owner["command"] == "the command" and owner["pid"] == os.getpid()
    (path / "a").write_text("x")
    cleanup = signals._state.cleanups[-1]  # what the signal thread would run
  assert sorted(os.listdir(path)) == ["a"] and cleanup not in signals._state.cleanups
  cleanup()  # a signal after the block finished: the finished output stays
  assert sorted(os.listdir(path)) == ["a"]
  with pytest.raises(SystemExit), output_dir.writing(tmp_path / "stopped", "--to", "c"):
    (tmp_path / "stopped" / "a").write_text("x")
    signals._state.cleanups[-1]()  # the signal thread, while the writer writes
    assert not (tmp_path / "stopped").exists()
    raise SystemExit  # where the signal thread ends the process
  (tmp_path / "empty").mkdir()
  for target in (tmp_path / "new", tmp_path / "empty"):
    with pytest.raises(OSError, match="disk full"), output_dir.writing(target, "--to", "c"):
      (target / "sub").mkdir()
      (target / "sub" / "f").write_text("x")
      raise OSError("disk full")
  assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []
  for existed in (False, True):
    target = tmp_path / f"stopped_{existed}"
    (target / "sub").mkdir(parents=True)
    (target / "WRITING").write_text("{}")
    output_dir.remove_aside(target, existed)
    assert (list(target.iterdir()) == []) if existed else not target.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out", "stopped_True"]


def _mark(run, pid: int) -> None:
  """`run` as a writer with process id `pid` leaves it while writing (or killed -9)."""
  owner = {"command": "python -m moejax.convert import", "host": socket.gethostname(), "pid": pid}
  (run / "WRITING").write_text(json.dumps(owner))


def test_an_interrupted_import_is_refused_by_readers_and_replaced_by_its_rerun(tmp_path, capfd):
  """A kill -9 between the checkpoint and import.json leaves a directory that looks
  finished: its WRITING marker keeps export (which would lose the imported dtypes) from
  reading it, and the rerun replaces it with a note, unless its writer still runs."""
  source = tmp_path / "hf"
  source.mkdir()
  written = hf_reference.write_checkpoint(source, hf_reference.tiny_config("qwen3_moe"))
  run = tmp_path / "run"
  transfer.import_checkpoint(source, run)
  gone = subprocess.Popen([sys.executable, "-c", ""])
  gone.wait()
  (run / "import.json").unlink()
  _mark(run, gone.pid)
  readers = (
    ("--workdir", transfer.origin_record),
    ("--workdir", lambda w: transfer.export_checkpoint(w, tmp_path / "out")),
    ("--workdir", load_model),  # moejax.load, eval, generate
    ("config.train.init_from", lambda w: init_from.check_init_from(w, None)),
  )
  for setting, read in readers:
    with pytest.raises(ValueError) as error:
      read(run)
    assert str(error.value) == (
      f"{setting}={run} is the incomplete output of an interrupted python -m moejax.convert "
      "import (it still holds WRITING); rerun that command, which replaces it."
    )
  assert not (tmp_path / "out").exists()

  _mark(run, os.getppid())  # a live writer's directory is not taken from it
  with pytest.raises(ValueError, match=rf"--workdir={run} is being written by .*\(pid \d+\)"):
    transfer.import_checkpoint(source, run)
  _mark(run, gone.pid)
  capfd.readouterr()
  transfer.import_checkpoint(source, run)
  assert f"note: --workdir={run} held the unfinished output of an interrupted" in (
    capfd.readouterr().err
  )
  assert (run / "import.json").exists() and not (run / "WRITING").exists()
  transfer.export_checkpoint(run, tmp_path / "out")
  with safe_open(str(tmp_path / "out" / "model.safetensors"), "numpy") as f:
    assert all(f.get_tensor(k).dtype == written[k].dtype for k in f.keys())  # noqa: SIM118

  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "WRITING").write_text("my notes")  # not a marker: never removed
  with pytest.raises(ValueError, match="already exists and is not empty"):
    transfer.import_checkpoint(source, tmp_path / "mine")
  assert (tmp_path / "mine" / "WRITING").read_text() == "my notes"


def test_an_import_stopped_by_a_signal_removes_what_it_wrote(tmp_path):
  """The signal's cleanup runs (from the signal thread, the main thread still inside the
  save): the directory is gone, the one line says so, and the same command works again."""
  source = tmp_path / "hf"
  source.mkdir()
  hf_reference.write_checkpoint(source, hf_reference.tiny_config("olmoe"))
  run = tmp_path / "run"
  args = ["import", f"--from={source}", f"--workdir={run}"]
  code, stderr = interrupts.stop_after_checkpoint("moejax.convert", args, run)
  assert code == 128 + signal.SIGTERM, stderr[-2000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left, nothing aside
  assert stderr.strip().splitlines()[-1] == (
    "stopped by SIGTERM; what was written to --workdir is removed: rerun the same command."
  )
  assert transfer.import_checkpoint(source, run)["family"] == "olmoe"
  assert np.all([(run / name).exists() for name in ("import.json", "config.json")])
