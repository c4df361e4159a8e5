"""A failed run ends promptly with its one line, and a run prints only its own lines:
- a checkpoint directory that cannot be created (as on an unwritable or full disk) ends the
  run within seconds, not after Orbax's 300 s coordination timeout, with one error line and
  no library tracebacks;
- `--quiet` leaves the result line only; a progress bar appears only on a terminal;
- on a host with no accelerator, jax is told before it starts (`runtime.platform`), so
  libtpu's probing messages never print."""

import os
import subprocess
import sys
import textwrap
import time

import pytest
from test_train import REPO

from moejax.runtime import cli, platform

TINY = ["--config=configs/tiny.py:smoke", "--config.train.warmup_steps=1"]

# Runs moejax.main with every creation of a step's temporary checkpoint directory failing
# as on an unwritable disk: Orbax creates it in a background thread, whose save threads
# then wait for a signal that never comes.
_FAILING_MKDIR = textwrap.dedent(
  """
  import errno, os, runpy, sys
  real_mkdir = os.mkdir
  def mkdir(path, *args, **kwargs):
    if str(path).endswith(".orbax-checkpoint-tmp") and "/checkpoints/" in str(path):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_mkdir(path, *args, **kwargs)
  os.mkdir = mkdir
  sys.argv = ["moejax.main", *sys.argv[1:]]
  runpy.run_module("moejax.main", run_name="__main__")
  """
)


# The same with every file capped at 100 kB (writes past it fail with EFBIG, as they would
# with ENOSPC on a full disk): TensorStore's write of the first checkpoint fails natively.
_CAPPED_FILES = textwrap.dedent(
  """
  import resource, runpy, signal, sys
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
  sys.argv = ["moejax.main", *sys.argv[1:]]
  runpy.run_module("moejax.main", run_name="__main__")
  """
)


def _main(args, *, script=None, timeout=240, env=None):
  command = (
    [sys.executable, "-c", script, *args]
    if script
    else [
      sys.executable,
      "-m",
      "moejax.main",
      *args,
    ]
  )
  start = time.monotonic()
  result = subprocess.run(
    command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
  )
  return result, time.monotonic() - start


def test_a_failed_checkpoint_write_ends_the_run_at_once_with_one_line(tmp_path):
  args = [*TINY, f"--workdir={tmp_path}", "--config.train.num_steps=4"]
  args.append("--config.train.checkpoint_every=2")
  result, seconds = _main(args, script=_FAILING_MKDIR)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "orbax-checkpoint-tmp" in errors[0], result.stderr[-2000:]
  assert "Permission denied" in errors[0]
  assert "Traceback" not in result.stderr and "E1" not in result.stderr
  # Before, Orbax's save threads held the process for their 300 s timeout.
  assert seconds < 120, seconds
  # Output to a pipe: the startup line, no progress bar.
  assert "step 0 of 4" in result.stdout + result.stderr
  assert "step/s" not in result.stderr


def test_a_failed_disk_write_is_one_line_and_exit_1(tmp_path):
  args = [*TINY, f"--workdir={tmp_path}", "--config.train.num_steps=4"]
  args.append("--config.train.checkpoint_every=2")
  # No compilation cache: its writes would fail the cap too, with warnings of their own.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  result, _ = _main(args, script=_CAPPED_FILES, env=env)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.splitlines()
  # Before: 285-576 lines of TensorStore's callbacks into a closed loop and Orbax's logs.
  assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines[-20:]
  assert "Traceback" not in result.stderr
  assert str(tmp_path / "checkpoints") in lines[-1] and "os_error_code='27'" in lines[-1]
  assert cli.exit_code(ValueError(lines[-1][len("error: ") :])) == 1


def test_quiet_prints_the_result_line_only(tmp_path):
  # A fresh data directory: TFDS's "Downloading and preparing" lines and its warnings about
  # its cache stay out of the output too.
  args = [*TINY, f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=2", "--quiet"]
  args.append(f"--config.data.data_dir={tmp_path / 'data'}")
  result, _ = _main(args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.splitlines() == [
    line for line in result.stdout.splitlines() if line.startswith("validation:")
  ]
  assert len(result.stdout.splitlines()) == 1
  assert result.stderr == ""


def test_platform_is_left_alone_when_chosen_or_when_an_accelerator_is_present(monkeypatch):
  assert not platform.cpu_only_host({"JAX_PLATFORMS": "tpu"})
  assert not platform.cpu_only_host({"JAX_FORCE_TPU_INIT": "1"})
  monkeypatch.setattr(platform, "has_google_pci_device", lambda: True)
  environ = {}
  assert not platform.settle_cpu_only_host(environ) and environ == {}
  monkeypatch.setattr(platform, "has_google_pci_device", lambda: False)
  monkeypatch.setattr(platform, "has_gpu_device_file", lambda: True)
  assert not platform.settle_cpu_only_host(environ) and environ == {}
  monkeypatch.setattr(platform, "has_gpu_device_file", lambda: False)
  environ = {"TPU_WORKER_HOSTNAMES": "host0"}
  assert platform.settle_cpu_only_host(environ)
  assert environ == {
    "JAX_PLATFORMS": "cpu",
    "TPU_ACCELERATOR_TYPE": "none",
    "TPU_WORKER_HOSTNAMES": "host0",  # a setting of the user's is kept
  }


@pytest.mark.skipif(
  platform.has_google_pci_device() or platform.has_gpu_device_file(),
  reason="this host has an accelerator",
)
def test_importing_moejax_first_keeps_libtpu_quiet_on_a_cpu_host():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
  probe = "import moejax, jax; print(jax.config.jax_platforms, jax.devices()[0].platform)"
  result = subprocess.run(
    [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["cpu", "cpu"]
  assert result.stderr == ""
