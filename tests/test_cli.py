"""The commands as a new user meets them: exit codes, one-line errors, --help, --print_config,
--dry_run, signals at start-up, and the run directory through etils.epath (local and a fake
gs:// bucket). Runs that train are in test_train.py and test_fault_tolerance.py."""

import importlib.util
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import tomllib

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from moejax import plot
from moejax.config import load_config
from moejax.runtime import cli
from moejax.training import checkpoint, run_plan, train, workdir
from moejax.training.metrics import MetricWriter, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/tiny.py:smoke"


def command(module, *args, timeout=120):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def the_error(result) -> str:
  """The one `error:` line of a failed command (asserting there is exactly one)."""
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize(
  "module,args,code,needles",
  [
    ("moejax.main", [], 2, ["--config is required (Experiment config file"]),
    # A config file that does not exist: the name of the closest one.
    ("moejax.main", ["--config=configs/tinyy.py", "--workdir={w}"], 2, ["configs/tiny.py"]),
    # A failing get_config: its message, on one line.
    ("moejax.main", ["--config=configs/tiny.py:bogus", "--workdir={w}"], 2, ["'bogus'"]),
    ("moejax.main", [SMOKE, "--workdri={w}"], 2, ["did you mean --workdir?"]),
    # --dry_run checks the dataset, its splits and the train values, reading no data.
    (
      "moejax.main",
      [SMOKE, "--workdir={w}", "--dry_run", "--config.data.eval_split=valdation"],
      2,
      ["config.data.eval_split='valdation'", "did you mean 'validation'?"],
    ),
    (
      "moejax.main",
      [SMOKE, "--workdir={w}", "--dry_run", "--config.train.warmup_steps=-10"],
      2,
      ["config.train.warmup_steps=-10 must be an integer in [0, train.num_steps=6)"],
    ),
    ("moejax.main", [SMOKE, "--workdir={w}", "--config.mesh.expert=3"], 2, ["mesh.expert=2"]),
    (
      "moejax.main",
      [SMOKE, "--workdir={w}", "--config.data.name=shakespear"],
      2,
      ["did you mean 'shakespeare_plays'"],
    ),
    ("moejax.main", [SMOKE, "--workdir={w}", "stray"], 2, ["unexpected argument 'stray'"]),
    (
      "moejax.generate",
      ["--workdir={w}", "--temperature=abc"],
      2,
      ["--temperature=abc", "expected a non-negative number"],
    ),
    ("moejax.generate", ["--workdir={w}", "--top_p=0"], 2, ["--top_p=0", "(0.0, 1.0]"]),
    ("moejax.generate", ["--workdir={w}", "--max_new_tokens=0"], 2, ["--max_new_tokens=0"]),
    ("moejax.generate", ["--workdir={w}"], 2, ["does not exist"]),
    ("moejax.generate", ["--workdir={tmp}/wrk"], 2, ["does not exist; did you mean", "/work?"]),
    ("moejax.eval", ["--workdir={tmp}"], 2, ["holds no checkpoints"]),
    ("moejax.plot", ["--workdir={tmp}"], 2, ["no metrics.jsonl"]),
  ],
)
def test_errors_are_one_line_with_the_fix_and_create_nothing(module, args, code, needles, tmp_path):
  (tmp_path / "work").mkdir()
  before = sorted(os.listdir(tmp_path))
  result = command(module, *[a.format(w=tmp_path / "w", tmp=tmp_path) for a in args])
  assert result.returncode == code, result.stderr[-3000:]
  error = the_error(result)
  for needle in needles:
    assert needle in error, error
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(tmp_path)) == before, "a failed command creates nothing"


def test_verbose_adds_the_traceback_and_keeps_the_exit_code(tmp_path):
  for args in (  # an error at parse time, and one at run time
    ["--config.train.num_steps=abc"],
    ["--config.train.batch_size=0"],
  ):
    quiet = command("moejax.main", SMOKE, f"--workdir={tmp_path}/w", *args)
    loud = command("moejax.main", SMOKE, f"--workdir={tmp_path}/w", *args, "--verbose")
    assert quiet.returncode == loud.returncode == 2, loud.stderr[-3000:]
    assert "Traceback" in loud.stderr and "Traceback" not in quiet.stderr
    assert the_error(quiet) in loud.stderr.splitlines()


