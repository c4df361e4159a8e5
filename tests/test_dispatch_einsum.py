"""The `einsum` dispatch form (GShard's one-hot masks) against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import dispatch_harness as harness
from moejax.moe import dispatch


@pytest.mark.parametrize("capacity", [2, 3, 18])
def test_values_and_kept_match_the_reference(capacity):
  dropped = harness.check_token_choice_values(dispatch.EINSUM, capacity=capacity)
  assert (dropped > 0) == (capacity < 18), "small capacities must exercise dropping"


def test_gradients_match_central_differences_of_the_reference():
  harness.check_token_choice_gradients(dispatch.EINSUM, capacity=3)


def test_queue_positions_by_cumsum_are_a_hand_count():
  experts = np.array([2, 0, 2, 1, 2, 0])
  valid = np.array([True, True, False, True, True, True])
  positions = dispatch.positions_by_cumsum(jnp.asarray(experts), jnp.asarray(valid), 3)
  # Expert 2: assignments 0 and 4 (2 is invalid); expert 0: 1 and 5; expert 1: 3.
  np.testing.assert_array_equal(np.asarray(positions)[valid], [0, 0, 0, 1, 1])


def test_expert_choice_masks_take_each_experts_tokens():
  harness.check_expert_choice_values(dispatch.EINSUM)


def test_einsum_form_uses_no_gather():
  indices, gates, valid = harness.random_routing(2, 8, 4, 2, 0)
  routing = harness.token_choice(indices, gates, valid)
  x = jnp.ones((2, 8, harness.D_MODEL))
  fn = lambda x: dispatch.EINSUM.prepare(x, routing, num_experts=4, capacity=4, dtype=jnp.float32)
  hlo = jax.jit(fn).lower(x).compile().as_text()
  assert " gather(" not in hlo and " scatter(" not in hlo
