"""The CPU grouped expert FFN (`moejax.moe.block_ffn.ffn`) and its hand-written backward
pass, against a NumPy loop (values) and autodiff of a per-row gathered-weights form
(gradients); its multiplied-row count against a hand count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import moe_reference as ref
from moejax.layers.activations import ACTIVATIONS, hidden_activation, is_gated
from moejax.moe import block_ffn
from moejax.moe.experts import batched_ffn


def _gathered_form(activation, x, group_sizes, keep, w_in, w_gate, w_out):
  """The same function with each row's expert weights gathered: an independent form."""
  rows = x.shape[0]
  owner = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")
  mine = owner < group_sizes.shape[0]
  owner = jnp.minimum(owner, group_sizes.shape[0] - 1)
  pre = jnp.einsum("rd,rdf->rf", x, w_in[owner])
  gate_pre = None if w_gate is None else jnp.einsum("rd,rdf->rf", x, w_gate[owner])
  hidden = hidden_activation(activation, pre, gate_pre)
  hidden = hidden if keep is None else hidden * keep
  return jnp.where(mine[:, None], jnp.einsum("rf,rfd->rd", hidden, w_out[owner]), 0.0)


@settings(max_examples=5, deadline=None)
@given(
  sizes=st.lists(st.integers(0, 21), min_size=1, max_size=4),
  spare=st.integers(0, 6),
  block=st.sampled_from([8, 16]),
  activation=st.sampled_from(ACTIVATIONS),
  dropout=st.booleans(),
  seed=st.integers(0, 1000),
)
def test_property_ffn_value_and_gradients(sizes, spare, block, activation, dropout, seed):
  d_model, d_ff, experts = 4, 6, len(sizes)
  rows = sum(sizes) + spare
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  x = normal(rows, d_model)
  keep = ((rng.random((rows, d_ff)) < 0.7) * 2.0).astype(np.float32) if dropout else None
  w_in, w_out = normal(experts, d_model, d_ff), normal(experts, d_ff, d_model)
  w_gate = normal(experts, d_model, d_ff) if is_gated(activation) else None
  group_sizes = np.asarray(sizes, np.int32)

  def run(fn, x, w_in, w_gate, w_out):
    return fn(activation, x, group_sizes, keep, w_in, w_gate, w_out)

  ours = lambda *args: block_ffn.ffn(*args, block=block)
  out = np.asarray(run(ours, x, w_in, w_gate, w_out))
  owner = np.repeat(np.arange(experts), sizes)
  expected = np.zeros_like(out)
  for r, e in enumerate(owner):
    expected[r] = ref.ffn(
      x[r].astype(np.float64),
      w_in[e],
      None if w_gate is None else w_gate[e],
      w_out[e],
      activation,
      1.0 if keep is None else keep[r],
    )
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  cotangent = normal(*out.shape)

  def grads(fn):
    loss = lambda *args: jnp.sum(run(fn, *args) * cotangent)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_in, w_gate, w_out)

  for got, want in zip(grads(ours), grads(_gathered_form), strict=True):
    if want is None:
      assert got is None
      continue
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_ffn_under_jit_with_traced_group_sizes():
  """The dropless path computes `group_sizes` inside `jax.jit`."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 3)).astype(np.float32)
  w_in, w_out = (
    rng.normal(size=(2, 3, 5)).astype(np.float32),
    rng.normal(size=(2, 5, 3)).astype(np.float32),
  )
  run = jax.jit(
    lambda sizes: jax.value_and_grad(
      lambda w: jnp.sum(block_ffn.ffn("relu", x, sizes, None, w, None, w_out, block=8) ** 2)
    )(w_in)
  )
  for sizes in ([12, 0], [3, 9], [0, 0]):
    value, grad = run(jnp.asarray(sizes))
    want_value, want_grad = jax.value_and_grad(
      lambda w, sizes=sizes: jnp.sum(
        _gathered_form("relu", x, jnp.asarray(sizes), None, w, None, w_out) ** 2
      )
    )(w_in)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)
    if sizes[1] == 0:
      np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)  # an unused expert gets none


def test_rows_multiplied_is_a_hand_count():
  # block 16: eighths of 2 rows. 37 = 2 blocks + 5 -> 6; 16 = 1 block; 0 -> 0; 3 -> 4.
  sizes = jnp.asarray([37, 16, 0, 3])
  assert int(block_ffn.rows_multiplied(sizes, 16)) == 32 + 6 + 16 + 0 + 4


def test_block_size_is_a_power_of_two_near_a_balanced_experts_rows():
  assert [block_ffn.block_size(8192, e) for e in (8, 16, 64, 512, 4096)] == [256, 256, 128, 16, 8]
  with pytest.raises(ValueError, match="multiple of 8"):
    block_ffn.ffn(
      "relu",
      jnp.ones((4, 2)),
      jnp.asarray([4]),
      None,
      jnp.ones((1, 2, 3)),
      None,
      jnp.ones((1, 3, 2)),
      block=12,
    )


@pytest.mark.parametrize("activation,dropout", [("swiglu", False), ("gelu", True)])
def test_capacity_ffn_value_and_gradients_match_the_batched_einsums(activation, dropout):
  """The capacity-buffer loop against autodiff of `experts.batched_ffn` (the GPU/TPU form)."""
  rng = np.random.default_rng(1)
  E, C, d, f = 3, 5, 4, 6
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  x, w_in, w_out, cot = normal(E, C, d), normal(E, d, f), normal(E, f, d), normal(E, C, d)
  w_gate = normal(E, d, f) if is_gated(activation) else None
  keep = jnp.asarray((rng.random((E, C, f)) < 0.7) * 2.0, jnp.float32) if dropout else None
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cot)
  ours = lambda x, wi, wg, wo: block_ffn.capacity_ffn(activation, x, keep, wi, wg, wo)
  theirs = lambda x, wi, wg, wo: batched_ffn(activation, x, wi, wg, wo, keep)
  args = (x, w_in, w_gate, w_out)
  np.testing.assert_allclose(ours(*args), theirs(*args), rtol=1e-5, atol=1e-5)
  for got, want in zip(
    jax.grad(loss(ours), (0, 1, 2, 3))(*args),
    jax.grad(loss(theirs), (0, 1, 2, 3))(*args),
    strict=True,
  ):
    if want is None:
      assert got is None
    else:
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
