"""Keeping libraries' noise out of a command's one-line promise.

A failed run prints one line (`moejax.runtime.cli`); the libraries under it would print
their own account of the same failure around it, and sometimes keep the process alive:
- Orbax logs every failed background write with its traceback (through absl logging), and
  its save threads then wait out a 300 s coordination timeout for a step directory that was
  never created, holding the interpreter open after the error was reported.
- TensorStore's callbacks into a closed asyncio loop, after a failed write, print one
  `RuntimeError: Event loop is closed` traceback each (tens of them on a full disk), as
  unraisable exceptions.
- asyncio logs "Task exception was never retrieved", with a traceback, for each read or
  write Orbax abandoned when one array of a checkpoint failed (at any time: when the task
  is collected). These are dropped always, `--verbose` or not: the failure was reported.
- TFDS warns about its own cache layout (`Variant folder ... has no dataset_info.json`).

`--verbose` keeps the rest: the tracebacks are then what the user asked for.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import sys
import threading

# absl-logged records from these packages are shown only with --verbose: their failures
# reach the command as exceptions, reported in its one line.
_QUIET_PACKAGES = ("/orbax/", "/tensorflow_datasets/")


class _LibraryRecords(logging.Filter):
  """Drops records logged from inside `_QUIET_PACKAGES`, below CRITICAL."""

  def filter(self, record: logging.LogRecord) -> bool:
    inside = any(package in record.pathname for package in _QUIET_PACKAGES)
    return record.levelno >= logging.CRITICAL or not inside


_FILTER = _LibraryRecords()


def quiet_libraries(*, verbose: bool) -> None:
  """Unless `verbose`: library log records and closed-loop tracebacks are dropped."""
  absl_logger = logging.getLogger("absl")  # absl.logging's records pass through it
  if verbose:
    absl_logger.removeFilter(_FILTER)
    sys.excepthook, sys.unraisablehook = sys.__excepthook__, sys.__unraisablehook__
    return
  absl_logger.addFilter(_FILTER)

  def excepthook(kind, value, trace):
    if not _closed_loop(value):
      sys.__excepthook__(kind, value, trace)

  def unraisablehook(unraisable):
    if not _closed_loop(unraisable.exc_value):
      sys.__unraisablehook__(unraisable)

  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def _closed_loop(error: BaseException | None) -> bool:
  """asyncio's "Event loop is closed", from a callback a native library (TensorStore)
  scheduled on a loop Orbax had already closed after a failed write."""
  return type(error) is RuntimeError and str(error) == "Event loop is closed"


class _OrphanedOrbaxTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for tasks of Orbax's (named in
  the message, or raised from Orbax's code)."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith("Task exception was never retrieved"):
      return True
    if any(name in message for name in ("orbax", "async_deserialize", "async_serialize")):
      return False
    trace = record.exc_info[2] if record.exc_info else None
    while trace is not None:
      if "/orbax/" in trace.tb_frame.f_code.co_filename:
        return False
      trace = trace.tb_next
    return True


_ORPHANED = _OrphanedOrbaxTasks()


def drop_orphaned_orbax_tasks() -> None:
  """Installs `_OrphanedOrbaxTasks` on asyncio's logger (once)."""
  asyncio_logger = logging.getLogger("asyncio")
  if _ORPHANED not in asyncio_logger.filters:
    asyncio_logger.addFilter(_ORPHANED)


def abandoned_save_threads() -> list[threading.Thread]:
  """Orbax's save threads still alive (non-daemon: the interpreter would wait for them)."""
  return [
    thread
    for thread in threading.enumerate()
    if thread.is_alive() and not thread.daemon and type(thread).__module__.startswith("orbax.")
  ]


def end_failed_command(code: int, *, verbose: bool) -> None:
  """Ends a command that failed, with `code`, once its one line is printed. Unless
  `verbose`, what libraries print while the process ends (a late traceback of a write
  abandoned when the save failed) goes nowhere: stderr is closed to them. If a failed save
  left Orbax's threads waiting (they would time out only after 300 s), the exit handlers
  run (`atexit`) and the process ends without waiting for the threads; everything moejax
  writes survives a kill. Only for a process that ends here (a command's main)."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  if not verbose:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  if not abandoned_save_threads():
    sys.exit(code)
  with contextlib.suppress(Exception):
    atexit._run_exitfuncs()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  with contextlib.suppress(Exception):  # what native libraries buffered too
    ctypes.CDLL(None).fflush(None)
  os._exit(code)
