"""The ablations (`experiments/ablations/`): each runs at its smoke preset end to end, a
rerun skips finished arms and touches nothing, a half-finished arm resumes, the
parameter/FLOP constraint refuses a broken arm list, results.csv's accounting is
moejax.flops's, and the pod preset prints one reproducing command per arm and seed."""

import copy
import csv
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys

import pytest

from moejax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo on the path
  sys.path.insert(0, REPO)

from experiments.ablations import NAMES, get, presets, runner  # noqa: E402
from moejax import flops  # noqa: E402
from moejax import train as train_lib  # noqa: E402
from moejax.model import expert_d_ff_of, moe_layer_indices  # noqa: E402


def _files(root):
  """{path: mtime_ns} of every file under `root`."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      out[path] = os.stat(path).st_mtime_ns
  return out


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


class TrainSpy:
  """Wraps moejax.train.train_and_evaluate and records its calls."""

  def __init__(self, monkeypatch, fail=False):
    self.calls, self.fail = [], fail
    self._real = train_lib.train_and_evaluate
    monkeypatch.setattr(train_lib, "train_and_evaluate", self)

  def __call__(self, config, workdir, **kwargs):
    self.calls.append(workdir)
    if self.fail:
      raise AssertionError(f"trained {workdir} again")
    return self._real(config, workdir, **kwargs)


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("preset", runner.PRESETS)
@pytest.mark.parametrize("name", NAMES)
def test_every_ablation_meets_its_constraints(name, preset):
  ablation = get(name)
  arms, configs, rows, lines = runner.checked_arms(ablation, preset)
  assert len(arms) >= 3 and len(lines) == len(ablation.constraints)
  for arm in arms:
    config = configs[arm.name]
    for key, value in arm.overrides.items():
      section, leaf = key.split(".")
      assert config[section][leaf] == value
  # Same arm names at every preset, so that docs and results line up.
  assert [a.name for a in arms] == [a.name for a in runner.get_arms(ablation, "cpu")]


def _direct_ffn(m):
  """Expert/FFN weights by hand: 3 · d_model · hidden per SwiGLU FFN."""
  moe = len(moe_layer_indices(m.num_layers, m.num_experts, m.moe_layer_interval))
  dense = m.num_layers - moe
  per = 3 * m.d_model
  total = dense * per * m.d_ff + moe * per * m.num_experts * (expert_d_ff_of(m) if moe else 0)
  active = dense * per * m.d_ff + moe * per * m.top_k * (expert_d_ff_of(m) if moe else 0)
  return total, active


@pytest.mark.parametrize("name", NAMES)
def test_ffn_accounting_matches_a_direct_count(name):
  ablation = get(name)
  for arm in runner.get_arms(ablation, "cpu"):
    m = runner.arm_config(ablation, "cpu", arm).model
    assert m.activation == "swiglu" and m.num_shared_experts == 0
    ffn = runner.ffn_params(m)
    assert (ffn["total"], ffn["active"]) == _direct_ffn(m), arm.name
    # What is not FFN is attention, norms, embeddings and the router.
    params = flops.count_params(m)
    router = (
      m.d_model
      * m.num_experts
      * len(moe_layer_indices(m.num_layers, m.num_experts, m.moe_layer_interval))
    )
    assert params["total"] - ffn["total"] == params["active"] - ffn["active"]
    # ... and equals a dense model's count less its (width-1) FFNs.
    dense = copy.deepcopy(m)
    dense.num_experts, dense.d_ff = 0, 1
    backbone = flops.count_params(dense)["total"] - 3 * m.d_model * m.num_layers
    assert params["total"] - ffn["total"] - router == backbone


# ----------------------------------------------------------------------------- constraint


def _broken(name, arm_name, key, value):
  """`name`'s ablation with one override of one arm replaced."""
  ablation = get(name)

  def arms(preset):
    out = []
    for arm in ablation.arms(preset):
      if arm.name == arm_name:
        arm = dataclasses.replace(arm, overrides={**arm.overrides, key: value})
      out.append(arm)
    return out

  return dataclasses.replace(ablation, arms=arms)


