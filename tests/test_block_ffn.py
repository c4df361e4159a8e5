"""The CPU grouped expert FFN (`moejax.block_ffn.block_ffn`) and its hand-written backward
pass, against a NumPy loop (value) and autodiff of a batched-einsum form (gradients); the
GPU/TPU batched form against the same loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.activations import ACTIVATIONS, hidden_activation, is_gated
from moejax.moe.block_ffn import block_ffn, block_layout
from moejax.moe.experts import batched_ffn

import moe_reference as ref


def _einsum_form(activation, blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out):
  """The same function written with per-block weight copies and batched einsums."""
  pre = jnp.einsum("bkd,bdf->bkf", blocks, w_in[block_expert])
  gate_pre = None if w_gate is None else jnp.einsum("bkd,bdf->bkf", blocks, w_gate[block_expert])
  hidden = hidden_activation(activation, pre, gate_pre)
  hidden = hidden if keep is None else hidden * keep
  out = jnp.einsum("bkf,bfd->bkd", hidden, w_out[block_expert])
  used = jnp.arange(blocks.shape[0]) < used_blocks
  return jnp.where(used[:, None, None], out, 0.0)


@settings(max_examples=12, deadline=None)
@given(
  num_blocks=st.integers(1, 5),
  block=st.sampled_from([1, 3, 8]),
  experts=st.integers(1, 4),
  activation=st.sampled_from(ACTIVATIONS),
  dropout=st.booleans(),
  seed=st.integers(0, 1000),
  data=st.data(),
)
def test_property_block_ffn_value_and_gradients(
  num_blocks, block, experts, activation, dropout, seed, data
):
  used_blocks = data.draw(st.integers(0, num_blocks), label="used_blocks")
  d_model, d_ff = 4, 6
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  blocks = normal(num_blocks, block, d_model)
  block_expert = np.sort(rng.integers(0, experts, num_blocks)).astype(np.int32)
  keep = (
    ((rng.random((num_blocks, block, d_ff)) < 0.7) * 2.0).astype(np.float32) if dropout else None
  )
  w_in, w_out = normal(experts, d_model, d_ff), normal(experts, d_ff, d_model)
  w_gate = normal(experts, d_model, d_ff) if is_gated(activation) else None
  args = (blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out)

  out = np.asarray(block_ffn(activation, *args))
  expected = np.zeros_like(out)
  for b in range(used_blocks):
    e = block_expert[b]
    for r in range(block):
      expected[b, r] = ref.ffn(
        blocks[b, r].astype(np.float64),
        w_in[e],
        None if w_gate is None else w_gate[e],
        w_out[e],
        activation,
        1.0 if keep is None else keep[b, r],
      )
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)

  cotangent = normal(*out.shape)

  def loss(fn):
    def f(blocks, w_in, w_gate, w_out):
      y = fn(activation, blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out)
      return jnp.sum(y * cotangent)

    return jax.grad(f, argnums=(0, 1, 2, 3))(blocks, w_in, w_gate, w_out)

  for got, want in zip(loss(block_ffn), loss(_einsum_form)):
    if want is None:
      assert got is None
      continue
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_block_ffn_under_jit_with_traced_used_blocks():
  """`used_blocks` is a traced value inside `jax.jit` (the dropless path computes it)."""
  rng = np.random.default_rng(0)
  blocks = rng.normal(size=(4, 2, 3)).astype(np.float32)
  w_in, w_out = (
    rng.normal(size=(2, 3, 5)).astype(np.float32),
    rng.normal(size=(2, 5, 3)).astype(np.float32),
  )
  block_expert, keep = np.array([0, 0, 1, 1], np.int32), None
  run = jax.jit(
    lambda used: jax.value_and_grad(
      lambda w: jnp.sum(block_ffn("relu", blocks, block_expert, used, keep, w, None, w_out) ** 2)
    )(w_in)
  )
  for used in range(5):
    value, grad = run(used)
    want_value, want_grad = jax.value_and_grad(
      lambda w: jnp.sum(_einsum_form("relu", blocks, block_expert, used, keep, w, None, w_out) ** 2)
    )(w_in)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-5)
    if used <= 2:  # expert 1's blocks are skipped: its weights get no gradient
      np.testing.assert_array_equal(np.asarray(grad[1]), 0.0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batched_ffn_the_gpu_tpu_form_matches_the_numpy_loop(activation):
  """`experts.batched_ffn` runs on GPU/TPU only; check it here against the same loop."""
  rng = np.random.default_rng(1)
  E, C, d, f = 3, 4, 5, 6
  x = rng.normal(size=(E, C, d)).astype(np.float32)
  w_in, w_out = (
    rng.normal(size=(E, d, f)).astype(np.float32),
    rng.normal(size=(E, f, d)).astype(np.float32),
  )
  w_gate = rng.normal(size=(E, d, f)).astype(np.float32) if is_gated(activation) else None
  out = np.asarray(batched_ffn(activation, x, w_in, w_gate, w_out))
  for e in range(E):
    for c in range(C):
      want = ref.ffn(
        x[e, c].astype(np.float64),
        w_in[e],
        None if w_gate is None else w_gate[e],
        w_out[e],
        activation,
      )
      np.testing.assert_allclose(out[e, c], want, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
  sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
  spare=st.integers(0, 5),
  block=st.sampled_from([8, 16]),
)
def test_property_block_layout_places_every_row_once(sizes, spare, block):
  rows = sum(sizes) + spare
  slot_row, block_expert, row_slot, used = block_layout(jnp.asarray(sizes), rows, block)
  slot_row, block_expert, row_slot = map(np.asarray, (slot_row, block_expert, row_slot))
  owner = np.repeat(np.arange(len(sizes)), sizes)
  for r in range(sum(sizes)):
    assert slot_row[row_slot[r]] == r
    assert block_expert[row_slot[r] // block] == owner[r]
  assert np.all(row_slot[sum(sizes) :] == len(slot_row))
  assert np.sum(slot_row < rows) == sum(sizes)
  assert int(used) == sum(-(-s // block) for s in sizes)  # blocks holding any row
  assert np.all(slot_row[int(used) * block :] == rows)  # every later slot is empty
