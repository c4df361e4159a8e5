"""Faults a real run meets: SIGKILL, SIGTERM, corrupted checkpoints, a changed config,
non-finite losses, unwritable workdirs, missing data. Each against an uninterrupted run."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import REPO, smoke_config

from moejax import generate
from moejax.training import run_plan, train
from moejax.training.loading import load_model
from moejax.training.metrics import read_metrics


def run_config(**overrides):
  """`test_train.smoke_config` with the runs' aux-loss-free balancing (as `CLI_OVERRIDES`)."""
  return smoke_config(**{"model.score_fn": "sigmoid", "model.bias_update_rate": 0.01, **overrides})


def comparable(workdir):
  """{(step, name): value} of a run's metrics, leaving out wall-clock throughput."""
  return {
    (r["step"], k): v
    for r in read_metrics(workdir)
    for k, v in r.items()
    if k.startswith(("train/", "eval/")) and k != "train/tokens_per_sec"
  }


def assert_same_run(got, expected):
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=str(key))


CLI_OVERRIDES = [
  "--config.train.checkpoint_every=3",
  "--config.train.log_every=1",
  "--config.train.eval_every=6",
  "--config.train.keep_checkpoints=10",
  # Aux-loss-free balancing: a selection bias moved every step is state a resume must keep.
  "--config.model.score_fn=sigmoid",
  "--config.model.bias_update_rate=0.01",
]