def test_help_and_print_config_list_every_key_with_its_comment(tmp_path):
  result = command("moejax.main", SMOKE, "--print_config", "--config.model.top_k=1")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert any(re.fullmatch(r"model\.top_k = 1\s*(#.*)?", line) for line in lines), lines
  assert any(
    re.fullmatch(r"model\.d_ff = 64\s+# hidden size of the dense FFNs", line) for line in lines
  )
  assert any(line.startswith("train.num_steps = 6") for line in lines)
  help_ = command("moejax.main", "--help")
  assert help_.returncode == 0, help_.stderr[-3000:]
  for needle in (
    "--workdir",
    "--[no]verbose",
    "--[no]print_config",
    "model.top_k = 2",
    "train.seq_len",
  ):
    assert needle in help_.stdout, needle


def test_dry_run_says_what_would_happen_and_writes_nothing(tmp_path):
  result = command("moejax.main", SMOKE, f"--workdir={tmp_path}/w", "--dry_run")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "does not exist yet" in result.stdout and "parameters" in result.stdout
  assert "data=8, fsdp=1, expert=1" in result.stdout
  assert not os.path.exists(tmp_path / "w")


# A command whose cleanup takes a while after a signal, while its main thread fails (the
# cleanup removed what it was writing) or finishes: either way the cleanup runs to its end.
_SLOW_CLEANUP = """
import os, signal, sys, threading, time
from moejax.runtime import signals
signals.handle_signals("cleaned up.")
from moejax.runtime.cli import report_error
done = sys.argv[1]
def cleanup():
  time.sleep(1.0)
  open(done, "w").close()
with signals.cleanup_on_stop(cleanup):
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(0.2)  # the signal thread is in the cleanup now
  if sys.argv[2] == "fails":
    sys.exit(report_error(OSError("the directory being written is gone"), verbose=False))
"""


