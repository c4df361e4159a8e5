"""Every ablation (`experiments/ablations/`) trains at its smoke preset (scaling: half its
arms) end to end through its command line; results.csv's accounting is moejax.models.flops's; a
rerun trains nothing and touches nothing; another config in the same workdir is refused;
a half-finished run resumes; and the wall-time estimator times real steps.

The runner's logic (sweep, contrasts, verdicts, pod commands) is tested without training
in tests/test_ablation_runner.py, its statistics in tests/test_ablation_stats.py."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments.ablations import NAMES, get
from experiments.runner import presets
from experiments.runner.estimate import estimate
from experiments.runner.results import RESULT_COLUMNS, read_results_csv
from experiments.runner.run import run_ablation
from experiments.runner.spec import Ablation, Arm, Contrast, arm_config, get_arms
from moejax.models import flops
from moejax.training import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda _: None
# Seeds of the smoke runs: two where a paired contrast can be computed end to end; one for
# the ablations with many arms (their statistics are tested without training).
SMOKE_SEEDS = {"capacity": "0", "scaling": "0"}
# Arms of the smoke runs: all of them, but 6 of scaling's 12 (`--arms`): every size and every
# expert count, the arms of both its contrasts, and 6 grid points for the law's 4 terms. Its
# other arms are the same models at other widths; every arm's config, constraints and
# accounting are checked without training in tests/test_ablation_runner.py.
SMOKE_ARMS = {
  "scaling": ("small_e1", "small_e4", "small_e64", "medium_e16", "large_e1", "large_e64"),
}


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by the smoke runs: the seeds of an arm
  compile the same programs, so all but the first load them (about 6 s -> 2 s a run)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _files(root):
  """{path: mtime_ns} of every file under `root`."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      out[path] = os.stat(path).st_mtime_ns
  return out


