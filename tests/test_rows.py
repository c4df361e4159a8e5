"""Row gathers with gather gradients (`moejax.moe.rows`) against plain gathers and hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.moe.rows import gated_sum_of_rows, inverse_slots, permute_rows, take_rows


@settings(max_examples=25, deadline=None)
@given(
  tokens=st.integers(1, 12),
  k=st.integers(1, 3),
  slots=st.integers(1, 30),
  seed=st.integers(0, 1000),
)
def test_property_take_rows_gradient_is_the_scatter_add_gradient(tokens, k, slots, seed):
  """`take_rows` with a token -> slots inverse map against autodiff of a plain gather."""
  rng = np.random.default_rng(seed)
  # A random partial injection of the tokens' k assignments into `slots` slots.
  wanted = rng.permutation(tokens * k)[:slots]
  slot_of = np.full(tokens * k, slots)
  slot_of[wanted] = np.arange(len(wanted))
  rng.shuffle(slot_of[:])
  token_slot = slot_of.reshape(tokens, k)
  slot_token = np.full(slots, tokens)
  for assignment, slot in enumerate(slot_of):
    if slot < slots:
      slot_token[slot] = assignment // k
  x = jnp.asarray(rng.normal(size=(tokens, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(slots, 3)), jnp.float32)
  plain = lambda x: jnp.concatenate([x, jnp.zeros((1, 3))])[slot_token]
  ours = lambda x: take_rows(x, jnp.asarray(slot_token), jnp.asarray(token_slot))
  np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(plain(x)))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
  np.testing.assert_allclose(np.asarray(grad(ours)), np.asarray(grad(plain)), rtol=1e-6, atol=1e-6)
  inverse = np.asarray(inverse_slots(jnp.asarray(slot_of), slots))[:, 0]
  for slot in range(slots):  # hand check of the inverse map
    filled = np.flatnonzero(slot_of == slot)
    assert inverse[slot] == (filled[0] if len(filled) else tokens * k)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 20), seed=st.integers(0, 1000))
def test_property_permute_rows_value_and_gradient(n, seed):
  rng = np.random.default_rng(seed)
  order = rng.permutation(n)
  x = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
  np.testing.assert_array_equal(
    np.asarray(permute_rows(x, jnp.asarray(order))), np.asarray(x)[order]
  )
  grad = jax.grad(lambda x: jnp.sum(permute_rows(x, jnp.asarray(order)) * cot))(x)
  expected = np.zeros((n, 2), np.float32)
  expected[order] = np.asarray(cot)  # the transpose of a permutation is its inverse
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6)


def test_gated_sum_of_rows_is_a_hand_sum():
  rows = jnp.asarray([[1.0], [10.0], [100.0]])
  token_rows = jnp.asarray([[0, 2], [3, 1]])  # token 1's first row is "none" (3 = n)
  gates = jnp.asarray([[0.5, 2.0], [7.0, 3.0]])
  np.testing.assert_allclose(
    np.asarray(gated_sum_of_rows(rows, token_rows, gates)), [[0.5 + 200.0], [30.0]]
  )