def cli(workdir, *extra, wait=True):
  command = [
    sys.executable,
    "-m",
    "moejax.main",
    "--config=configs/tiny.py:smoke",
    f"--workdir={workdir}",
    *CLI_OVERRIDES,
    *extra,
  ]
  if not wait:
    return subprocess.Popen(
      command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def wait_for(path, process, timeout=240):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step CLI run."""
  workdir = tmp_path_factory.mktemp("reference")
  result = cli(workdir, "--config.train.num_steps=12")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_sigkill_mid_run_then_rerun_is_the_same_run(reference, tmp_path):
  """kill -9 at a random moment after the first checkpoint, then the same command again."""
  process = cli(tmp_path, "--config.train.num_steps=12", wait=False)
  wait_for(tmp_path / "checkpoints" / "3", process)
  time.sleep(random.uniform(0.0, 1.0))
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert process.returncode in (-signal.SIGKILL, 0)  # 0: it had finished already
  result = cli(tmp_path, "--config.train.num_steps=12")
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_run(comparable(tmp_path), comparable(reference))
  # The selection bias of the last checkpoint is the uninterrupted run's, bit for bit.
  biases = [selection_bias(run) for run in (tmp_path, reference)]
  np.testing.assert_array_equal(*biases)
  assert np.any(biases[0] != 0)


def selection_bias(workdir):
  model, _, step = load_model(workdir)
  assert step == 12
  return np.asarray(model.stacks[0].period.blocks[0].moe.selection_bias[...])


def test_sigterm_checkpoints_the_current_step_and_exits_zero(reference, tmp_path):
  process = cli(tmp_path, "--config.train.num_steps=100000", wait=False)
  wait_for(tmp_path / "checkpoints" / "3", process)
  sent = time.time()
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert time.time() - sent < 60
  assert "stopped by a signal" in stdout + stderr
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  last_logged = max(r["step"] for r in read_metrics(tmp_path))
  assert steps[-1] == last_logged, "the checkpoint is of the step the run stopped at"


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, caplog):
  shutil.copytree(reference, tmp_path / "run")
  workdir = tmp_path / "run"
  for step in ("12",):
    shutil.rmtree(workdir / "checkpoints" / step)
  (workdir / "checkpoints" / "9" / "state" / "manifest.ocdbt").write_text("corrupted")
  config = run_config(**{"train.num_steps": 12, "train.checkpoint_every": 3, "train.eval_every": 6})
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(workdir), show_progress=False)
  warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert warning and "step 9" in warning[0] and "resumed from step 6" in warning[0]
  assert os.path.exists(workdir / "checkpoints_unreadable" / "9" / "state")
  assert_same_run(comparable(workdir), comparable(reference))


def test_flipped_bytes_in_the_newest_checkpoint_are_caught_and_it_falls_back(
  reference, tmp_path, caplog
):
  """64 bytes flipped in the largest data file of the newest checkpoint: the checksums
  (or the finiteness check) catch it, the checkpoint is moved aside, and the run resumes
  from the one before and repeats the uninterrupted run."""
  shutil.copytree(reference, tmp_path / "run")
  workdir = tmp_path / "run"
  files = [p for p in (workdir / "checkpoints" / "12" / "state").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
  largest.write_bytes(bytes(data))
  config = run_config(**{"train.num_steps": 12, "train.checkpoint_every": 3, "train.eval_every": 6})
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, str(workdir), show_progress=False)
  warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert warning and "step 12" in warning[0] and "resumed from step 9" in warning[0], warning
  assert "its contents are corrupt" in warning[0], warning  # read, but not what was written
  assert os.path.exists(workdir / "checkpoints_unreadable" / "12" / "state")
  assert_same_run(comparable(workdir), comparable(reference))


def test_unreadable_checkpoints_never_restart_from_scratch(reference, tmp_path):
  shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
  for step in os.listdir(tmp_path / "checkpoints"):
    (tmp_path / "checkpoints" / step / "state" / "manifest.ocdbt").write_text("corrupted")
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(RuntimeError, match="none can be read"):
    train.train_and_evaluate(
      run_config(**{"train.num_steps": 12}), str(tmp_path), show_progress=False
    )
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_config_that_does_not_fit_names_the_parameters_and_touches_nothing(reference, tmp_path):
  shutil.copytree(reference, tmp_path / "run")
  workdir = tmp_path / "run"
  metrics_before = (workdir / "metrics.jsonl").read_text()
  result = cli(workdir, "--config.train.num_steps=20", "--config.model.num_experts=4")
  assert result.returncode == 2
  error = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and "does not fit the checkpoint" in error[0]
  assert "moe/experts/w_in (2, 8, 32, 32) -> (2, 4, 32, 32)" in error[0]  # 2 scanned layers
  assert (workdir / "metrics.jsonl").read_text() == metrics_before
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "3", "6", "9"]


@pytest.mark.parametrize("every", [1, 4])
def test_nonfinite_loss_stops_with_the_step_and_term(every, tmp_path):
  """Logging and checkpointing every step, the run stops at the bad step itself; every 4
  steps, the host learns of it at the next of those (steps run asynchronously), and
  writes no record or checkpoint of any step from the bad one on."""
  config = run_config(
    **{
      "train.num_steps": 8,
      "train.learning_rate": 1e30,
      "train.checkpoint_every": every,
      "train.log_every": every,
    }
  )
  with pytest.raises(
    FloatingPointError, match=r"step (\d+): non-finite .*(ce_loss|grad_norm)"
  ) as info:
    train.train_and_evaluate(config, str(tmp_path), show_progress=False)
  bad_step = int(info.value.args[0].split()[1].rstrip(":"))
  records = read_metrics(str(tmp_path)) if os.path.exists(tmp_path / "metrics.jsonl") else []
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  if every == 1:
    assert max(r["step"] for r in records) == bad_step - 1, "metrics before the bad step kept"
    assert steps[-1] == bad_step - 1, "no checkpoint holds the bad update"
  else:
    assert all(r["step"] < bad_step for r in records)
    assert all(s < bad_step for s in steps)
    if not steps:
      assert "no checkpoint had been written yet" in info.value.args[0]


def test_nonfinite_policy_skip_keeps_training_finite(tmp_path):
  config = run_config(
    **{"train.num_steps": 8, "train.learning_rate": 1e30, "train.nonfinite_policy": "skip"}
  )
  final = train.train_and_evaluate(config, str(tmp_path), show_progress=False)
  assert final["train/skipped_steps"] > 0
  model, _, step = generate.load_model(str(tmp_path))
  assert step == 8
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert np.isfinite(np.asarray(leaf)).all()


def test_same_seed_same_metrics(reference, tmp_path):
  result = cli(tmp_path, "--config.train.num_steps=12")
  assert result.returncode == 0
  got, expected = comparable(tmp_path), comparable(reference)
  assert got == expected, "bitwise identical on one machine"


@pytest.mark.parametrize(
  "args,needle,code",
  [
    (["--workdir={file}"], "is a file, not a directory", 2),
    (["--workdir={file}/sub"], "is a file; pass a directory path", 2),
    (["--config.data.name=lm1b", "--config.data.data_dir={tmp}/nodata"], "tfds build lm1b", 1),
    (["--config.train.nonfinite_policy=ignore"], "nonfinite_policy", 2),
    (["--config.train.batch_size=0"], "batch_size", 2),
  ],
)
def test_bad_input_exits_nonzero_with_one_line(args, needle, code, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  workdir = tmp_path / "w"
  extra = [a.format(file=a_file, tmp=tmp_path) for a in args]
  command = [
    sys.executable,
    "-m",
    "moejax.main",
    "--config=configs/tiny.py:smoke",
    f"--workdir={workdir}",
    *extra,
  ]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == code, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert a_file.read_text() == "keep me"
  assert not os.path.exists(workdir), "a failed check creates no workdir"


def test_rerunning_a_finished_run_prints_its_result(reference, tmp_path):
  shutil.copytree(reference, tmp_path / "run")
  before = (tmp_path / "run" / "metrics.jsonl").read_text()
  result = cli(tmp_path / "run", "--config.train.num_steps=12")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"already at step 12 of 12 in {tmp_path / 'run'}" in result.stdout
  final_eval = [r for r in read_metrics(reference) if "eval/bits_per_byte" in r][-1]
  assert f"validation: {final_eval['eval/bits_per_byte']:.3f} bits/byte" in result.stdout
  assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_a_changed_config_is_refused_or_continued_with_a_log(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  listing = sorted(os.listdir(workdir / "checkpoints"))
  result = cli(workdir, "--config.train.num_steps=12", "--config.model.renormalize=True")
  assert result.returncode == 2, result.stderr[-3000:]
  error = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and "model.renormalize False -> True" in error[0], result.stderr
  assert "--allow_config_change" in error[0]
  assert sorted(os.listdir(workdir / "checkpoints")) == listing
  assert not os.path.exists(workdir / "config_changes.jsonl")

  # When to log and how devices are laid out may change freely.
  layout = run_config(**{"train.num_steps": 12, "train.checkpoint_every": 3, "train.eval_every": 6})
  layout.train.log_every, layout.mesh.expert = 2, 2
  plan = run_plan.plan_run(layout, str(workdir))
  assert plan.changes == {"mesh.expert": (1, 2), "train.log_every": (1, 2)}

  config = run_config(**{"train.num_steps": 13, "train.checkpoint_every": 3, "train.eval_every": 6})
  config.model.renormalize = True
  with pytest.raises(ValueError) as refused:
    train.train_and_evaluate(config, str(workdir), show_progress=False)
  for change in ("train.num_steps 12 -> 13", "model.renormalize False -> True"):
    assert change in str(refused.value)
  train.train_and_evaluate(config, str(workdir), show_progress=False, allow_config_change=True)
  (logged,) = [json.loads(l) for l in (workdir / "config_changes.jsonl").read_text().splitlines()]
  assert logged == {
    "step": 12,
    "changes": {"model.renormalize": [False, True], "train.num_steps": [12, 13]},
  }
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["renormalize"] is True and saved["train"]["num_steps"] == 13
  assert max(r["step"] for r in read_metrics(workdir)) == 13


def _files(directory):
  return {
    os.path.relpath(os.path.join(root, name), directory): os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  }


def test_generate_and_eval_use_the_newest_readable_checkpoint(reference, tmp_path, caplog):
  """A truncated data file or a corrupt config in the newest checkpoint: the one before
  is used, with a warning naming the bad one, and nothing in the workdir changes."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for root, _, names in os.walk(workdir / "checkpoints" / "12" / "state"):
    for name in names:
      if "/d" in root.replace(os.sep, "/"):  # the array data files
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  (workdir / "checkpoints" / "9" / "config" / "metadata").write_text("")
  files = _files(workdir)
  with caplog.at_level(logging.WARNING):
    _, _, step = generate.load_model(str(workdir))
  assert step == 6
  warnings = [
    r.getMessage()
    for r in caplog.records
    if r.name.startswith("moejax") and "unreadable" in r.getMessage()
  ]
  assert "step 12" in warnings[0] and "step 9" in warnings[1], warnings
  assert not [r for r in caplog.records if r.name == "asyncio"], "no orphaned-read tracebacks"
  assert "checkpoints/9/config is not valid JSON" in warnings[1]
  result = subprocess.run(
    [sys.executable, "-m", "moejax.eval", f"--workdir={workdir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint at step 6" in result.stdout and "bits/byte" in result.stdout
  assert "checkpoint at step 12 is unreadable" in result.stderr
  assert _files(workdir) == files, "reading never changes the workdir"


def test_generate_with_no_readable_checkpoint_says_so_in_one_line(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for step in os.listdir(workdir / "checkpoints"):
    (workdir / "checkpoints" / step / "config" / "metadata").write_text("")
  result = subprocess.run(
    [sys.executable, "-m", "moejax.generate", f"--workdir={workdir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  error = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and "none can be read" in error[0], result.stderr[-3000:]
  assert "checkpoints/12/config is not valid JSON" in error[0]
  assert "Traceback" not in result.stderr


def test_a_second_sigint_stops_at_once_without_a_traceback(tmp_path):
  process = cli(tmp_path, "--config.train.num_steps=100000", wait=False)
  wait_for(tmp_path / "checkpoints" / "3", process)
  process.send_signal(signal.SIGINT)
  time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  if process.returncode == 0:  # the first one's checkpoint was done before the second came
    assert "stopped by a signal" in stderr
  else:
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "stopped at once by a second SIGINT" in stderr
  assert "Traceback" not in stderr
  plan = cli(tmp_path, "--config.train.num_steps=100000", "--dry_run")
  assert plan.returncode == 0, plan.stderr[-3000:]
  assert "the run would resume from step" in plan.stdout
