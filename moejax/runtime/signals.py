"""SIGINT and SIGTERM in the moejax commands, safe at any moment from their first line.

Only the standard library: an entry point calls `handle_signals()` before absl, jax or
anything else heavy is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass
class _State:
  """What the signal thread and the blocks that registered with it share (under `_lock`)."""

  installed: bool = False
  seen: int = 0  # signals taken since the listener was set
  listener: Callable[[int], None] | None = None  # `stop_requests`' on_first
  at_once_note: str = ""
  note: str = ""
  cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)
  thread: threading.Thread | None = None  # the one that takes the signals


_state = _State()
_lock = threading.Lock()
# Set once a signal is ending the process: the signal thread runs the cleanups, then exits.
_stopping = threading.Event()


def handle_signals(note: str | None = None) -> None:
  """Makes SIGINT and SIGTERM safe at any moment of a command, from its first line on.

  Both signals are blocked in every thread (threads started later, XLA's included,
  inherit that) and taken by one thread waiting for them. A Python signal handler would
  run only between the main thread's bytecodes, not inside an import, a compile or a wait
  for the device, and the KeyboardInterrupt it raises in the middle of those is what
  printed long tracebacks and sometimes crashed the interpreter on its way out.

  The first signal goes to the block that asked for it with `stop_requests` (the training
  loop: stop after this step, with a checkpoint). Otherwise, and at a second signal, the
  process runs the cleanups registered with `cleanup_on_stop` (the partial output of an
  import, upcycle or export), prints one line (`stopped by SIGINT; NOTE`) and ends at once
  with 128 + the signal number, as if killed: everything moejax writes survives a kill -9.
  `note` (kept when None) is what that line says next: what was lost, and the fix.
  """
  if note is not None:
    _state.note = note
  if _state.installed or threading.current_thread() is not threading.main_thread():
    return
  if multiprocessing.parent_process() is not None:
    return  # a command's worker process (spawned, it imports the command's module): its parent handles signals
  if hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    # A child made by fork() starts with the parent's mask but without its waiting thread.
    os.register_at_fork(
      after_in_child=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    )
    _state.thread = threading.Thread(target=_wait_for_signals, name="moejax-signals", daemon=True)
    _state.thread.start()
    atexit.register(yield_to_stop)
  else:  # no signal masks (Windows): handlers, run between the main thread's bytecodes
    for sig in _STOP_SIGNALS:
      signal.signal(sig, lambda signum, frame: _on_signal(signum))
  _state.installed = True


def signals_handled() -> bool:
  """Whether `handle_signals` runs this process's SIGINT/SIGTERM handling."""
  return _state.installed


def set_signal_note(note: str) -> None:
  """What the one line printed when a signal ends the process says next (the fix)."""
  _state.note = note


@contextlib.contextmanager
def stop_requests(on_first: Callable[[int], None], *, at_once_note: str) -> Iterator[None]:
  """Within the block, the first SIGINT/SIGTERM calls `on_first(signum)` (from the signal
  thread) instead of ending the process; a second one ends it at once, printing
  `stopped at once by a second SIGINT; AT_ONCE_NOTE`. Needs `handle_signals()`."""
  with _lock:
    _state.listener, _state.at_once_note, _state.seen = on_first, at_once_note, 0
  try:
    yield
  finally:
    with _lock:
      _state.listener = None


@contextlib.contextmanager
def cleanup_on_stop(cleanup: Callable[[], None]) -> Iterator[None]:
  """Within the block, a signal that ends the process runs `cleanup()` first (from the
  signal thread, while the main thread may still be writing or blocked in a read): the
  command removes what it wrote, so the same command can be rerun. Blocks nest; the
  innermost cleanup runs first. An exception in `cleanup` is ignored: the process ends."""
  with _lock:
    _state.cleanups.append(cleanup)
  try:
    yield
  finally:
    with _lock:
      _state.cleanups.remove(cleanup)


def yield_to_stop() -> None:
  """Returns at once, unless a signal is ending the process: then it waits for the signal
  thread to finish its cleanups and end the process (it never returns). The main thread
  calls it before it reports an error or exits: a cleanup removing a directory the main
  thread was writing makes that write fail, and neither that error nor the interpreter's
  exit may cut the cleanup short."""
  if _stopping.is_set() and threading.current_thread() is not _state.thread:
    threading.Event().wait()


def _wait_for_signals() -> None:
  while True:
    _on_signal(signal.sigwait(_STOP_SIGNALS))


def _on_signal(signum: int) -> None:
  name = signal.Signals(signum).name
  with _lock:
    _state.seen += 1
    listener, seen = _state.listener, _state.seen
    if listener is not None:
      message = f"stopped at once by a second {name}; {_state.at_once_note}"
    else:
      message = f"stopped by {name}" + (f"; {_state.note}" if _state.note else ".")
  if listener is not None and seen == 1:
    listener(signum)
    return
  _stopping.set()
  with _lock:
    cleanups = list(reversed(_state.cleanups))
  for cleanup in cleanups:
    with contextlib.suppress(Exception):
      cleanup()
  for stream in (sys.stdout, sys.stderr):  # what was printed so far, then the one line
    with contextlib.suppress(Exception):
      stream.flush()
  with contextlib.suppress(Exception):
    os.write(sys.stderr.fileno(), f"\n{message}\n".encode())
  os._exit(128 + signum)
