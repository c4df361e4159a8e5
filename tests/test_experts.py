"""The expert FFNs (`moejax.moe.experts`): both implementations against a NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import moe_reference as ref
from moejax.moe.experts import ExpertDropout, Experts, capacity_ffn, grouped_ffn

D_MODEL, D_FF = 6, 10
IMPLS = ["block_loop", "grouped_matmul"]


def numpy_weights(experts):
  get = lambda w: None if w is None else np.asarray(w[...], np.float64)
  return [get(getattr(experts, n)) for n in ("w_in", "w_gate", "w_out")]


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_ffn_runs_each_row_through_its_expert(impl):
  experts = Experts(5, D_MODEL, D_FF, "swiglu", rngs=nnx.Rngs(0))
  rows = jax.random.normal(jax.random.key(3), (23, D_MODEL))
  sizes = [7, 0, 9, 1, 4]  # 21 of 23 rows used: the last two belong to none
  out = grouped_ffn("swiglu", impl, rows, jnp.asarray(sizes), experts.weights())
  w_in, w_gate, w_out = numpy_weights(experts)
  owner = np.repeat(np.arange(5), sizes)
  x = np.asarray(rows, np.float64)
  want = np.stack(
    [ref.ffn(x[r], w_in[e], w_gate[e], w_out[e], "swiglu") for r, e in enumerate(owner)]
  )
  np.testing.assert_allclose(np.asarray(out[:21]), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[21:]), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_capacity_ffn_runs_each_buffer_through_its_expert(impl):
  experts = Experts(3, D_MODEL, D_FF, "relu", rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(4), (3, 4, D_MODEL))
  out = capacity_ffn("relu", impl, x, experts.weights())
  w_in, _, w_out = numpy_weights(experts)
  xs = np.asarray(x, np.float64)
  want = np.stack([[ref.ffn(v, w_in[e], None, w_out[e], "relu") for v in xs[e]] for e in range(3)])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_dropout_zeroes_and_rescales_hidden_units(impl):
  experts = Experts(2, D_MODEL, D_FF, "relu", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (2, 8, D_MODEL))
  dropout = ExpertDropout(0.5, jax.random.key(9))
  out = capacity_ffn("relu", impl, x, experts.weights(), dropout)
  keep = np.asarray(dropout.keep_scale((2, 8, D_FF), jnp.float32), np.float64)
  assert set(np.unique(keep)) == {0.0, 2.0}
  w_in, _, w_out = numpy_weights(experts)
  xs = np.asarray(x, np.float64)
  want = np.stack(
    [
      [ref.ffn(v, w_in[e], None, w_out[e], "relu", keep=keep[e, r]) for r, v in enumerate(xs[e])]
      for e in range(2)
    ]
  )
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