@pytest.mark.parametrize("main_thread", ["fails", "finishes"])
def test_a_stopping_signal_finishes_its_cleanup_whatever_the_main_thread_does(
  main_thread, tmp_path
):
  done = tmp_path / "cleaned"
  result = subprocess.run(
    [sys.executable, "-c", _SLOW_CLEANUP, str(done), main_thread],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 128 + signal.SIGTERM, result.stderr
  assert done.exists()
  assert result.stderr.strip() == "stopped by SIGTERM; cleaned up."


def test_a_signal_at_a_random_moment_of_start_up_ends_with_one_line(tmp_path):
  """SIGINT or SIGTERM during the imports, the config and data checks or the first compile."""
  rng = random.Random()
  for sig in (signal.SIGINT, signal.SIGTERM):
    delay = rng.uniform(0.2, 6.0)
    process = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "moejax.main",
        SMOKE,
        f"--workdir={tmp_path}/{sig.name}",
        "--config.train.num_steps=100000",
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    time.sleep(delay)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    context = f"{sig.name} after {delay:.2f}s: {stderr[-2000:]}"
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr, context
    if "stopped by a signal at step" in stdout + stderr:  # it came in the training loop
      assert process.returncode == 0, context
    else:
      assert process.returncode == 128 + sig, context
      assert f"stopped by {sig.name}; nothing is lost" in stderr, context


# ----------------------------------------------------------------------------- unit level


def test_exit_codes_and_one_line_messages():
  assert cli.exit_code(ValueError("x")) == cli.exit_code(KeyError("x")) == 2
  assert cli.exit_code(FileNotFoundError("x")) == cli.exit_code(RuntimeError("x")) == 1
  # TensorStore's ValueError on a full disk is a failed run, not a wrong command.
  full = ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")
  assert cli.exit_code(full) == 1
  assert cli.exit_code(ValueError("UNAVAILABLE: bucket unreachable")) == 1
  assert cli.one_line(KeyError("'a' is not a key")) == "'a' is not a key"
  assert cli.one_line(ValueError("two\n  lines")) == "two lines"
  assert cli.one_line(IndexError("out of range")) == "IndexError: out of range"


def test_preemption_flags_are_exchanged_every_n_steps_only(monkeypatch):
  gathered = []

  def allgather(value):
    gathered.append(int(value))
    return np.asarray([value, 0])

  monkeypatch.setattr(train.multihost_utils, "process_allgather", allgather)
  watch = train.PreemptionWatch(num_processes=2, sync_every=10)
  assert not any(watch.requested(step) for step in range(1, 25))
  assert len(gathered) == 2, "two exchanges in 24 steps, not one a step"
  watch._flag = True  # a signal arrives at step 25
  assert [s for s in range(25, 41) if watch.requested(s)] == [30, 40]


def test_fitting_meshes_are_the_ones_validate_mesh_accepts():
  config = load_config("configs/tiny.py:smoke")  # 8 experts, batch 8
  assert run_plan.fitting_meshes(config, 8) == [
    {"data": 8, "fsdp": 1, "expert": 1},
    {"data": 4, "fsdp": 1, "expert": 2},
    {"data": 2, "fsdp": 1, "expert": 4},
    {"data": 1, "fsdp": 1, "expert": 8},
  ]
  config.train.batch_size = 6
  assert run_plan.fitting_meshes(config, 8) == []
  config.model.num_experts, config.train.batch_size = 4, 8
  assert [m["expert"] for m in run_plan.fitting_meshes(config, 8)] == [1, 2, 4]


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_python_support_is_stated_the_same_in_pyproject_and_readme():
  project = _pyproject()["project"]
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  minimum = re.fullmatch(r">=3\.(\d+)", project["requires-python"]).group(1)
  assert f"Python 3.{minimum}+" in readme
  assert sys.version_info >= (3, int(minimum))
  extras = project["optional-dependencies"]
  for extra, wheel in (("cuda12", "jax[cuda12]"), ("tpu", "jax[tpu]")):
    assert any(d.startswith(wheel) for d in extras[extra]) and wheel in readme


def test_every_package_of_the_tree_is_installed():
  """pyproject.toml lists the packages (moejax.configs comes from configs/): a new package
  folder missing from the list would be left out of a wheel."""
  setuptools = _pyproject()["tool"]["setuptools"]
  on_disk = {
    os.path.relpath(root, REPO).replace(os.sep, ".")
    for root, _, files in os.walk(os.path.join(REPO, "moejax"))
    if "__init__.py" in files
  }
  assert set(setuptools["packages"]) == on_disk | {"moejax.configs"}
  assert setuptools["package-dir"] == {"moejax.configs": "configs"}
  assert os.path.isfile(os.path.join(REPO, "configs", "__init__.py"))


# ----------------------------------------------------------------------------- run directories


@pytest.mark.skipif(
  importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed: gs:// works"
)
def test_a_bucket_without_its_filesystem_package_names_the_extra():
  with pytest.raises(
    ValueError, match=r"gs:// paths need the gcs extra: pip install 'moejax\[gcs\]'"
  ):
    workdir.resolve("gs://bucket/run")


class FakeBucket(MemoryFileSystem):
  """An in-memory `gs://` filesystem for fsspec, which etils.epath uses for gs:// paths.
  Like a bucket, it cannot append to an object."""

  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return "/" + path.strip("/") if path.strip("/") else ""

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("objects cannot be appended to")
    return super()._open(path, mode, **kwargs)


def event_tags(data: bytes) -> set[str]:
  """The scalar tags in a TensorBoard event file (TFRecord framing: length, its CRC, the
  Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2

  tags, offset = set(), 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
    tags |= {value.tag for value in event.summary.value}
    offset += 12 + length + 4
  return tags


@pytest.fixture(params=["local", "gs"])
def run_dir(request, tmp_path):
  """A run directory on the local disk, or in a fake gs:// bucket reached the same way."""
  if request.param == "local":
    yield str(tmp_path / "run")
    return
  from etils.epath import backend

  registry = sys.modules["fsspec.registry"]._registry
  previous = {name: registry.get(name) for name in FakeBucket.protocol}
  for name in FakeBucket.protocol:
    fsspec.register_implementation(name, FakeBucket, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  FakeBucket.store.clear()
  FakeBucket.pseudo_dirs[:] = [""]
  try:
    yield "gs://bucket/run"
  finally:
    for name, implementation in previous.items():
      registry.pop(name, None)
      if implementation is not None:
        registry[name] = implementation
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_config_and_tensorboard_go_through_epath(run_dir):
  path = workdir.check(run_dir)
  assert str(path) == run_dir or not workdir.is_remote(run_dir)
  workdir.create(path)
  writer = MetricWriter(run_dir, resume_step=0)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step, "train/expert_load/layer_0": [0.25, 0.75]})
  writer.close()
  assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
  (events,) = list((path / "tensorboard").iterdir())
  tags = event_tags(events.read_bytes())
  assert {"train/loss", "train/expert_load/layer_0/expert_1"} <= tags, tags

  # Resuming from step 1: later records are set aside, not lost; new ones follow.
  writer = MetricWriter(run_dir, resume_step=1)
  writer.write(2, {"train/loss": 0.4})
  writer.close()
  assert [(r["step"], r["train/loss"]) for r in read_metrics(run_dir)] == [(1, 1.0), (2, 0.4)]
  aside = (path / "metrics.jsonl.after_step_1").read_text().splitlines()
  assert [json.loads(line)["step"] for line in aside] == [2, 3]

  config = load_config("configs/tiny.py:smoke")
  workdir.write_config(path, config, step=0, changes={})
  assert workdir.read_config(path)["train"]["num_steps"] == 6
  assert not (path / workdir.CONFIG_CHANGES_FILE).exists()

  written = plot.write_plots(run_dir)
  assert sorted(p.name for p in written) == ["dropped_fraction.png", "expert_load.png", "loss.png"]
  assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_incomplete_checkpoints_are_removed_with_a_note(run_dir, caplog):
  path = workdir.resolve(run_dir)
  stale = path / "checkpoints" / "8.orbax-checkpoint-tmp-1234"
  (stale / "state").mkdir(parents=True)
  (stale / "state" / "data").write_text("half")
  (path / "checkpoints" / "keep.txt").write_text("not a checkpoint")
  with caplog.at_level("WARNING"):
    assert [p.name for p in checkpoint.remove_incomplete(path / "checkpoints")] == [stale.name]
  assert not stale.exists() and (path / "checkpoints" / "keep.txt").exists()
  assert any(stale.name in r.getMessage() for r in caplog.records)


