"""The `sort` dispatch form (slots by sorting, gathers both ways) against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import dispatch_harness as harness
from moejax.moe import dispatch


@pytest.mark.parametrize("capacity", [2, 3, 18])
def test_values_and_kept_match_the_reference(capacity):
  dropped = harness.check_token_choice_values(dispatch.SORT, capacity=capacity)
  assert (dropped > 0) == (capacity < 18), "small capacities must exercise dropping"


def test_gradients_match_central_differences_of_the_reference():
  harness.check_token_choice_gradients(dispatch.SORT, capacity=3)


@settings(max_examples=25, deadline=None)
@given(assignments=st.integers(1, 60), num_experts=st.integers(1, 9), seed=st.integers(0, 1000))
def test_property_queue_positions_by_sort_equal_cumsum(assignments, num_experts, seed):
  rng = np.random.default_rng(seed)
  experts = rng.integers(0, num_experts, assignments)
  valid = rng.random(assignments) < 0.8
  _, by_sort, sizes = dispatch.sort_by_expert(jnp.asarray(experts), jnp.asarray(valid), num_experts)
  by_cumsum = dispatch.positions_by_cumsum(jnp.asarray(experts), jnp.asarray(valid), num_experts)
  # Hand count: the position is the number of earlier valid assignments to the same expert.
  expected = [np.sum((experts[:i] == experts[i]) & valid[:i]) for i in range(assignments)]
  np.testing.assert_array_equal(np.asarray(by_sort)[valid], np.asarray(expected)[valid])
  np.testing.assert_array_equal(np.asarray(by_cumsum)[valid], np.asarray(expected)[valid])
  np.testing.assert_array_equal(
    np.asarray(sizes), np.bincount(experts[valid], minlength=num_experts)
  )


def test_expert_choice_slots_gather_and_scatter_back():
  harness.check_expert_choice_values(dispatch.SORT)


def test_sort_form_holds_no_tokens_by_experts_by_capacity_tensor():
  tokens, E, capacity = 64, 8, 20
  indices, gates, valid = harness.random_routing(1, tokens, E, 2, 0)
  routing = harness.token_choice(indices, gates, valid)
  x = jnp.ones((1, tokens, harness.D_MODEL))

  def fn(x):
    inputs, plan = dispatch.SORT.prepare(
      x, routing, num_experts=E, capacity=capacity, dtype=jnp.float32
    )
    return dispatch.SORT.combine(inputs, plan)

  hlo = jax.jit(fn).lower(x).compile().as_text()
  assert f"[1,{tokens},{E},{capacity}]" not in hlo and f"[{tokens},{E},{capacity}]" not in hlo
