"""The ablation runner (`experiments/runner/`) without training: every ablation's arms meet
their constraints, accounting matches a count by hand, a broken arm list is refused, the
learning-rate sweep picks the rate a hand-made loss surface says, the contrasts, verdicts
and convergence check of summary.md match a hand calculation, the cpu preset evaluates the
whole validation split, and the pod preset prints reproducing commands. Training is
replaced by `FakeTraining`, which writes the metrics.jsonl a run would, from losses chosen
here; the real training runs in tests/test_ablations.py."""

import copy
import csv
import dataclasses
import json
import math
import os
import shlex

import pytest

from experiments.ablations import NAMES, get
from experiments.runner import presets, report, stats
from experiments.runner.accounting import accounting, checked_arms, ffn_params
from experiments.runner.cli import main
from experiments.runner.run import learning_rate_plan, run_ablation
from experiments.runner.spec import (
  PRESETS,
  SWEEP_SEED,
  Ablation,
  Arm,
  Constraint,
  ConstraintError,
  Contrast,
  arm_config,
  get_arms,
)
from moejax.config import load_config
from moejax.models import flops
from moejax.models.transformer import expert_d_ff_of, moe_layer_indices
from moejax.training import train as train_lib

QUIET = lambda _: None


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", NAMES)
def test_every_ablation_meets_its_constraints(name, preset):
  ablation = get(name)
  arms, configs, rows, lines = checked_arms(ablation, preset)
  assert len(arms) >= 2 and len(lines) == len(ablation.constraints)
  for arm in arms:
    config = configs[arm.name]
    for key, value in arm.overrides.items():
      section, leaf = key.split(".")
      assert config[section][leaf] == value
  # Same arm names at every preset, so that docs and results line up; the primary
  # contrast names two of them.
  assert [a.name for a in arms] == [a.name for a in get_arms(ablation, "cpu")]
  assert {ablation.primary.arm, ablation.primary.baseline} <= {a.name for a in arms}
  if preset == "cpu":
    assert len(ablation.seeds["cpu"]) >= (2 if name == "scaling" else 5)
    assert len(ablation.learning_rates["cpu"]) == 3
  if preset != "smoke":  # the pod and cpu presets train dropless unless capacity is the question
    for arm in arms:
      m = configs[arm.name].model
      assert m.num_experts == 0 or m.dispatch == "dropless" or name == "capacity", arm.name


def _direct_ffn(m):
  """Expert/FFN weights by hand: 3 · d_model · hidden per SwiGLU FFN."""
  moe = len(moe_layer_indices(m))
  dense = m.num_layers - moe + (moe if m.dense_moe_hybrid else 0)
  per = 3 * m.d_model
  e_ff = expert_d_ff_of(m) if moe else 0
  total = dense * per * m.d_ff + moe * per * m.num_experts * e_ff
  active = dense * per * m.d_ff + moe * per * m.top_k * e_ff
  return total, active


@pytest.mark.parametrize("name", NAMES)
def test_ffn_accounting_matches_a_direct_count(name):
  ablation = get(name)
  for arm in get_arms(ablation, "cpu"):
    config = arm_config(ablation, "cpu", arm)
    m = config.model
    assert m.activation == "swiglu" and m.num_shared_experts == 0
    ffn = ffn_params(m)
    assert (ffn["total"], ffn["active"]) == _direct_ffn(m), arm.name
    # What is not FFN is attention, norms, embeddings and the router.
    params = flops.count_params(m)
    router = m.d_model * m.num_experts * len(moe_layer_indices(m))
    dense = copy.deepcopy(m)
    dense.num_experts, dense.d_ff, dense.dense_moe_hybrid = 0, 1, False
    backbone = flops.count_params(dense)["total"] - 3 * m.d_model * m.num_layers
    assert params["total"] - ffn["total"] - router == backbone
    # Tokens per active parameter, by hand.
    tokens = config.train.num_steps * config.train.batch_size * config.train.seq_len
    assert accounting(config)["tokens_per_active_param"] == tokens / params["active"]


