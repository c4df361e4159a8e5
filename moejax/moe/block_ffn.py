"""The grouped expert FFN on XLA's CPU backend: loops of 2-D matmuls over rows sorted by expert.

`jax.lax.ragged_dot` is the grouped matmul on GPU and TPU. XLA's CPU backend computes it
densely for every group (about E times the work), and runs a loop of 2-D matmuls faster
than one batched matmul (`experiments/benchmarks/expert_matmuls.py`). So on CPU the rows,
sorted by expert, are multiplied in place:

    for each expert e (its weight slices read once):
      its full blocks of `block` rows, one 2-D matmul each;
      its remainder (< block rows) as one matmul of the smallest multiple of block/8 rows
      that covers it (a `lax.switch` over 8 static sizes).

A remainder's matmul may run past the expert's rows into the next expert's; experts run
in order, so the next expert overwrites those outputs, and the overrun rows are masked out
of the weight gradients. Rows are never padded into a block layout: an expert wastes
fewer than block/8 rows (MegaBlocks, Gale et al. 2022, pads each expert to whole blocks).

`ffn` has its own backward pass (`jax.custom_vjp`): the forward saves the
pre-activations, so the backward recomputes no matmul, and each expert's weight gradients
accumulate in the loop carry and are written once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.activations import hidden_activation

SIZE_CLASSES = 8  # a remainder runs as 1..8 eighths of a block


def block_size(rows: int, num_experts: int) -> int:
  """Rows per full block: the largest power of two at most a balanced expert's rows
  (rows / E), between 8 and 256 (a multiple of `SIZE_CLASSES`)."""
  target = max(8, rows // num_experts)
  return int(min(256, 1 << (target.bit_length() - 1)))


def capacity_block(rows_per_expert: int) -> int:
  """The block for capacity buffers of `rows_per_expert` rows each: that count rounded up
  to a multiple of `SIZE_CLASSES`, so each expert's buffer is one matmul."""
  return -(-rows_per_expert // SIZE_CLASSES) * SIZE_CLASSES


def rows_multiplied(group_sizes: jax.Array, block: int) -> jax.Array:
  """The rows `ffn` multiplies for `group_sizes` (`[experts]`): each expert's full blocks,
  and its remainder rounded up to a multiple of block/8."""
  _, full, size_class = _chunks(group_sizes, block)
  return jnp.sum(full * block + size_class * (block // SIZE_CLASSES))


def _mm(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """2-D matmul contracting axis `contract_a` of `a` with axis `contract_b` of `b`, without
  materialising a transpose."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())))


def ffn(activation, x, group_sizes, keep, w_in, w_gate, w_out, *, block: int):
  """Each row of `x` through its expert's FFN:
  `hidden_activation(activation, x @ w_in[e], x @ w_gate[e]) * keep @ w_out[e]`.

  Args:
    activation: one of `moejax.activations.ACTIVATIONS`.
    x: `[rows, d_model]`, sorted by expert: expert `e` owns `group_sizes[e]` consecutive rows.
    group_sizes: `[experts]` int; rows past their sum belong to no expert and give zeros.
    keep: `[rows, d_ff]` dropout scaling of the hidden layer (0 or 1/keep_prob), or None.
    w_in, w_gate (or None), w_out: `[experts, d_model, d_ff]`, `[experts, d_model, d_ff]`,
      `[experts, d_ff, d_model]`.
    block: rows per full block (static), a multiple of `SIZE_CLASSES`.

  Returns:
    `[rows, d_model]`.
  """
  if block % SIZE_CLASSES:
    raise ValueError(f"block={block} must be a multiple of {SIZE_CLASSES}.")
  arrays = [
    None if a is None else jnp.asarray(a) for a in (x, group_sizes, keep, w_in, w_gate, w_out)
  ]
  x, group_sizes, keep, w_in, w_gate, w_out = _vary_alike(arrays)
  rows = x.shape[0]
  pad = lambda a: (
    None if a is None else jnp.concatenate([a, jnp.zeros_like(a, shape=(block,) + a.shape[1:])])
  )
  out = _ffn(
    activation, block, pad(x), group_sizes.astype(jnp.int32), pad(keep), w_in, w_gate, w_out
  )
  in_group = jnp.arange(rows) < jnp.sum(group_sizes)
  return jnp.where(in_group[:, None], out[:rows], 0)


def _varying_axes(x: jax.Array) -> frozenset:
  """The mesh axes `x` varies over inside `jax.shard_map` (empty outside)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  return frozenset(axis_type.varying if axis_type is not None else getattr(aval, "vma", ()))


def _vary_alike(arrays):
  """Inside `jax.shard_map`, mark every array as varying over the union of the arrays'
  varying axes (`jax.lax.pcast`), so that the loops' carries have one type. Autodiff
  transposes the cast into the sum over those axes that a replicated weight's gradient
  needs (e.g. over the data axis for expert weights)."""
  axes = frozenset().union(*(_varying_axes(a) for a in arrays if a is not None))

  def vary(a):
    missing = tuple(sorted(axes - _varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return [None if a is None else vary(a) for a in arrays]


def _chunks(group_sizes: jax.Array, block: int):
  """Per expert: `starts` (first row), `full` (full blocks) and `size_class` (0: no
  remainder; c: the remainder runs as c·block/8 rows)."""
  starts = jnp.cumsum(group_sizes) - group_sizes
  full = group_sizes // block
  step = block // SIZE_CLASSES
  size_class = -(-(group_sizes - full * block) // step)
  return starts, full, size_class


def _for_each_chunk(group_sizes, block, state, expert_fn, chunk_fn):
  """Runs over experts in order: `expert_fn(e, state) -> (weights, state)` once per expert,
  then `chunk_fn(size, start, valid_rows, weights, state) -> state` for each full block
  and the remainder (`size` static; rows `[start, start + size)`, the first `valid_rows`
  of them the expert's)."""
  starts, full, size_class = _chunks(group_sizes, block)
  step = block // SIZE_CLASSES

  def per_expert(e, state):
    weights, state = expert_fn(e, state)
    blocks = lambda j, state: chunk_fn(block, starts[e] + j * block, block, weights, state)
    state = jax.lax.fori_loop(0, full[e], blocks, state)
    tail_start = starts[e] + full[e] * block
    tail_rows = group_sizes[e] - full[e] * block
    branches = [lambda state: state] + [
      functools.partial(
        lambda size, state: chunk_fn(size, tail_start, tail_rows, weights, state), c * step
      )
      for c in range(1, SIZE_CLASSES + 1)
    ]
    return jax.lax.switch(size_class[e], branches, state)

  return jax.lax.fori_loop(0, group_sizes.shape[0], per_expert, state)


def _hidden(activation, pre, gate_pre, keep):
  hidden = hidden_activation(activation, pre, gate_pre)
  return hidden if keep is None else hidden * keep


def _slice(a, start, size):
  return None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size)


def _forward_loop(activation, block, x, group_sizes, keep, w_in, w_gate, w_out, save: bool):
  """`(out, pre, gate_pre)`: the outputs `[rows, d_model]` and, with `save`, the
  pre-activations `[rows, d_ff]` (`gate_pre` None without a gate)."""
  d_ff = w_in.shape[-1]
  hidden_zeros = jnp.zeros_like(x, shape=(x.shape[0], d_ff)) if save else None
  state = (jnp.zeros_like(x), hidden_zeros, hidden_zeros if w_gate is not None else None)

  def expert_fn(e, state):
    return (w_in[e], None if w_gate is None else w_gate[e], w_out[e]), state

  def chunk_fn(size, start, valid_rows, weights, state):
    del valid_rows  # overrun rows are overwritten by the next expert
    out, pre, gate_pre = state
    wi, wg, wo = weights
    rows = _slice(x, start, size)
    pre_c = rows @ wi
    gate_c = None if wg is None else rows @ wg
    out = jax.lax.dynamic_update_slice_in_dim(
      out, _hidden(activation, pre_c, gate_c, _slice(keep, start, size)) @ wo, start, 0
    )
    if save:
      pre = jax.lax.dynamic_update_slice_in_dim(pre, pre_c, start, 0)
      if gate_pre is not None:
        gate_pre = jax.lax.dynamic_update_slice_in_dim(gate_pre, gate_c, start, 0)
    return out, pre, gate_pre

  return _for_each_chunk(group_sizes, block, state, expert_fn, chunk_fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ffn(activation, block, x, group_sizes, keep, w_in, w_gate, w_out):
  return _forward_loop(activation, block, x, group_sizes, keep, w_in, w_gate, w_out, False)[0]


def _ffn_fwd(activation, block, x, group_sizes, keep, w_in, w_gate, w_out):
  out, pre, gate_pre = _forward_loop(
    activation, block, x, group_sizes, keep, w_in, w_gate, w_out, True
  )
  return out, (x, group_sizes, keep, w_in, w_gate, w_out, pre, gate_pre)


def _ffn_bwd(activation, block, residual, d_out):
  x, group_sizes, keep, w_in, w_gate, w_out, pre, gate_pre = residual
  grads = (
    jnp.zeros_like(x),
    jnp.zeros_like(w_in),
    None if w_gate is None else jnp.zeros_like(w_gate),
    jnp.zeros_like(w_out),
  )
  accumulators = lambda: (
    jnp.zeros_like(w_in[0]),
    None if w_gate is None else jnp.zeros_like(w_gate[0]),
    jnp.zeros_like(w_out[0]),
  )

  def expert_fn(e, state):
    d_x, d_in, d_gate, d_wout, acc, previous = state
    # Write the previous expert's finished weight gradients, start this expert's.
    d_in = jax.lax.dynamic_update_index_in_dim(d_in, acc[0], previous, 0)
    d_gate = (
      None if d_gate is None else jax.lax.dynamic_update_index_in_dim(d_gate, acc[1], previous, 0)
    )
    d_wout = jax.lax.dynamic_update_index_in_dim(d_wout, acc[2], previous, 0)
    weights = (w_in[e], None if w_gate is None else w_gate[e], w_out[e])
    return weights, (d_x, d_in, d_gate, d_wout, accumulators(), e)

  def chunk_fn(size, start, valid_rows, weights, state):
    d_x, d_in, d_gate, d_wout, (a_in, a_gate, a_out), previous = state
    wi, wg, wo = weights
    mine = (jnp.arange(size) < valid_rows)[:, None]
    rows = _slice(x, start, size)
    g = jnp.where(mine, _slice(d_out, start, size), 0)  # overrun rows add no gradient
    pre_c, gate_c = _slice(pre, start, size), _slice(gate_pre, start, size)
    hidden, hidden_vjp = jax.vjp(
      lambda p, q: _hidden(activation, p, q, _slice(keep, start, size)), pre_c, gate_c
    )
    a_out = a_out + _mm(hidden, g, 0, 0)  # [d_ff, d_model]
    d_pre, d_gate_pre = hidden_vjp(_mm(g, wo, 1, 1))  # [size, d_ff]
    a_in = a_in + _mm(rows, d_pre, 0, 0)  # [d_model, d_ff]
    d_rows = _mm(d_pre, wi, 1, 1)
    if wg is not None:
      a_gate = a_gate + _mm(rows, d_gate_pre, 0, 0)
      d_rows = d_rows + _mm(d_gate_pre, wg, 1, 1)
    d_x = jax.lax.dynamic_update_slice_in_dim(d_x, d_rows, start, 0)
    return d_x, d_in, d_gate, d_wout, (a_in, a_gate, a_out), previous

  state = (*grads, accumulators(), jnp.int32(0))
  d_x, d_in, d_gate, d_wout, acc, last = _for_each_chunk(
    group_sizes, block, state, expert_fn, chunk_fn
  )
  d_in = jax.lax.dynamic_update_index_in_dim(d_in, acc[0], last, 0)
  d_gate = None if d_gate is None else jax.lax.dynamic_update_index_in_dim(d_gate, acc[1], last, 0)
  d_wout = jax.lax.dynamic_update_index_in_dim(d_wout, acc[2], last, 0)
  return d_x, None, None, d_in, d_gate, d_wout


_ffn.defvjp(_ffn_fwd, _ffn_bwd)