def test_constraint_check_refuses_a_broken_arm_list(tmp_path, capsys):
  # e16_k2 with experts of 200 instead of 192: 4.2% more active and total expert params.
  ablation = _broken("top_k", "e16_k2", "model.expert_d_ff", 200)
  with pytest.raises(runner.ConstraintError) as error:
    runner.checked_arms(ablation, "cpu")
  message = str(error.value)
  assert "\n" not in message
  for part in ("'e16_k2'", "ffn_active", "614,400", "589,824", "'e8_k1'", "+4.17%", "±2%"):
    assert part in message, (part, message)
  # The runner refuses before it creates or trains anything.
  workdir = tmp_path / "top_k"
  with pytest.raises(runner.ConstraintError):
    runner.run_ablation(ablation, "cpu", str(workdir))
  assert not workdir.exists()
  # The CLI: exit code 2 and one line.
  assert runner.main(ablation, ["--preset=cpu", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: top_k/cpu: arm 'e16_k2'") and "\n" not in err
  # Within the tolerance (193 instead of 192: +0.52%) passes.
  runner.checked_arms(_broken("top_k", "e16_k2", "model.expert_d_ff", 193), "cpu")
  # Equal-FLOPs constraint: a dense arm twice as wide is refused, naming train_flops.
  wide = _broken("dense_vs_moe", "dense_eq_flops", "model.d_ff", 1024)
  with pytest.raises(runner.ConstraintError, match=r"'dense_eq_flops'.*train_flops"):
    runner.checked_arms(wide, "cpu")
  # Frequency: too few experts in the every-4 arm breaks the total-parameter constraint.
  with pytest.raises(runner.ConstraintError, match=r"'every_4'.*ffn_total"):
    runner.checked_arms(_broken("frequency", "every_4", "model.num_experts", 8), "cpu")


# ----------------------------------------------------------------------------- end to end


def _run_cli(name, *args):
  """`python -m experiments.ablations.NAME ARGS` on one CPU device (the test process has 8
  simulated ones, over which training would shard even the smoke models)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run(
    [sys.executable, "-m", f"experiments.ablations.{name}", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize("name", NAMES)
def test_smoke_ablation_end_to_end_and_rerun_skips(name, tmp_path, monkeypatch):
  ablation = get(name)
  workdir = str(tmp_path / name)
  done = _run_cli(name, "--preset=smoke", f"--workdir={workdir}", "--quiet")
  assert done.returncode == 0, done.stderr[-3000:]
  arms = runner.get_arms(ablation, "smoke")
  seeds = ablation.seeds["smoke"]
  expected = [(a.name, s) for a in arms for s in a.seeds_of(seeds)]
  for arm, seed in expected:
    assert f"{arm} seed {seed}: done in" in done.stdout

  columns, rows = _read_csv(os.path.join(workdir, "results.csv"))
  assert tuple(columns) == runner.RESULT_COLUMNS
  assert [(r["arm"], int(r["seed"])) for r in rows] == expected
  for row in rows:
    arm = next(a for a in arms if a.name == row["arm"])
    config = runner.arm_config(ablation, "smoke", arm, int(row["seed"]))
    assert json.loads(row["overrides"]) == dict(arm.overrides)
    params = flops.count_params(config.model)
    fwd = flops.flops_per_token(config.model, config.train.seq_len)["active"]
    tokens = config.train.num_steps * config.train.batch_size * config.train.seq_len
    assert int(row["params_total"]) == params["total"]
    assert int(row["params_active"]) == params["active"]
    assert int(row["flops_per_token"]) == fwd
    assert int(row["train_flops"]) == 3 * fwd * tokens
    assert int(row["tokens"]) == tokens
    ffn = runner.ffn_params(config.model)
    assert (int(row["ffn_total"]), int(row["ffn_active"])) == (ffn["total"], ffn["active"])
    for key in (
      "final_train_loss",
      "final_eval_loss",
      "final_eval_bits_per_byte",
      "tokens_per_sec",
      "train_dropped_fraction",
    ):
      assert math.isfinite(float(row[key])), key
    if config.model.num_experts:
      assert 1.0 <= float(row["expert_load_imbalance"]) <= config.model.num_experts
    else:
      assert row["expert_load_imbalance"] == "" and float(row["train_dropped_fraction"]) == 0
  for plot in ("eval_bits_per_byte.png", "train_loss.png"):
    with open(os.path.join(workdir, plot), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  assert all(f"`{a.name}`" in summary for a in arms) and "±2%" in summary

  # A rerun trains nothing and leaves every file as it was (same mtimes, no new files).
  before = _files(workdir)
  spy = TrainSpy(monkeypatch, fail=True)
  again = runner.run_ablation(ablation, "smoke", workdir, show_progress=False, log=lambda _: None)
  assert spy.calls == [] and again["skipped"] == expected and again["trained"] == []
  assert _files(workdir) == before
  # A different config in the same workdir is refused, naming the key.
  with pytest.raises(ValueError, match=r"different config \(train.num_steps: 4 there, 5 now"):
    runner.run_ablation(
      ablation,
      "smoke",
      workdir,
      base_overrides={"train.num_steps": 5},
      show_progress=False,
      log=lambda _: None,
    )
  with pytest.raises(ValueError, match="holds the 'smoke' preset"):
    runner.run_ablation(ablation, "cpu", workdir, show_progress=False, log=lambda _: None)
  assert _files(workdir) == before
  if name == "dense_vs_moe":
    _check_resume(ablation, workdir, "dense_eq_flops", rows)


def _check_resume(ablation, workdir, arm, rows):
  """Interrupted runs of `arm` (seed 0) are finished, not redone, and earlier results kept."""
  run_dir = os.path.join(workdir, arm, "seed_0")
  with open(os.path.join(workdir, "results.csv")) as f:
    first = f.read()
  (row,) = [r for r in rows if r["arm"] == arm]
  log = lambda _: None
  # Killed after its last step but before the marker: recognised, not retrained.
  os.remove(os.path.join(run_dir, "done.json"))
  assert (
    runner.run_ablation(ablation, "smoke", workdir, show_progress=False, log=log)["trained"] == []
  )
  assert os.path.exists(os.path.join(run_dir, "done.json"))
  # Killed after step 2 (its checkpoint kept, the final one lost): resumes from step 2.
  os.remove(os.path.join(run_dir, "done.json"))
  os.rename(os.path.join(run_dir, "checkpoints", "4"), os.path.join(workdir, "checkpoint_4"))
  again = _run_cli(ablation.name, "--preset=smoke", f"--workdir={workdir}", "--quiet")
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("resuming") == 1 and f"{arm} seed 0: resuming" in again.stdout
  assert again.stdout.count("finished earlier, skipped") == len(rows) - 1
  assert os.path.exists(os.path.join(run_dir, "metrics.jsonl.after_step_2"))  # moved, kept
  _, resumed = _read_csv(os.path.join(workdir, "results.csv"))
  (new,) = [r for r in resumed if r["arm"] == arm]
  assert float(new["final_eval_loss"]) == pytest.approx(float(row["final_eval_loss"]), rel=1e-5)
  # results.csv changed (tokens/s, wall time of the resumed run): the earlier one is kept.
  with open(os.path.join(workdir, "results.csv")) as f:
    if f.read() != first:
      with open(os.path.join(workdir, "results.csv.~1~")) as g:
        assert g.read() == first


def _one_arm_ablation():
  return runner.Ablation(
    name="one",
    title="one arm",
    base=presets.base_config,
    arms=lambda preset: [runner.Arm("dense", {"model.num_experts": 0})],
    constraints=(),
    seeds={"smoke": (0,), "cpu": (0,), "pod": (0,)},
    pod_config=presets.POD_CONFIG,
  )


def test_an_interrupted_run_stops_the_runner_unfinished(tmp_path, monkeypatch, capsys):
  """SIGINT/SIGTERM end train_and_evaluate with a checkpoint and preempted=True: the runner
  writes no marker, trains no further arm, and the CLI exits 130 saying to rerun."""
  calls = []

  def preempted(config, workdir, **kwargs):
    calls.append(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write('{"step": 1, "train/loss": 5.0}\n')
    return {"preempted": True}

  monkeypatch.setattr(train_lib, "train_and_evaluate", preempted)
  ablation, workdir = get("top_k"), str(tmp_path / "top_k")
  assert runner.main(ablation, ["--preset=smoke", f"--workdir={workdir}", "--quiet"]) == 130
  assert "interrupted; rerun the same command to resume" in capsys.readouterr().out
  assert calls == [os.path.join(workdir, "e8_k1", "seed_0")]
  assert not os.path.exists(os.path.join(calls[0], "done.json"))
  assert not os.path.exists(os.path.join(workdir, "results.csv"))  # nothing finished yet
  with pytest.raises(ValueError, match="no arm"):
    runner.run_ablation(ablation, "smoke", workdir, arms=("e9_k1",), log=lambda _: None)


def test_estimate_times_each_arm(capsys):
  out = runner.estimate(_one_arm_ablation(), "smoke", steps=1, log=print)
  arm = out["per_arm"]["dense"]
  assert arm["steps_per_s"] > 0 and arm["run_s"] > arm["compile_s"] > 0
  assert "projected" in capsys.readouterr().out


# ----------------------------------------------------------------------------- pod


def _parse_value(text, like):
  if isinstance(like, bool):
    return {"True": True, "False": False}[text]
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if like is None:
    return int(text) if text.lstrip("-").isdigit() else text
  return text


@pytest.mark.parametrize("name", NAMES)
def test_pod_preset_prints_one_reproducing_command_per_arm_and_seed(name, capsys, tmp_path):
  ablation = get(name)
  prefix = str(tmp_path / "pod")
  assert runner.main(ablation, ["--preset=pod", f"--workdir={prefix}", "--seeds=0,1"]) == 0
  commands = capsys.readouterr().out.strip().splitlines()
  arms = runner.get_arms(ablation, "pod")
  expected = [(a, s) for a in arms for s in a.seeds_of((0, 1))]
  assert len(commands) == len(expected)
  assert not os.path.exists(prefix)  # printed, not run
  for command, (arm, seed) in zip(commands, expected):
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "moejax.main"]
    assert f"--config={ablation.pod_config}" in words
    assert f"--workdir={prefix}/{arm.name}/seed_{seed}" in words
    config = load_config(ablation.pod_config)
    for word in words:
      if word.startswith("--config."):
        key, value = word[len("--config.") :].split("=", 1)
        section, leaf = key.split(".")
        config[section][leaf] = _parse_value(value, config[section][leaf])
    assert config.to_dict() == runner.arm_config(ablation, "pod", arm, seed).to_dict()