def _run_cli(name, cache, *args):
  """`python -m experiments.ablations.NAME ARGS` on one CPU device (the test process has 8
  simulated ones, over which training would shard even the smoke models), with the tests'
  faster-compiling XLA flags (conftest.py)."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("MOEJAX_TEST_XLA_FLAGS", ""))
  env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run(
    [sys.executable, "-m", f"experiments.ablations.{name}", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


class TrainSpy:
  """Wraps moejax.training.train.train_and_evaluate and fails if it is called."""

  def __init__(self, monkeypatch):
    self.calls = []
    monkeypatch.setattr(train_lib, "train_and_evaluate", self)

  def __call__(self, config, workdir, **kwargs):
    self.calls.append(workdir)
    raise AssertionError(f"trained {workdir} again")


@pytest.mark.parametrize("name", NAMES)
def test_smoke_ablation_end_to_end_and_rerun_skips(name, tmp_path, monkeypatch, compile_cache):
  ablation = get(name)
  workdir = str(tmp_path / name)
  seeds = SMOKE_SEEDS.get(name, "0,1")
  subset = SMOKE_ARMS.get(name)
  flags = ["--preset=smoke", f"--workdir={workdir}", "--quiet", f"--seeds={seeds}"]
  if subset:
    flags.append("--arms=" + ",".join(subset))
  done = _run_cli(name, compile_cache, *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  arms = [a for a in get_arms(ablation, "smoke") if subset is None or a.name in subset]
  expected = [(a.name, int(s)) for a in arms for s in seeds.split(",")]
  for arm, seed in expected:
    assert f"{arm} seed {seed}: done in" in done.stdout

  rows = read_results_csv(os.path.join(workdir, "results.csv"))
  with open(os.path.join(workdir, "results.csv")) as f:
    assert tuple(f.readline().strip().split(",")) == RESULT_COLUMNS
  assert [(r["arm"], r["seed"]) for r in rows] == expected
  for row in rows:
    arm = next(a for a in arms if a.name == row["arm"])
    config = arm_config(ablation, "smoke", arm, row["seed"])
    assert json.loads(row["overrides"]) == dict(arm.overrides)
    params = flops.count_params(config.model)
    fwd = flops.flops_per_token(config.model, config.train.seq_len)["active"]
    tokens = config.train.num_steps * config.train.batch_size * config.train.seq_len
    assert (row["params_total"], row["params_active"]) == (params["total"], params["active"])
    assert (row["flops_per_token"], row["train_flops"]) == (fwd, 3 * fwd * tokens)
    assert row["tokens"] == tokens and row["learning_rate"] == config.train.learning_rate
    for key in (
      "final_train_ce_loss",
      "final_eval_bits_per_byte",
      "step_s",
      "eval_drop_last_20pct",
    ):
      assert math.isfinite(row[key]), key
    assert row["eval_drop_from_step"] == 2  # the eval at or before 80% of 4 steps
    if config.model.num_experts:
      assert 1.0 <= row["expert_load_imbalance"] <= config.model.num_experts
      if config.model.dispatch == "dropless":
        assert row["train_dropped_fraction"] == 0 and math.isnan(row["capacity_factor"])
    else:
      assert math.isnan(row["expert_load_imbalance"]) and row["train_dropped_fraction"] == 0
  for plot in ("eval_bits_per_byte.png", "train_ce_loss.png"):
    with open(os.path.join(workdir, plot), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  assert all(f"`{a.name}`" in summary for a in arms)
  if subset:
    others = [a.name for a in get_arms(ablation, "smoke") if a.name not in subset]
    assert f"Not finished yet: {', '.join(others)}." in summary
  assert f"## Primary contrast (pre-registered): `{ablation.primary.name}`" in summary
  contrasts = read_results_csv(os.path.join(workdir, "contrasts.csv"))
  assert contrasts[0]["contrast"] == ablation.primary.name
  assert contrasts[0]["n"] == len(seeds.split(","))
  if contrasts[0]["n"] >= 2:
    assert contrasts[0]["verdict"] in ("reproduced", "contradicted") or contrasts[0][
      "verdict"
    ].startswith("no effect larger than")
  if name == "scaling":
    assert "## Scaling law (Clark et al. 2022)" in summary and "| c (log N · log E) |" in summary

  # A rerun trains nothing and leaves every file as it was (same mtimes, no new files).
  before = _files(workdir)
  spy = TrainSpy(monkeypatch)
  seed_list = [int(s) for s in seeds.split(",")]
  again = run_ablation(
    ablation, "smoke", workdir, seeds=seed_list, arms=subset, show_progress=False, log=QUIET
  )
  assert spy.calls == [] and again["skipped"] == expected and again["trained"] == []
  assert _files(workdir) == before
  if name == "top_k":
    # A different config in the same workdir is refused, naming the key; so is another preset.
    with pytest.raises(ValueError, match=r"different config \(train.num_steps: 4 there, 5 now"):
      run_ablation(ablation, "smoke", workdir, base_overrides={"train.num_steps": 5}, log=QUIET)
    with pytest.raises(ValueError, match="holds the 'smoke' preset"):
      run_ablation(ablation, "cpu", workdir, log=QUIET)
    assert _files(workdir) == before
  if name == "dense_vs_moe":
    monkeypatch.undo()
    _check_resume(ablation, workdir, "dense_eq_flops", rows, compile_cache)


def _check_resume(ablation, workdir, arm, rows, cache):
  """Interrupted runs of `arm` (seed 0) are finished, not redone, and earlier results kept."""
  run_dir = os.path.join(workdir, arm, "seed_0")
  with open(os.path.join(workdir, "results.csv")) as f:
    first = f.read()
  (row,) = [r for r in rows if r["arm"] == arm and r["seed"] == 0]
  # Killed after its last step but before the marker: recognised, not retrained.
  os.remove(os.path.join(run_dir, "done.json"))
  assert run_ablation(ablation, "smoke", workdir, show_progress=False, log=QUIET)["trained"] == []
  assert os.path.exists(os.path.join(run_dir, "done.json"))
  # Killed after step 2 (its checkpoint kept, the final one lost): resumes from step 2.
  os.remove(os.path.join(run_dir, "done.json"))
  os.rename(os.path.join(run_dir, "checkpoints", "4"), os.path.join(workdir, "checkpoint_4"))
  again = _run_cli(ablation.name, cache, "--preset=smoke", f"--workdir={workdir}", "--quiet")
  assert again.returncode == 0, again.stderr[-3000:]
  # One run resumed (": resuming": the runner's line, not the training loop's own).
  assert again.stdout.count(": resuming") == 1 and f"{arm} seed 0: resuming" in again.stdout
  assert again.stdout.count("finished earlier, skipped") == len(rows) - 1
  assert os.path.exists(os.path.join(run_dir, "metrics.jsonl.after_step_2"))  # moved, kept
  resumed = read_results_csv(os.path.join(workdir, "results.csv"))
  (new,) = [r for r in resumed if r["arm"] == arm and r["seed"] == 0]
  assert new["final_eval_loss"] == pytest.approx(row["final_eval_loss"], rel=1e-5)
  # results.csv changed (tokens/s, wall time of the resumed run): the earlier one is kept.
  with open(os.path.join(workdir, "results.csv")) as f:
    if f.read() != first:
      with open(os.path.join(workdir, "results.csv.~1~")) as g:
        assert g.read() == first


def test_estimate_times_each_arm_and_keeps_its_estimate(tmp_path, capsys):
  ablation = Ablation(
    name="one",
    title="one arm",
    base=presets.base_config,
    arms=lambda preset: [
      Arm("dense", {"model.num_experts": 0}),
      Arm("dense2", {"model.num_experts": 0}),
    ],
    constraints=(),
    seeds={"smoke": (0, 1), "cpu": (0,), "pod": (0,)},
    primary=Contrast("dense2", "dense", "lower", "none"),
    pod_config=presets.POD_CONFIG,
  )
  workdir = str(tmp_path / "one")
  out = estimate(ablation, "smoke", steps=2, arms=("dense",), workdir=workdir, log=print)
  arm = out["per_arm"]["dense"]
  assert arm["runs"] == 2 and arm["step_s"] > 0 and arm["checkpoint_s"] > 0
  # The projection, from its parts: 2 evals of 1 batch and 2 checkpoints in 4 steps.
  parts = out["data_s"] + arm["build_s"] + arm["compile_s"] + 4 * arm["step_s"]
  assert arm["run_s"] == pytest.approx(parts + 2 * arm["eval_batch_s"] + 2 * arm["checkpoint_s"])
  assert out["total_s"] == pytest.approx(2 * arm["run_s"])
  with open(os.path.join(workdir, "estimate.json")) as f:
    assert json.load(f)["total_s"] == pytest.approx(out["total_s"])
  assert "projected" in capsys.readouterr().out
