"""Muon (`train.optimizer='muon'`, `moejax.training.steps`): which parameters it takes, its
first update against a NumPy Newton-Schulz loop (each expert and each scanned layer
orthogonalised separately), AdamW on the rest, and a few training steps equal on a mesh
and on one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import load_config
from moejax.parallel import sharding
from moejax.training import steps
from moejax.training.run_plan import validate_train_config
from moejax.training.tree_paths import flat

pytestmark = pytest.mark.usefixtures("fast_compile_module")

NS_COEFFS = (3.4445, -4.775, 2.0315)  # Jordan et al. 2024's quintic, five steps


def numpy_orthogonalise(g: np.ndarray) -> np.ndarray:
  """Five quintic Newton-Schulz steps on a Frobenius-normalised `[rows, cols]` matrix,
  float64, the wide way round: X ← aX + (bA + cA²)X with A = XXᵀ."""
  wide = g.T if g.shape[0] > g.shape[1] else g
  x = wide / (np.linalg.norm(wide) + 1e-8)
  a, b, c = NS_COEFFS
  for _ in range(5):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def smoke(**overrides):
  base = {"train.optimizer": "muon", "train.warmup_steps": 0, "model.qkv_bias": True}
  return load_config("configs/tiny.py:smoke", {**base, **overrides})


def params_of(model):
  return {
    k: np.asarray(v, np.float64)
    for k, v in flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
  }


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
  config = smoke()
  model, _, _ = steps.build(config)
  state = nnx.state(model, nnx.Param)
  chosen = {
    jax.tree_util.keystr(path): steps.muon_dimensions(path, leaf) is not None
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  muon = {k for k, v in chosen.items() if v}
  assert any("experts" in k and "w_gate" in k for k in muon)
  assert any("attention" in k and "q_proj" in k and "kernel" in k for k in muon)
  for name in ("embed", "lm_head", "router_kernel", "scale", "bias"):
    assert not any(name in k for k in muon), name
  assert len(muon) < len(chosen)


def random_gradients(params):
  """Normal gradients of global norm 0.5 (under `grad_clip_norm` 1: no clipping)."""
  keys = iter(jax.random.split(jax.random.key(3), 1000))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
  norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
  return jax.tree.map(lambda g: g * (0.5 / norm), grads)


def test_the_first_update_is_the_numpy_orthogonalisation():
  """One update with small random gradients (no clipping): each Muon matrix moves by
  lr · (0.2 · sqrt(max(A, B)) · NS(g) + weight_decay · W), slice by slice; every other
  parameter moves exactly as under 'adamw'."""
  config = smoke()
  moved = {}
  for optimizer in ("muon", "adamw"):
    config.train.optimizer = optimizer
    model, opt, schedule = steps.build(config)
    before = params_of(model)
    grads = random_gradients(nnx.state(model, nnx.Param))
    opt.update(model, grads)
    moved[optimizer] = (before, params_of(model), flat(nnx.to_pure_dict(grads)))
  lr, wd, rms = float(schedule(0)), config.train.weight_decay, config.train.muon_update_rms
  before, after, grads = moved["muon"]
  checked = 0
  for name, w in before.items():
    g = np.asarray(grads[name], np.float64)
    if "experts" in name or (
      "kernel" in name and not name.startswith(("lm_head", "embed")) and "router" not in name
    ):
      a, b = w.shape[-2:]
      slices = [np.unravel_index(i, w.shape[:-2]) for i in range(int(np.prod(w.shape[:-2])))]
      expected = np.empty_like(w)
      for index in slices:
        update = rms * np.sqrt(max(a, b)) * numpy_orthogonalise(g[index]) + wd * w[index]
        expected[index] = w[index] - lr * update
      np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
      checked += 1
    else:
      np.testing.assert_allclose(after[name], moved["adamw"][1][name], rtol=1e-6, err_msg=name)
  assert checked >= 6


def run_steps(config, mesh, tokens, n=3):
  graphdef, state, shardings = steps.init_state(config, mesh)
  train_step, _ = steps.make_steps(graphdef, config.model)
  step = jax.jit(train_step, in_shardings=(shardings, sharding.batch_sharding(mesh)))
  losses = []
  for _ in range(n):
    state, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    losses.append(float(metrics["loss"]))
  return losses, shardings


def test_muon_trains_to_the_same_losses_on_a_mesh():
  """Three Muon steps on 8 devices (data 2 × fsdp 2 × expert 2: the matrices sharded, the
  experts split) give one device's losses."""
  config = smoke(**{"train.learning_rate": 0.02})
  tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, config.model.vocab_size, jnp.int32)
  one = sharding.make_mesh(
    load_config("configs/tiny.py:smoke", {"mesh.data": 1}).mesh, jax.devices()[:1], keep_order=True
  )
  config.mesh.data, config.mesh.fsdp, config.mesh.expert = 2, 2, 2
  eight = sharding.make_mesh(config.mesh, jax.devices()[:8], keep_order=True)
  (alone, _), (spread, shardings) = run_steps(config, one, tokens), run_steps(config, eight, tokens)
  assert alone[2] < alone[0]  # it trains
  np.testing.assert_allclose(spread, alone, rtol=2e-5)
  # Muon's momentum is sharded as its parameter: an expert stack over expert and fsdp.
  specs = {
    jax.tree_util.keystr(p): s.spec
    for p, s in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(shardings))[0]
  }
  momentum = [v for k, v in specs.items() if "'muon'" in k and "'mu'" in k and "w_gate" in k]
  assert momentum and {"expert", "fsdp"} <= set(jax.tree.leaves(tuple(momentum[0])))


def test_an_unknown_optimizer_is_one_line():
  config = smoke(**{"train.optimizer": "sgd"})
  with pytest.raises(ValueError, match=r"^config\.train\.optimizer='sgd'; allowed: adamw, muon\.$"):
    validate_train_config(config.train)
  config = smoke(**{"train.muon_momentum": 1.0})
  with pytest.raises(ValueError, match=r"^config\.train\.muon_momentum=1\.0 must be a number in"):
    validate_train_config(config.train)


def test_the_memory_report_counts_one_moment_for_muons_matrices():
  """`aot.state_bytes_per_device`: Muon's momentum for its matrices, AdamW's two moments for
  the rest (optax's placeholders for the other partition hold nothing), plus a few counters."""
  from moejax import aot

  config = smoke()
  model, _, _ = steps.build(config)
  state = nnx.state(model, nnx.Param)
  moments = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    moments += leaf.size * (1 if steps.muon_dimensions(path, leaf) is not None else 2)
  got = aot.state_bytes_per_device(config, None)
  assert 4 * moments <= got["optimizer"] <= 4 * moments + 64  # + counts and NS coefficients
