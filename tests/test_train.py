"""The main job end to end on the smoke preset: metrics, checkpoints, exact resume, CLI, sampling."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import generate
from moejax.config import load_config
from moejax.data import EOS_ID
from moejax.moe import MoeLayer
from moejax.training import steps, train
from moejax.training.metrics import read_metrics
from moejax.training.tree_paths import flat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
  config = load_config("configs/tiny.py:smoke")
  config.train.num_steps, config.train.checkpoint_every, config.train.keep_checkpoints = 8, 2, 10
  config.train.log_every, config.train.eval_every = 1, 4
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One smoke run shared by the tests below: 8 steps, checkpoints every 2."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = smoke_config()
  final = train.train_and_evaluate(config, workdir, show_progress=False)
  return workdir, config, final


def test_metrics_file_has_the_documented_records(trained):
  workdir, config, final = trained
  records = read_metrics(workdir)
  train_records = [r for r in records if "train/loss" in r]
  eval_records = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in train_records] == list(range(1, 9))
  assert [r["step"] for r in eval_records] == [4, 8]
  for r in train_records:
    for name in (
      "train/ce_loss",
      "train/lb_loss",
      "train/z_loss",
      "train/dropped_fraction",
      "train/tokens_per_sec",
      "train/learning_rate",
    ):
      assert np.isfinite(r[name]), name
    # The objective is CE + Σ over the 2 MoE layers of 0.01·LB + 0.001·Z (the default
    # weights, per MoE layer); the LB and Z metrics are the per-layer means.
    expected = r["train/ce_loss"] + 2 * (0.01 * r["train/lb_loss"] + 0.001 * r["train/z_loss"])
    assert r["train/loss"] == pytest.approx(expected, rel=1e-5)
    loads = [r[f"train/expert_load/layer_{i}"] for i in (0, 1)]
    for load in loads:
      assert len(load) == config.model.num_experts and sum(load) == pytest.approx(1.0, abs=1e-3)
  for r in eval_records:
    # Bits per byte is the byte-target cross-entropy in base 2; with few specials it
    # sits close to loss / ln 2.
    assert r["eval/bits_per_byte"] == pytest.approx(r["eval/loss"] / math.log(2), rel=0.05)
  assert train_records[-1]["train/loss"] < train_records[0]["train/loss"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert final["eval/loss"] == eval_records[-1]["eval/loss"]


def test_a_finished_run_leaves_no_workdir_lock(trained):
  workdir, config, _ = trained
  assert not os.path.exists(os.path.join(workdir, "run.lock"))
  train.train_and_evaluate(config, workdir, show_progress=False)  # already finished
  assert not os.path.exists(os.path.join(workdir, "run.lock"))


def test_learning_rate_follows_warmup_then_cosine(trained):
  workdir, config, _ = trained
  lr = [r["train/learning_rate"] for r in read_metrics(workdir) if "train/learning_rate" in r]
  peak, warmup, steps = (
    config.train.learning_rate,
    config.train.warmup_steps,
    config.train.num_steps,
  )
  floor = peak * config.train.min_learning_rate_ratio
  for step, value in enumerate(lr):  # the rate used by update number `step`
    if step < warmup:
      expected = peak * step / warmup
    else:
      progress = (step - warmup) / (steps - warmup)
      expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_keeps_the_last_checkpoints(tmp_path):
  config = smoke_config(
    **{"train.num_steps": 6, "train.keep_checkpoints": 2, "train.eval_every": 6}
  )
  train.train_and_evaluate(config, str(tmp_path), show_progress=False)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [4, 6]


def test_resume_reproduces_the_uninterrupted_run(trained, tmp_path):
  """Drop the checkpoints after step 4 and rerun: steps 5-8 must be recomputed exactly."""
  workdir, config, _ = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  for step in ("6", "8"):
    shutil.rmtree(os.path.join(copy, "checkpoints", step))
  train.train_and_evaluate(config, copy, show_progress=False)
  original = {
    (r["step"], k): v
    for r in read_metrics(workdir)
    for k, v in r.items()
    if k.startswith(("train/", "eval/")) and k != "train/tokens_per_sec"
  }
  resumed = {
    (r["step"], k): v
    for r in read_metrics(copy)
    for k, v in r.items()
    if k.startswith(("train/", "eval/")) and k != "train/tokens_per_sec"
  }
  assert original.keys() == resumed.keys()
  for key, value in original.items():
    np.testing.assert_allclose(resumed[key], value, rtol=1e-6, err_msg=str(key))
  # The records of steps 5-8 written before the "interruption" were set aside, not lost.
  with open(os.path.join(copy, "metrics.jsonl.after_step_4")) as f:
    assert sorted({json.loads(l)["step"] for l in f}) == [5, 6, 7, 8]
  # Throughput leaves the compile out: counted in, the first record after the resume would
  # show about a thousandth of the usual rate (seconds of compile against milliseconds).
  usual = np.median(
    [r["train/tokens_per_sec"] for r in read_metrics(workdir)[1:] if "train/loss" in r]
  )
  first = next(r for r in read_metrics(copy) if r["step"] == 5)
  assert first["train/tokens_per_sec"] > 0.02 * usual, (first["train/tokens_per_sec"], usual)


def test_the_loop_reads_the_device_only_at_log_eval_and_checkpoint_steps(tmp_path, monkeypatch):
  """Steps are issued without waiting: no transfer to the host between the sync steps."""
  from jax._src.array import ArrayImpl

  events = []  # step numbers (after each step is issued) and "read" (a device-to-host copy)
  value = ArrayImpl._value

  def reading(self):
    events.append("read")
    return value.fget(self)

  requested = train.PreemptionWatch.requested

  def requested_after(self, step):
    events.append(step)
    return requested(self, step)

  monkeypatch.setattr(ArrayImpl, "_value", property(reading))
  monkeypatch.setattr(train.PreemptionWatch, "requested", requested_after)
  config = smoke_config(
    **{"train.log_every": 4, "train.eval_every": 8, "train.checkpoint_every": 4}
  )
  train.train_and_evaluate(config, str(tmp_path), show_progress=False)
  reads, step = {}, 0
  for event in events:
    if event == "read":
      reads[step] = reads.get(step, 0) + 1
    else:
      step = event
  assert sorted(s for s in reads if s > 0) == [4, 8], reads


def test_greedy_sampling_with_a_cache_and_a_sliding_window_equals_recomputing(trained):
  """Decoding with the KV cache, and past `context_len` tokens restarting the window from
  the newest half: each greedy token is an argmax of the model run from scratch (no
  cache) on the window that rule gives (up to float noise between near-ties)."""
  workdir, _, _ = trained
  model, _, step = generate.load_model(workdir)
  assert step == 8
  context = 8
  prompt = np.array([257, *b"To"], np.int32)
  fast = generate.sample(model, prompt, max_new_tokens=14, context_len=context, temperature=0.0)
  for _, module in nnx.iter_modules(model):  # as sampling does: every token reaches its experts
    if isinstance(module, MoeLayer):
      module.config = dataclasses.replace(
        module.config, eval_capacity_factor=module.num_experts / module.top_k
      )
  graphdef, state = nnx.split(model)
  last_logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0][0, -1])
  tokens, window = list(prompt), min(len(prompt), context)
  assert len(fast) >= 7, "decoded into a full cache, and slid"
  for i, token in enumerate([*fast, EOS_ID] if len(fast) < 14 else fast):  # early stop: EOS
    logits = np.asarray(last_logits(state, jnp.asarray(tokens[-window:], jnp.int32)[None]))
    assert logits[token] >= logits.max() - 1e-4, (i, window, token, int(logits.argmax()))
    tokens.append(int(token))
    window = context // 2 if window == context else window + 1


def test_the_cache_holds_the_sample_not_the_claimed_context(trained):
  """A context of 10^9 tokens (an import's max_position_embeddings could say so) samples 5
  tokens as the trained context does: the cache is sized by prompt + new tokens."""
  workdir, config, _ = trained
  model, _, _ = generate.load_model(workdir)
  prompt = np.array([257, *b"To"], np.int32)
  want = generate.sample(model, prompt, max_new_tokens=5, context_len=config.train.seq_len)
  got = generate.sample(model, prompt, max_new_tokens=5, context_len=10**9)
  np.testing.assert_array_equal(got, want)


def test_eval_command_reproduces_the_runs_last_eval(trained):
  from moejax import eval as eval_lib

  workdir, config, final = trained
  model, saved, step = generate.load_model(workdir)
  batches = eval_lib.eval_batches(
    saved, split=saved.data.eval_split, max_batches=saved.data.eval_batches
  )
  result = eval_lib.evaluate_model(model, batches)
  assert step == config.train.num_steps
  assert result["bits_per_byte"] == pytest.approx(final["eval/bits_per_byte"], rel=1e-5)
  assert result["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
  assert result["dropped_fraction"] == pytest.approx(final["eval/dropped_fraction"], abs=1e-6)
  loads = result["expert_load"]
  assert loads.shape == (2, config.model.num_experts)
  np.testing.assert_allclose(loads.sum(axis=1), 1.0, atol=1e-5)


def _cli(*args, timeout=240):
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
  )


@pytest.mark.parametrize(
  "override,needle",
  [
    ("--config.train.bogus=1", "--config.train.bogus is not a config key"),
    ("--config.model.routr=top_k", "did you mean --config.model.router?"),
    ("--config.modle.top_k=1", "did you mean --config.model.top_k?"),
    ("--config.train.num_steps=abc", "num_steps"),
    ("--config.model.router=hash", "config.model.router='hash' is not supported"),
  ],
)
def test_cli_rejects_bad_overrides_with_one_line(override, needle, tmp_path):
  result = _cli(
    "moejax.main", "--config=configs/tiny.py:smoke", f"--workdir={tmp_path}/w", override
  )
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "w"), "a rejected command creates no workdir"


def test_cli_overrides_reach_the_run_and_generation_works(tmp_path):
  workdir = tmp_path / "cli"
  result = _cli(
    "moejax.main",
    "--config=configs/tiny.py:smoke",
    f"--workdir={workdir}",
    "--config.train.num_steps=3",
    "--config.model.dispatch=dropless",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = read_metrics(str(workdir))
  assert max(r["step"] for r in records) == 3
  assert all(r["train/dropped_fraction"] == 0.0 for r in records if "train/dropped_fraction" in r)
  sample = _cli("moejax.generate", f"--workdir={workdir}", "--prompt=ROMEO.", "--max_new_tokens=8")
  assert sample.returncode == 0, sample.stderr[-3000:]
  assert "ROMEO." in sample.stdout
  # A --top_k past the vocabulary: one line with the range, exit 2.
  wide = _cli("moejax.generate", f"--workdir={workdir}", "--top_k=1000")
  assert wide.returncode == 2, wide.stderr[-3000:]
  errors = [l for l in wide.stderr.splitlines() if l.startswith("error:")]
  assert errors == [
    "error: --top_k=1000 is not an integer in the range [0, 260] (this model has 260 tokens)."
  ], wide.stderr[-3000:]


def test_filter_logits_against_numpy():
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
  keep = lambda f: np.isfinite(np.asarray(f))[0].tolist()
  assert keep(generate.filter_logits(logits, temperature=1.0, top_k=2, top_p=1.0)) == [1, 1, 0, 0]
  # Nucleus 0.7: 0.5 alone is short of it, 0.5 + 0.25 reaches it.
  assert keep(generate.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.7)) == [1, 1, 0, 0]
  assert keep(generate.filter_logits(logits, temperature=1.0, top_k=0, top_p=0.4)) == [1, 0, 0, 0]
  assert keep(generate.filter_logits(logits, temperature=0.0, top_k=0, top_p=1.0)) == [1, 0, 0, 0]
  scaled = generate.filter_logits(logits, temperature=0.5, top_k=0, top_p=1.0)
  np.testing.assert_allclose(np.asarray(scaled), np.asarray(logits) * 2, rtol=1e-6)


def test_a_log_step_where_dropless_dropped_warns_in_one_line():
  model = load_config("configs/tiny.py:smoke", {"model.dispatch": "dropless"}).model
  assert train.dropless_drop_warning(4, {"train/dropped_fraction": 0.0}, model) is None
  model.dropless_overflow = "drop"
  line = train.dropless_drop_warning(4, {"train/dropped_fraction": 0.2812}, model)
  assert line.startswith("step 4: dropless dropped 28.12% ") and "\n" not in line
  assert "dropless_overflow='drop'" in line and "dropless_buffer_factor=2" in line
  model.dispatch = "sort"  # capacity drops are the dispatch's meaning, not a warning
  assert train.dropless_drop_warning(4, {"train/dropped_fraction": 0.2812}, model) is None


def _bytes_store(tmp_path, tokenizer="bytes"):
  """A token store of about 8 kB of play-like lines, prepared with `tokenizer`."""
  from moejax.data.store_writer import prepare

  corpus = tmp_path / "corpus.jsonl"
  lines = (
    json.dumps({"text": f"ROMEO. Line {i} of the play, and more of it."}) for i in range(200)
  )
  corpus.write_text("\n".join(lines) + "\n")
  out = str(tmp_path / f"store_{tokenizer.split('/')[-1]}")
  prepare([f"jsonl:{corpus}"], tokenizer, out)
  return out


def test_eval_scores_another_dataset_or_a_token_store(trained, tmp_path):
  workdir, _, _ = trained
  other = _cli(
    "moejax.eval",
    f"--workdir={workdir}",
    "--data_name=shakespeare_plays",
    "--split=validation[50%:]",
    "--batches=1",
  )
  assert other.returncode == 0, other.stderr[-2000:]
  assert "on shakespeare_plays[validation[50%:]]: 1 batches" in other.stdout
  store = _bytes_store(tmp_path)
  scored = _cli("moejax.eval", f"--workdir={workdir}", f"--tokens_dir={store}", "--batches=2")
  assert scored.returncode == 0, scored.stderr[-2000:]
  assert f"on {store}: 2 batches" in scored.stdout and "bits/byte" in scored.stdout
  wrong = _cli("moejax.eval", f"--workdir={workdir}", "--data_name=shakespeare_plyas")
  assert wrong.returncode == 2, wrong.stderr[-2000:]
  assert "error: --data_name=shakespeare_plyas: " in wrong.stderr
  assert "did you mean 'shakespeare_plays'" in wrong.stderr


def test_eval_refuses_data_the_model_cannot_read(trained, tmp_path):
  from moejax import eval as eval_lib
  from moejax.data.token_data import check_model_data

  workdir, config, _ = trained
  bpe = _bytes_store(tmp_path, "hf:" + os.path.join(REPO, "moejax/data/assets/bpe_2048"))
  data = eval_lib.with_eval_data(config, tokens_dir=bpe, data_name=None).data
  with pytest.raises(ValueError, match=r"^--workdir=.* is a byte model .* \(--tokens_dir\)"):
    check_model_data(data, workdir, key="--workdir", use="score", store_key="--tokens_dir")
  # A model with a tokenizer of its own (an import's) is not scored on bytes.
  own = tmp_path / "own"
  shutil.copytree(workdir, own)
  shutil.copy(os.path.join(REPO, "moejax/data/assets/bpe_2048/tokenizer.json"), own)
  result = _cli("moejax.eval", f"--workdir={own}")
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "holds its own tokenizer.json: score it on a token store" in errors[0]
  assert "--tokens_dir=DIR" in errors[0]


def test_a_non_finite_evaluation_fails_in_one_line():
  from moejax import eval as eval_lib
  from moejax.runtime import cli

  eval_lib.check_finite({"loss": 2.0, "bits_per_byte": 3.0}, 8, "W")
  with pytest.raises(RuntimeError) as error:
    eval_lib.check_finite({"loss": float("nan"), "bits_per_byte": float("nan")}, 8, "W")
  assert str(error.value).startswith("checkpoint 8 of W scores a non-finite loss (nan")
  assert cli.exit_code(error.value) == 1


def test_weight_decay_shrinks_matrices_and_leaves_vectors_of_scanned_layers_alone():
  """AdamW's decoupled decay, one update with zero gradients: every matrix shrinks by
  lr · weight_decay of itself; norm scales (`[layers, d]` in a scanned stack, `[d]` at the
  end) and biases stay as they are."""
  config = smoke_config(**{"model.qkv_bias": True, "train.warmup_steps": 0})
  model, optimizer, schedule = steps.build(config)
  before = {
    k: np.asarray(v) for k, v in flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
  }
  zeros = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, zeros)
  after = {k: np.asarray(v) for k, v in flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
  shrink = 1.0 - float(schedule(0)) * config.train.weight_decay
  assert shrink < 1.0
  vectors = [k for k in before if k.endswith(("scale", "bias"))]
  assert any(k.startswith("stacks/") for k in vectors) and "final_norm/scale" in vectors
  for name, value in before.items():
    expected = value if name in vectors else value * shrink
    np.testing.assert_allclose(after[name], expected, rtol=1e-6, err_msg=name)
