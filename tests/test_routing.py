"""Router formulas against NumPy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moejax
from helpers.moe_reference import softmax
from moejax.moe import routing


def _numpy_lb(probs, indices, num_experts):
  probs = probs.reshape(-1, probs.shape[-1])
  indices = indices.reshape(-1)
  f = np.array([np.sum(indices == i) for i in range(num_experts)]) / indices.size
  p = probs.mean(0)
  return num_experts * float(np.sum(f * p))


@settings(max_examples=30, deadline=None)
@given(
  tokens=st.integers(1, 40),
  num_experts=st.integers(1, 9),
  k=st.integers(1, 4),
  seed=st.integers(0, 2**16),
)
def test_load_balancing_loss_matches_numpy(tokens, num_experts, k, seed):
  k = min(k, num_experts)
  rng = np.random.default_rng(seed)
  probs = softmax(rng.normal(size=(2, tokens, num_experts)))
  indices = np.argsort(-probs, -1)[..., :k]
  got = moejax.load_balancing_loss(
    jnp.asarray(probs, jnp.float32), jnp.asarray(indices), num_experts
  )
  np.testing.assert_allclose(float(got), _numpy_lb(probs, indices, num_experts), rtol=1e-5)


@pytest.mark.parametrize("num_experts,k", [(4, 1), (8, 2), (64, 8), (16, 16)])
def test_load_balancing_loss_is_one_when_uniform(num_experts, k):
  tokens = num_experts * 3
  probs = jnp.full((tokens, num_experts), 1.0 / num_experts)
  # Each expert gets exactly tokens·k/E assignments: token t takes experts t, t+1, ..., t+k-1.
  indices = (jnp.arange(tokens)[:, None] + jnp.arange(k)[None]) % num_experts
  assert float(moejax.load_balancing_loss(probs, indices, num_experts)) == pytest.approx(
    1.0, rel=1e-6
  )


def test_load_balancing_loss_grows_when_collapsed():
  probs = jnp.tile(jnp.array([[0.97, 0.01, 0.01, 0.01]]), (8, 1))
  indices = jnp.zeros((8, 1), jnp.int32)
  assert float(moejax.load_balancing_loss(probs, indices, 4)) == pytest.approx(4 * 0.97, rel=1e-6)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 30), num_experts=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_router_z_loss_matches_numpy(tokens, num_experts, seed):
  logits = np.random.default_rng(seed).normal(scale=3.0, size=(tokens, num_experts))
  expected = np.mean(np.log(np.sum(np.exp(logits), -1)) ** 2)
  got = moejax.router_z_loss(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_router_z_loss_flattens_leading_dims():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5))
  flat = moejax.router_z_loss(jnp.asarray(logits.reshape(6, 5)))
  assert float(moejax.router_z_loss(jnp.asarray(logits))) == pytest.approx(float(flat), rel=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_choice(renormalize):
  probs = softmax(np.random.default_rng(1).normal(size=(12, 6))).astype(np.float32)
  choice = routing.top_k_choice(jnp.asarray(probs), 3, renormalize=renormalize)
  for t in range(12):
    order = np.argsort(-probs[t])[:3]
    gates = probs[t, order] / (probs[t, order].sum() if renormalize else 1.0)
    np.testing.assert_array_equal(np.asarray(choice.expert_indices[t]), order)
    np.testing.assert_allclose(np.asarray(choice.gates[t]), gates, rtol=1e-6)


def test_random_second_expert_keeps_at_the_gshard_rate():
  rng = np.random.default_rng(2)
  probs = softmax(rng.normal(scale=2.0, size=(20000, 8))).astype(np.float32)
  choice = routing.top_k_choice(jnp.asarray(probs), 2, renormalize=False)
  kept = routing.random_second_expert(choice, jax.random.key(0)).valid
  g = np.asarray(choice.gates, np.float64)
  expected_rate = np.mean(np.minimum(1.0, 2 * g[:, 1] / g.sum(1)))
  assert np.asarray(kept[:, 0]).all()
  assert np.mean(np.asarray(kept[:, 1])) == pytest.approx(expected_rate, abs=0.01)
  # Tokens whose two gates are equal always keep their second expert.
  equal = routing.TokenChoice(
    expert_indices=jnp.array([[0, 1]]), gates=jnp.array([[0.4, 0.4]]), valid=jnp.ones((1, 2), bool)
  )
  assert bool(routing.random_second_expert(equal, jax.random.key(1)).valid[0, 1])


def test_expert_choice_takes_each_experts_top_tokens():
  probs = softmax(np.random.default_rng(3).normal(size=(10, 4))).astype(np.float32)
  choice = routing.expert_choice(jnp.asarray(probs), 3)
  for e in range(4):
    top = np.argsort(-probs[:, e])[:3]
    np.testing.assert_array_equal(np.asarray(choice.token_indices[e]), top)
    np.testing.assert_allclose(np.asarray(choice.gates[e]), probs[top, e], rtol=1e-6)


def test_noisy_logits_follow_shazeer():
  clean = jnp.zeros((4000, 3))
  noise_logits = jnp.full((4000, 3), 1.0)
  noisy = routing.noisy_logits(clean, noise_logits, jax.random.key(0))
  # N(0, 1) · softplus(1) has standard deviation log(1 + e).
  assert float(jnp.std(noisy)) == pytest.approx(np.log1p(np.e), rel=0.05)
