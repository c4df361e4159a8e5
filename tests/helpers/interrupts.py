"""A writing command stopped by SIGTERM right after its checkpoint, before its record file:
the moment a signal's cleanup has the most to remove."""

import signal
import subprocess
import sys

# Runs `python -m MODULE ARGS...` with the checkpoint save pausing after it wrote (and
# printing `saved`), so the parent can signal it there.
_CHILD = """
import runpy, sys, time
from moejax.runtime import signals
signals.handle_signals()  # before numpy's threads start, as the commands do
from moejax.training import checkpoint
save = checkpoint.Checkpointer.save_model
def save_then_wait(self, *args, **kwargs):
  save(self, *args, **kwargs)
  print("saved", flush=True)
  time.sleep(120)
checkpoint.Checkpointer.save_model = save_then_wait
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def stop_after_checkpoint(module: str, args: list[str], written) -> tuple[int, str]:
  """Runs `python -m module *args`, sends SIGTERM once it has saved its checkpoint into
  directory `written`, and returns (exit code, stderr)."""
  child = subprocess.Popen(
    [sys.executable, "-c", _CHILD, module, *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert child.stdout.readline() == "saved\n", child.stderr.read()[-2000:]
    assert (written / "checkpoints").is_dir()
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
  finally:
    child.kill()
  return child.returncode, stderr