def _broken(name, arm_name, key, value):
  """`name`'s ablation with one override of one arm replaced."""
  ablation = get(name)

  def arms(preset):
    return [
      dataclasses.replace(a, overrides={**a.overrides, key: value}) if a.name == arm_name else a
      for a in ablation.arms(preset)
    ]

  return dataclasses.replace(ablation, arms=arms)


def test_constraint_check_refuses_a_broken_arm_list(tmp_path, capsys):
  # e16_k2 with experts of 200 instead of 192: 4.2% more active and total expert params.
  ablation = _broken("top_k", "e16_k2", "model.expert_d_ff", 200)
  with pytest.raises(ConstraintError) as error:
    checked_arms(ablation, "cpu")
  message = str(error.value)
  assert "\n" not in message
  for part in ("'e16_k2'", "ffn_active", "614,400", "589,824", "'e8_k1'", "+4.17%", "±2%"):
    assert part in message, (part, message)
  workdir = tmp_path / "top_k"
  with pytest.raises(ConstraintError):  # refused before anything is created
    run_ablation(ablation, "cpu", str(workdir), log=QUIET)
  assert not workdir.exists()
  assert main(ablation, ["--preset=cpu", f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: top_k/cpu: arm 'e16_k2'") and "\n" not in err
  checked_arms(_broken("top_k", "e16_k2", "model.expert_d_ff", 193), "cpu")  # +0.52%: passes
  wide = _broken("dense_vs_moe", "dense_eq_flops", "model.d_ff", 1024)
  with pytest.raises(ConstraintError, match=r"'dense_eq_flops'.*train_flops"):
    checked_arms(wide, "cpu")
  with pytest.raises(ConstraintError, match=r"'top1_every_2'.*ffn_total"):
    checked_arms(_broken("frequency", "top1_every_2", "model.num_experts", 8), "cpu")
  with pytest.raises(ConstraintError, match=r"'pure_moe'.*ffn_active"):
    checked_arms(_broken("hybrid", "pure_moe", "model.top_k", 2), "cpu")


def test_spec_refuses_what_the_runner_sets_and_dangling_names():
  top_k = get("top_k")
  bad_lr = _broken("top_k", "e8_k1", "train.learning_rate", 1e-3)
  with pytest.raises(ValueError, match="sets train.learning_rate"):
    get_arms(bad_lr, "cpu")
  dangling = dataclasses.replace(
    top_k, primary=dataclasses.replace(top_k.primary, baseline="e9_k1")
  )
  with pytest.raises(ValueError, match="names no arm 'e9_k1'"):
    get_arms(dangling, "cpu")
  with pytest.raises(ValueError, match="expected"):
    Contrast("a", "b", "better", "claim")


def test_a_row_counts_the_eval_batches_the_run_evaluated():
  """The fine-tuning arms evaluate on Lucrece: 20 batches, not the cap of 108 that the
  config carries; the row gives what the data pipeline builds."""
  from experiments import finetune
  from experiments.runner.results import eval_batches_of
  from moejax import data

  config = finetune.finetune_base("cpu", "WORKDIR/pretrain")
  t = config.train
  _, batches = data.build_datasets(
    config.data, global_batch_size=t.batch_size, seq_len=t.seq_len, seed=0
  )
  assert eval_batches_of(config) == len(batches) == 20 < config.data.eval_batches == 108
  assert eval_batches_of(presets.base_config("cpu")) == 108


def test_cpu_preset_evaluates_the_whole_validation_split():
  from moejax import data

  config = presets.base_config("cpu", cpu_steps=500)
  t = config.train
  texts = data.load_split("shakespeare_plays", "validation", None, text_key="text")
  windows = data.pack_documents(texts, t.seq_len)
  assert config.data.eval_batches == len(windows) // t.batch_size == 108
  assert len(windows) - 108 * t.batch_size < t.batch_size  # all but a partial batch
  # Evaluations at 40%, 80% and 100% of the steps: the last 20% slope is measured.
  assert (t.eval_every, t.num_steps) == (200, 500)
  assert config.model.dispatch == "dropless"
  with pytest.raises(ValueError, match="multiple of 5"):
    presets.base_config("cpu", cpu_steps=502)


# ----------------------------------------------------------------------------- sweep + report

# Paired differences B − A by seed (tests/test_ablation_stats.py works them out by hand:
# mean 0.020, 95% CI [0.010344, 0.029656], p 0.004535); C − A: differences with a CI
# across 0.
DIFF_B = (0.021, 0.024, 0.015, 0.030, 0.010)
DIFF_C = (0.004, -0.006, 0.002, -0.003, 0.001)
SEED_EFFECT = (0.0, 0.05, -0.02, 0.03, 0.01)
BEST_LR = {"A": 2e-3, "B": 4e-3}  # the train-CE minimum of each sweeping arm's surface


class FakeTraining:
  """Stands in for moejax.training.train.train_and_evaluate: writes the metrics.jsonl of a run
  whose final eval bits/byte is 2.0 + SEED_EFFECT + (arm C or B's difference to A), whose
  train CE is a parabola in log2(lr) with its minimum at BEST_LR, and whose eval curve
  fell by 0.005 over its second half."""

  def __init__(self, monkeypatch):
    self.calls = []
    monkeypatch.setattr(train_lib, "train_and_evaluate", self)

  def __call__(self, config, workdir, **kwargs):
    arm = os.path.basename(os.path.dirname(workdir))
    if arm.startswith("lr_"):  # WORKDIR/lr_sweep/ARM/lr_X/seed_S
      arm = os.path.basename(os.path.dirname(os.path.dirname(workdir)))
    t, seed = config.train, config.train.seed
    self.calls.append((arm, seed, t.learning_rate))
    index = seed if seed < len(SEED_EFFECT) else 0
    bpb = 2.0 + SEED_EFFECT[index] + {"A": 0.0, "B": DIFF_B[index], "C": DIFF_C[index]}[arm]
    best = BEST_LR.get(arm, BEST_LR["A"])
    ce = 1.5 + 0.1 * math.log2(t.learning_rate / best) ** 2 + SEED_EFFECT[index]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in range(1, t.num_steps + 1):
        record = {
          "step": step,
          "train/loss": ce + 0.01,
          "train/ce_loss": ce,
          "train/tokens_per_sec": 1000.0 * (2 if arm == "A" else 1),
          "train/dropped_fraction": 0.0,
        }
        f.write(json.dumps(record) + "\n")
        if step % t.eval_every == 0 or step == t.num_steps:
          late = 0.0 if step == t.num_steps else 0.005
          f.write(json.dumps({"step": step, "eval/loss": bpb, "eval/bits_per_byte": bpb + late}))
          f.write("\n")
    return {"preempted": False, "eval/bits_per_byte": bpb, "train/ce_loss": ce}


def _fake_ablation():
  def arms(preset):
    dense = {"model.num_experts": 0}
    return [
      Arm("A", dense, "reference"),
      Arm("B", dense, "worse by DIFF_B"),
      Arm("C", dense, "as A, its rate from A's sweep", lr_from="A"),
    ]

  return Ablation(
    name="fake",
    title="three arms",
    base=presets.base_config,
    arms=arms,
    constraints=(Constraint("tokens", 0.0),),
    seeds={"smoke": (0, 1, 2, 3, 4), "cpu": (0,), "pod": (0,)},
    primary=Contrast("B", "A", "higher", "B is worse than A."),
    secondary=(
      Contrast("B", "A", "lower", "B is better than A (a claim this data contradicts)."),
      Contrast("C", "A", "lower", "C is better than A."),
      Contrast("B", "A", "higher", "A runs faster.", metric="step_s"),
    ),
    learning_rates={"smoke": (1e-3, 2e-3, 4e-3), "cpu": (1e-3,), "pod": (1e-3,)},
    pod_config=presets.POD_CONFIG,
  )


def test_sweep_picks_the_rate_and_report_computes_the_contrasts(tmp_path, monkeypatch):
  fake, ablation, workdir = FakeTraining(monkeypatch), _fake_ablation(), str(tmp_path / "fake")
  out = run_ablation(ablation, "smoke", workdir, show_progress=False, log=QUIET)
  # The sweep: A and B at each rate (seed SWEEP_SEED), C none (it takes A's rate); then
  # every arm at every seed, at the rate of lowest train CE.
  sweep = [(a, s, lr) for a, s, lr in fake.calls if s == SWEEP_SEED]
  assert sweep == [(a, SWEEP_SEED, lr) for a in "AB" for lr in (1e-3, 2e-3, 4e-3)]
  assert out["learning_rates"] == {"A": 2e-3, "B": 4e-3, "C": 2e-3}
  assert fake.calls[6:] == [(a, s, out["learning_rates"][a]) for a in "ABC" for s in range(5)]
  with open(os.path.join(workdir, "C", "seed_3", "arm.json")) as f:
    assert json.load(f)["config"]["train"]["learning_rate"] == 2e-3
  sweep_rows = _read_csv(os.path.join(workdir, "lr_sweep.csv"))
  assert [(r["arm"], float(r["learning_rate"])) for r in sweep_rows] == [
    (a, lr) for a in "AB" for lr in (1e-3, 2e-3, 4e-3)
  ]

  contrasts = _read_csv(os.path.join(workdir, "contrasts.csv"))
  primary_eval, primary_ce = contrasts[0], contrasts[1]
  assert (primary_eval["contrast"], primary_eval["role"]) == ("B − A", "primary")
  assert primary_eval["metric"] == "final_eval_bits_per_byte" and int(primary_eval["n"]) == 5
  assert float(primary_eval["mean"]) == pytest.approx(0.020)
  assert float(primary_eval["lo"]) == pytest.approx(0.010344, abs=2e-6)
  assert float(primary_eval["hi"]) == pytest.approx(0.029656, abs=2e-6)
  assert float(primary_eval["p"]) == pytest.approx(0.004535, abs=2e-6)
  assert primary_eval["verdict"] == "reproduced"
  # Train CE beside it: B trains at its own best rate, so its CE equals A's (same seed
  # effect, parabola at its minimum): no difference at all.
  assert primary_ce["metric"] == "final_train_ce_loss" and float(primary_ce["mean"]) == 0
  by_name = {(c["contrast"], c["metric"], c["expected"]): c for c in contrasts}
  assert by_name["B − A", "final_eval_bits_per_byte", "lower"]["verdict"] == "contradicted"
  c_minus_a = by_name["C − A", "final_eval_bits_per_byte", "lower"]
  interval = stats.paired(DIFF_C)
  bound = max(abs(interval.lo), abs(interval.hi))
  assert c_minus_a["verdict"] == f"no effect larger than {bound:.4g} at this scale"
  assert by_name["B − A", "step_s", "higher"]["verdict"] == "reproduced"  # 2x the tokens/s
  # The pooled model over the three arms: the same table, fitted by stats.pooled.
  model = stats.pooled(
    {
      arm: {s: 2.0 + SEED_EFFECT[s] + diff[s] for s in range(5)}
      for arm, diff in (("A", (0,) * 5), ("B", DIFF_B), ("C", DIFF_C))
    }
  )
  pooled = model.contrast("B", "A")
  assert float(primary_eval["pooled_lo"]) == pytest.approx(pooled.lo)
  assert float(primary_eval["pooled_df"]) == 8 and float(primary_eval["pooled_f"]) == pytest.approx(
    model.f
  )

  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  for part in (
    "## Primary contrast (pre-registered): `B − A`",
    "[+0.0103, +0.0297]",
    "**reproduced**",
    "**contradicted**",
    # Both arms' eval fell by 0.005 over the last half (the last eval at or before 80% of
    # 4 steps is step 2): less than the effect tested, |mean| = 0.020.
    "Long enough: **yes**",
    "`A` 0.0050",
    "Pooled arm + seed model over all 3 arms",
    "## Learning-rate sweep (seed 1000)",
    "`B − A` (eval bits/byte) at each swept learning rate",
  ):
    assert part in summary, part

  # --collect_only rewrites the reports; with an estimate beside the runs, summary.md
  # compares: 21 runs of 10 s measured, 420 s estimated for 21 runs -> 0.50 per run.
  for directory, _, names in os.walk(workdir):
    if "done.json" in names:
      with open(os.path.join(directory, "done.json"), "w") as f:
        json.dump({"wall_s": 10.0}, f)
  estimate = {"total_s": 420.0, "measured_at": "then", "per_arm": {}}
  for arm, runs, step_s in (("A", 8, 0.1), ("B", 8, 0.3), ("C", 5, 0.2)):
    estimate["per_arm"][arm] = {"runs": runs, "step_s": step_s}
  with open(os.path.join(workdir, "estimate.json"), "w") as f:
    json.dump(estimate, f)
  assert main(ablation, ["--preset=smoke", f"--workdir={workdir}", "--collect_only"]) == 0
  with open(os.path.join(workdir, "summary.md")) as f:
    summary = f.read()
  assert "Measured: 3.5 min over 21 runs (10 s per run)." in summary
  assert "7.0 min for 21 runs; measured / estimated per run = 0.50." in summary
  # Step times: A logged 2000 tokens/s of 256-token steps, 128 ms (B, C 1000: 256 ms).
  assert "`A` 128 / 100, `B` 256 / 300, `C` 256 / 200" in summary
  assert os.path.exists(os.path.join(workdir, "summary.md.~1~"))  # the earlier one, kept

  # A rerun trains nothing and leaves every file as it was.
  before = {p: os.stat(os.path.join(workdir, p)).st_mtime_ns for p in os.listdir(workdir)}
  fake.calls.clear()
  again = run_ablation(ablation, "smoke", workdir, show_progress=False, log=QUIET)
  assert fake.calls == [] and again["trained"] == [] and len(again["skipped"]) == 21
  assert {p: os.stat(os.path.join(workdir, p)).st_mtime_ns for p in os.listdir(workdir)} == before
  # A fixed learning rate differs from what the seeds trained at: refused, naming the key.
  with pytest.raises(ValueError, match=r"train.learning_rate: 0.002 there, 0.003 now"):
    run_ablation(ablation, "smoke", workdir, learning_rates={"*": 3e-3}, log=QUIET)


def test_describe_prints_counts_and_the_learning_rate_plan(capsys):
  assert main(get("capacity"), ["--describe", "--preset=cpu"]) == 0
  out = capsys.readouterr().out
  assert "primary contrast: k1_cf1.0 − k1_dropless" in out
  # 400 steps x 32 x 128 = 1,638,400 tokens over 199,744 active parameters: 8.20.
  line = next(x for x in out.splitlines() if x.startswith("k1_cf1.25 "))
  assert "199,744" in line and " 8.20 " in line and "as k1_dropless" in line
  assert next(x for x in out.splitlines() if x.startswith("k2_dropless ")).split()[7] == "sweep"


def test_convergence_says_no_when_the_curve_still_falls_faster_than_the_effect():
  ablation = _fake_ablation()
  rows = [
    {"arm": arm, "seed": s, "eval_drop_last_20pct": 0.03} for arm in ("A", "B") for s in range(5)
  ]
  primary = {"mean": 0.02, "df": 4, "lo": 0.0103, "hi": 0.0297, "t": 5.7, "p": 0.0045, "n": 5}
  (line,) = report.convergence_lines(ablation, rows, primary)
  assert line.startswith("Long enough: **no**") and "0.0200" in line


def test_plot_colours_stay_distinct_past_ten_arms():
  # tab10 alone would give the 11th and 12th arms the 1st and 2nd arms' colours.
  assert len(set(report.arm_colors(12))) == 12
  assert len(set(report.arm_colors(3))) == 3


def test_learning_rate_plan():
  ablation = _fake_ablation()
  arms = get_arms(ablation, "smoke")
  assert learning_rate_plan(ablation, "smoke", arms, None) == {"A": "A", "B": "B", "C": "A"}
  assert learning_rate_plan(ablation, "smoke", arms, {"A": 5e-3}) == {
    "A": 5e-3,
    "B": "B",
    "C": 5e-3,
  }
  assert learning_rate_plan(ablation, "smoke", arms, {"*": 1e-3, "B": 2e-3}) == {
    "A": 1e-3,
    "B": 2e-3,
    "C": 1e-3,
  }
  assert learning_rate_plan(ablation, "cpu", arms, None) == {"A": 1e-3, "B": 1e-3, "C": 1e-3}
  with pytest.raises(ValueError, match="names no arm"):
    learning_rate_plan(ablation, "smoke", arms, {"D": 1e-3})


def test_an_interrupted_run_stops_the_runner_unfinished(tmp_path, monkeypatch, capsys):
  """SIGINT/SIGTERM end train_and_evaluate with a checkpoint and preempted=True: the runner
  writes no marker, trains no further run, and the CLI exits 130 saying to rerun."""
  calls = []

  def preempted(config, workdir, **kwargs):
    calls.append(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write('{"step": 1, "train/loss": 5.0}\n')
    return {"preempted": True}

  monkeypatch.setattr(train_lib, "train_and_evaluate", preempted)
  ablation, workdir = get("top_k"), str(tmp_path / "top_k")
  assert main(ablation, ["--preset=smoke", f"--workdir={workdir}", "--quiet"]) == 130
  assert "interrupted; rerun the same command to resume" in capsys.readouterr().out
  assert calls == [os.path.join(workdir, "e8_k1", "seed_0")]
  assert not os.path.exists(os.path.join(calls[0], "done.json"))
  assert not os.path.exists(os.path.join(workdir, "results.csv"))  # nothing finished yet
  with pytest.raises(ValueError, match="no arm"):
    run_ablation(ablation, "smoke", workdir, arms=("e9_k1",), log=QUIET)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--learning_rate=fast"], "--learning_rate 'fast': expected LR or ARM=LR"),
    (["--learning_rate=e8_k1=-1"], "a learning rate must be > 0"),
    (["--set", "train.learning_rate=0.1"], "--set train.learning_rate: use --learning_rate"),
    (["--set", "model.top_kk=3"], "'model.top_kk' is not a config key"),
  ],
)
def test_cli_errors_are_one_line_and_exit_2(args, message, tmp_path, capsys):
  code = main(get("top_k"), ["--preset=smoke", f"--workdir={tmp_path / 'w'}", *args])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err and message in err, err


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


def _check_command(command, ablation, run_dir, arm, seed, lr):
  words = shlex.split(command)
  assert words[:3] == ["python", "-m", "moejax.main"]
  assert f"--config={ablation.pod_config}" in words and f"--workdir={run_dir}" in words
  config = load_config(ablation.pod_config)
  for word in words:
    if word.startswith("--config."):
      key, value = word[len("--config.") :].split("=", 1)
      section, leaf = key.split(".")
      config[section][leaf] = _parse_value(value, config[section][leaf])
  assert config.to_dict() == arm_config(ablation, "pod", arm, seed, None, lr).to_dict()


@pytest.mark.parametrize("name", NAMES)
def test_pod_preset_prints_the_sweep_then_the_seed_commands(name, capsys, tmp_path):
  ablation = get(name)
  prefix = str(tmp_path / "pod")
  arms = get_arms(ablation, "pod")
  sweeping = [a for a in arms if a.lr_from is None]
  grid = ablation.learning_rates["pod"]
  assert main(ablation, ["--preset=pod", f"--workdir={prefix}", "--seeds=0,1"]) == 0
  out = capsys.readouterr()
  commands = out.out.strip().splitlines()
  assert len(commands) == len(sweeping) * len(grid) and "--learning_rate ARM=LR" in out.err
  expected = [(a, lr) for a in sweeping for lr in grid]
  for command, (arm, lr) in zip(commands, expected, strict=True):
    run_dir = f"{prefix}/lr_sweep/{arm.name}/lr_{lr:g}/seed_{SWEEP_SEED}"
    _check_command(command, ablation, run_dir, arm, SWEEP_SEED, lr)
  assert not os.path.exists(prefix)  # printed, not run
  # After the sweep: the chosen rates (inherited by `lr_from` arms) give the seed commands.
  chosen = ",".join(f"{a.name}={grid[1]}" for a in sweeping)
  assert (
    main(
      ablation, ["--preset=pod", f"--workdir={prefix}", "--seeds=0,1", f"--learning_rate={chosen}"]
    )
    == 0
  )
  commands = capsys.readouterr().out.strip().splitlines()
  assert len(commands) == 2 * len(arms)
  for command, (arm, seed) in zip(commands, [(a, s) for a in arms for s in (0, 1)], strict=True):
    _check_command(command, ablation, f"{prefix}/{arm.name}/seed_{seed}", arm, seed, grid[1])
