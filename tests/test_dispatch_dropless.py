"""The `dropless` dispatch form (rows sorted by expert, grouped matmul) against the NumPy reference."""

import jax.numpy as jnp
import numpy as np

from helpers import dispatch_harness as harness
from moejax.moe import dispatch


def test_values_match_the_reference_and_nothing_is_dropped():
  dropped = harness.check_token_choice_values(dispatch.DROPLESS, capacity=None, num_experts=5)
  assert dropped == 0


def test_gradients_match_central_differences_of_the_reference():
  harness.check_token_choice_gradients(dispatch.DROPLESS, capacity=None)


def test_rows_are_sorted_by_expert_with_a_hand_counted_layout():
  indices = np.array([[[2, 0], [0, 1], [2, 1]]], np.int32)  # [G=1, S=3, k=2]
  gates = np.ones((1, 3, 2))
  valid = np.array([[[True, True], [True, False], [True, True]]])
  x = jnp.arange(18, dtype=jnp.float32).reshape(1, 3, 6)
  inputs, plan = dispatch.DROPLESS.prepare(
    x, harness.token_choice(indices, gates, valid), num_experts=3, capacity=None, dtype=jnp.float32
  )
  np.testing.assert_array_equal(np.asarray(inputs.group_sizes), [[2, 1, 2]])
  # Rank-1 assignments first, then token order: expert 0 <- token 1 (rank 1), token 0
  # (rank 2); expert 1 <- token 2 (rank 2); expert 2 <- tokens 0, 2 (rank 1).
  first_column = np.asarray(inputs.rows[0, :5, 0])
  np.testing.assert_array_equal(first_column, [6, 0, 12, 0, 12])
  assert inputs.rows.shape == (1, 6, 6) and not np.any(np.asarray(inputs.rows[0, 5:]))
  np.testing.assert_array_equal(np.asarray(plan.token_rows[0]), [[3, 1], [0, 6], [4, 2]])


def test_groups_do_not_change_the_dropless_function():
  experts = harness.make_experts(4)
  indices, gates, valid = harness.random_routing(3, 5, 4, 2, 1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, harness.D_MODEL)), jnp.float32)
  grouped, _ = harness.apply_form(
    dispatch.DROPLESS, experts, x, harness.token_choice(indices, gates, valid), None
  )
  one, _ = harness.apply_form(
    dispatch.DROPLESS,
    experts,
    x.reshape(1, 15, -1),
    harness.token_choice(*(a.reshape(1, 15, 2) for a in (indices, gates, valid))),
    None,
  )
  np.testing.assert_allclose(np.asarray(grouped).reshape(15, -1), np.asarray(one)[0], rtol=1e-6)