def test_a_metrics_line_cut_short_by_a_kill_is_set_aside(tmp_path):
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
  assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.0}]
  MetricWriter(tmp_path, resume_step=1).close()
  assert log.read_text() == '{"step": 1, "train/loss": 2.0}\n'
  assert (tmp_path / "metrics.jsonl.after_step_1").read_text() == '{"step": 2, "train/lo\n'


def test_a_key_added_since_a_run_was_saved_is_no_change_at_its_default():
  """A run saved before `model.remat` existed resumes while the key keeps its default."""
  from moejax.config import load_config
  from moejax.config import text as config_text

  now = config_text.as_json(load_config("configs/tiny.py"))
  saved = json.loads(json.dumps(now))
  del saved["model"]["remat"], saved["hardware"]
  assert config_text.differences(saved, now) == {}
  now["model"]["remat"] = "full"
  assert config_text.differences(saved, now) == {"model.remat": ("absent", "full")}
  del now["model"]["top_k"]
  assert config_text.differences(saved, now)["model.top_k"] == (2, "absent")


def test_a_config_saved_before_a_key_existed_reads_back_with_that_key_at_its_default():
  """What loading a model and collecting an ablation's results read a saved config with."""
  from moejax.config import load_config
  from moejax.config import text as config_text
  from moejax.models.transformer import validate_config

  config = load_config("configs/tiny.py", {"model.top_k": 1})
  saved = config_text.as_json(config)
  del saved["model"]["remat"], saved["hardware"]
  restored = config_text.from_saved(saved)
  validate_config(restored.model)  # raised KeyError('remat') on the bare saved dict
  assert restored.model.remat == "none" and restored.model.top_k == 1
  assert config_text.as_json(restored) == config_text.as_json(config)
