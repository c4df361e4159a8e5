"""Sparse upcycling (`moejax.upcycle`): at step 0 the upcycled MoE computes the dense
model's function when its gates are renormalised, and only then."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from helpers import interrupts
from moejax.config import load_config
from moejax.convert import model_state
from moejax.models.transformer import TransformerLM
from moejax.upcycle import upcycle

TOKENS = jnp.asarray([[5, 9, 100, 42, 7, 7, 250, 3]], jnp.int32)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  """A dense smoke model with random weights, written as a run directory."""
  path = tmp_path_factory.mktemp("dense") / "run"
  config = load_config("configs/dense.py:smoke", {"train.seed": 3})
  model = TransformerLM(config.model, rngs=nnx.Rngs(3))
  model_state.save_model_run(
    path, nnx.to_pure_dict(nnx.state(model)), config, "origin.json", "{}\n"
  )
  logits, _ = model(TOKENS)
  return path, np.asarray(logits)


def _moe(**changes):
  overrides = {
    "model.num_experts": 4,
    "model.top_k": 2,
    "model.dispatch": "dropless",
    "model.renormalize": True,
    **changes,
  }
  return load_config("configs/dense.py:smoke", overrides)


def test_renormalised_gates_give_the_dense_function_at_step_0(dense_run, tmp_path):
  path, dense_logits = dense_run
  upcycle(path, tmp_path / "moe", _moe())
  model, config = moejax.load(tmp_path / "moe")
  assert config.model.num_experts == 4
  logits, aux = model(TOKENS)
  np.testing.assert_allclose(np.asarray(logits), dense_logits, rtol=1e-5, atol=1e-5)
  # The router is fresh, not all zeros: tokens do spread over the experts.
  assert np.count_nonzero(np.asarray(aux["expert_load"])) > 2


def test_raw_softmax_gates_scale_the_ffn_by_the_top_k_mass(dense_run, tmp_path):
  """All experts chosen: the softmax mass is 1, the dense function; top-2 of 4: less."""
  path, dense_logits = dense_run
  upcycle(path, tmp_path / "all", _moe(**{"model.renormalize": False, "model.top_k": 4}))
  logits, _ = moejax.load(tmp_path / "all")[0](TOKENS)
  np.testing.assert_allclose(np.asarray(logits), dense_logits, rtol=1e-5, atol=1e-5)
  upcycle(path, tmp_path / "top2", _moe(**{"model.renormalize": False}))
  logits, _ = moejax.load(tmp_path / "top2")[0](TOKENS)
  assert np.max(np.abs(np.asarray(logits) - dense_logits)) > 1e-3


def test_noise_perturbs_each_expert_copy_by_its_scale(dense_run, tmp_path):
  path, _ = dense_run
  upcycle(path, tmp_path / "noisy", _moe(), noise_std=0.01)
  dense, _ = moejax.load(path)
  moe, _ = moejax.load(tmp_path / "noisy")
  source = np.asarray(dense.layer(1).dense_ffn.w_in[...])
  experts = np.asarray(moe.layer(1).moe.experts.w_in[...])
  relative = [float(np.std(e - source) / np.std(source)) for e in experts]
  assert all(0.007 < r < 0.013 for r in relative), relative
  assert not np.array_equal(experts[0], experts[1])
  np.testing.assert_array_equal(
    np.asarray(moe.layer(1).attention.q_proj.kernel[...]),
    np.asarray(dense.layer(1).attention.q_proj.kernel[...]),
  )


def test_shapes_that_do_not_fit_are_refused_in_one_line_and_nothing_written(dense_run, tmp_path):
  path, _ = dense_run
  with pytest.raises(ValueError, match=r"model.expert_d_ff=32 must equal the dense run's d_ff=64"):
    upcycle(path, tmp_path / "bad", _moe(**{"model.expert_d_ff": 32}))
  with pytest.raises(ValueError, match=r"model.num_heads: the dense run has"):
    upcycle(path, tmp_path / "bad", _moe(**{"model.num_heads": 4, "model.num_kv_heads": 4}))
  assert not (tmp_path / "bad").exists()
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "moejax.upcycle",
      f"--from={path}",
      f"--workdir={tmp_path / 'cli'}",
      "--config=configs/dense.py:smoke",
    ],
    capture_output=True,
    text=True,
  )
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: --config is dense")


def test_an_interrupted_run_is_not_upcycled(dense_run, tmp_path):
  """A dense run directory still holding WRITING (its writer was killed) is refused."""
  import json
  import shutil

  shutil.copytree(dense_run[0], tmp_path / "dense")
  owner = {"command": "python -m moejax.convert import", "host": "elsewhere", "pid": 1}
  (tmp_path / "dense" / "WRITING").write_text(json.dumps(owner))
  with pytest.raises(ValueError, match=r"--from=.* is the incomplete output of an interrupted"):
    upcycle(tmp_path / "dense", tmp_path / "moe", _moe())
  assert not (tmp_path / "moe").exists()


def test_an_upcycle_stopped_by_a_signal_removes_what_it_wrote(dense_run, tmp_path):
  """The line printed says what is true: what was written is removed; rerun."""
  import signal

  workdir = tmp_path / "moe"
  args = [f"--from={dense_run[0]}", f"--workdir={workdir}", "--config=configs/dense.py:smoke"]
  args += ["--config.model.num_experts=4", "--config.model.top_k=2"]
  args += ["--config.model.dispatch=dropless"]
  code, stderr = interrupts.stop_after_checkpoint("moejax.upcycle", args, workdir)
  assert code == 128 + signal.SIGTERM, stderr[-2000:]
  assert list(tmp_path.iterdir()) == []
  assert stderr.strip().splitlines()[-1] == (
    "stopped by SIGTERM; what was written to --workdir is removed: rerun the same command."
  )
