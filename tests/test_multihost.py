"""Two processes × 4 CPU devices on localhost (jax.distributed, gloo) against one process × 8."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import REPO

from moejax.data import builtin
from moejax.data.store_writer import prepare
from moejax.training.metrics import read_metrics

ARGS = [
  "--config=configs/tiny.py:smoke",
  "--config.mesh.expert=4",
  "--config.model.group_size=32",
  "--config.train.num_steps=4",
  "--config.train.log_every=1",
  "--config.train.eval_every=4",
  "--config.train.checkpoint_every=2",
]


def _env(devices):
  """`devices` CPU devices, the tests' faster-compiling XLA flags (conftest.py) and most
  XLA optimisations off (as the smoke ablations train): the runs are compared with each
  other, and compiling takes most of their time."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  flags = os.environ.get("MOEJAX_TEST_XLA_FLAGS", "")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {flags}".strip()
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def bpe_store(tmp_path_factory):
  """The validation plays and chapters in the built-in BPE: a small store to train on."""
  out = str(tmp_path_factory.mktemp("stores") / "bpe")
  sources = ["tfds:shakespeare_plays:validation", "tfds:kjv_bible:validation"]
  prepare(sources, builtin.BPE_2048, out)
  return out


# Dropless on 4-way expert parallelism against one device: a round's buffer of half a
# device's rows makes every exchange take several rounds, and nothing may be dropped.
DROPLESS = [
  *(a for a in ARGS if "group_size" not in a),
  "--config.model.dispatch=dropless",
  "--config.model.dropless_buffer_factor=0.5",
]


@pytest.mark.parametrize("data", ["bytes", "bpe_store", "dropless", "two_slices"])
def test_two_processes_reproduce_one_process(tmp_path, data, request):
  """The byte corpus, and a BPE token store with document masking (each process reads
  only its rows of every global batch): one process of 8 devices. Dropless in rounds: one
  process of one device. Two slices (`hardware.num_slices=2`, a process each, joined
  along `data` by a hybrid mesh): one process of 8 devices."""
  args = DROPLESS if data == "dropless" else list(ARGS)
  if data == "bpe_store":
    store = request.getfixturevalue("bpe_store")
    args += [f"--config.data.tokens_dir={store}", "--config.data.eval_fraction=0.1"]
  single = tmp_path / "single"
  single_args, devices = args, 8
  if data == "dropless":
    single_args = [a for a in args if "mesh.expert" not in a] + ["--config.mesh.expert=1"]
    devices = 1
  result = subprocess.run(
    [sys.executable, "-m", "moejax.main", f"--workdir={single}", *single_args],
    cwd=REPO,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]

  multi = tmp_path / "multi"
  port = _free_port()
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "moejax.main",
        f"--workdir={multi}",
        *args,
        *(["--config.hardware.num_slices=2"] if data == "two_slices" else []),
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, err) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
    assert "dropless dropped" not in err

  one, two = read_metrics(str(single)), read_metrics(str(multi))
  assert [r["step"] for r in one] == [r["step"] for r in two]
  for a, b in zip(one, two, strict=True):
    for key in a:
      if key.startswith(("train/", "eval/")) and key not in ("train/tokens_per_sec",):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # Both processes wrote the checkpoint collectively; only process 0 wrote metrics.
  assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
  assert "validation:" in outputs[0][0] and "validation:" not in outputs[1][0]


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
  """SIGTERM to process 1 only: the flags are exchanged every 10 steps, so both processes
  stop at the same multiple of 10, write that step's checkpoint together and exit 0."""
  workdir = tmp_path / "multi"
  port = _free_port()
  args = [
    *ARGS,
    "--config.train.num_steps=100000",
    "--config.train.log_every=5",
    "--config.train.eval_every=100000",
    "--config.train.checkpoint_every=100000",
  ]
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "moejax.main",
        f"--workdir={workdir}",
        *args,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists():  # the training loop is running
    assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-3000:]
    assert time.time() < deadline, "the run never logged"
    time.sleep(0.1)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, err) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
    assert "dropless dropped" not in err
  steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  assert len(steps) == 1 and steps[0] % 10 == 0, steps
  assert f"stopped by a signal at step {steps[0]}" in outputs[0][0] + outputs[0][1]
