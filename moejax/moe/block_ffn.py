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

from moejax.layers.activations import hidden_activation
from moejax.parallel.sharding import varying_axes

SIZE_CLASSES = 8  # a remainder runs as 1..8 eighths of a block
# The name scope of the loops' operations (in the HLO's op_name metadata): a compiled
# TPU or GPU program that contains it runs the CPU form.
SCOPE = "expert_block_loop"


def block_size(rows: int, num_experts: int) -> int:
  """Rows per full block: the largest power of two at most a balanced expert's rows
  (rows / E), between 8 and 256 (a multiple of `SIZE_CLASSES`)."""
  target = max(8, rows // num_experts)
  return int(min(256, 1 << (target.bit_length() - 1)))


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
    activation: one of `moejax.layers.activations.ACTIVATIONS`.
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
  with jax.named_scope(SCOPE):
    return _padded_ffn(activation, block, x, group_sizes, keep, w_in, w_gate, w_out)


def _padded_ffn(activation, block, x, group_sizes, keep, w_in, w_gate, w_out):
  rows = x.shape[0]
  pad = lambda a: (
    None if a is None else jnp.concatenate([a, jnp.zeros_like(a, shape=(block,) + a.shape[1:])])
  )
  out = _ffn(
    activation,
    block,
    pad(x),
    group_sizes.astype(jnp.int32),
    pad(keep),
    w_in,
    w_gate,
    w_out,
  )
  in_group = jnp.arange(rows) < jnp.sum(group_sizes)
  return jnp.where(in_group[:, None], out[:rows], 0)


def _vary_alike(arrays):
  """Inside `jax.shard_map`, mark every array as varying over the union of the arrays'
  varying axes (`jax.lax.pcast`), so that the loops' carries have one type. Autodiff
  transposes the cast into the sum over those axes that a replicated weight's gradient
  needs (e.g. over the data axis for expert weights)."""
  axes = frozenset().union(*(varying_axes(a) for a in arrays if a is not None))

  def vary(a):
    missing = tuple(sorted(axes - varying_axes(a)))
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


def _for_each_chunk(group_sizes, block, state, expert_fn, chunk_fn, write_fn):
  """Runs over experts in order.

  `expert_fn(e, state) -> (weights, state)` once per expert; then for each of its full
  blocks and for its remainder, `chunk_fn(size, start, valid_rows, weights) -> result`
  (`size` static; rows `[start, start + size)`, the first `valid_rows` of them the
  expert's) computes a chunk's result padded to `block` rows, and `write_fn(start,
  result, state) -> state` writes it. The remainder's matmul size is picked by a
  `lax.switch` whose branches see only the chunk, never the loop state, so XLA does not
  copy the large buffers into and out of the conditional.
  """
  starts, full, size_class = _chunks(group_sizes, block)
  step = block // SIZE_CLASSES

  def per_expert(e, state):
    weights, state = expert_fn(e, state)

    def full_block(j, state):
      start = starts[e] + j * block
      return write_fn(start, chunk_fn(block, start, block, weights), state)

    state = jax.lax.fori_loop(0, full[e], full_block, state)
    tail_start = starts[e] + full[e] * block
    tail_rows = group_sizes[e] - full[e] * block
    shapes = jax.eval_shape(lambda: chunk_fn(block, tail_start, block, weights))

    def empty():  # zeros typed like the chunks (varying over the same mesh axes)
      zeros = [jnp.zeros(a.shape, a.dtype) for a in jax.tree.leaves(shapes)]
      return jax.tree.unflatten(jax.tree.structure(shapes), _vary_alike(zeros + [tail_start])[:-1])

    branches = [empty] + [
      functools.partial(chunk_fn, c * step, tail_start, tail_rows, weights)
      for c in range(1, SIZE_CLASSES + 1)
    ]
    # The rows past the remainder belong to later experts, which overwrite them.
    return write_fn(tail_start, jax.lax.switch(size_class[e], branches), state)

  return jax.lax.fori_loop(0, group_sizes.shape[0], per_expert, state)


def _pad_rows(a, block):
  """`a` `[size, ...]` padded with zero rows to `[block, ...]`."""
  return None if a is None else jnp.pad(a, [(0, block - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


def _hidden(activation, pre, gate_pre, keep):
  hidden = hidden_activation(activation, pre, gate_pre)
  return hidden if keep is None else hidden * keep


def _chunk_forward(activation, rows, weights, keep):
  """One expert on rows `[n, d_model]`: `(out [n, d_model], pre, gate_pre [n, d_ff])`."""
  wi, wg, wo = weights
  pre = rows @ wi
  gate_pre = None if wg is None else rows @ wg
  return _hidden(activation, pre, gate_pre, keep) @ wo, pre, gate_pre


def _chunk_backward(activation, rows, g, pre, gate_pre, keep, weights):
  """The backward of `_chunk_forward` for the output cotangent `g` `[n, d_model]`, from its
  saved pre-activations: `(d_rows [n, d_model], (d_w_in, d_w_gate or None, d_w_out))`."""
  wi, wg, wo = weights
  hidden, hidden_vjp = jax.vjp(lambda p, q: _hidden(activation, p, q, keep), pre, gate_pre)
  d_wo = _mm(hidden, g, 0, 0)  # [d_ff, d_model]
  d_pre, d_gate_pre = hidden_vjp(_mm(g, wo, 1, 1))  # [n, d_ff]
  d_wi = _mm(rows, d_pre, 0, 0)  # [d_model, d_ff]
  d_rows = _mm(d_pre, wi, 1, 1)
  d_wg = None
  if wg is not None:
    d_wg = _mm(rows, d_gate_pre, 0, 0)
    d_rows = d_rows + _mm(d_gate_pre, wg, 1, 1)
  return d_rows, (d_wi, d_wg, d_wo)


def _slice(a, start, size):
  return None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size)


def _write(buffer, rows, start):
  return None if buffer is None else jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, 0)


def _forward_loop(activation, block, x, group_sizes, keep, w_in, w_gate, w_out, save: bool):
  """`(out, pre, gate_pre)`: the outputs `[rows, d_model]` and, with `save`, the
  pre-activations `[rows, d_ff]` (`gate_pre` None without a gate)."""
  d_ff = w_in.shape[-1]
  hidden_zeros = jnp.zeros_like(x, shape=(x.shape[0], d_ff)) if save else None
  state = (jnp.zeros_like(x), hidden_zeros, hidden_zeros if w_gate is not None else None)

  def expert_fn(e, state):
    return (w_in[e], None if w_gate is None else w_gate[e], w_out[e]), state

  def chunk_fn(size, start, valid_rows, weights):
    del valid_rows  # overrun rows are overwritten by the next expert
    out_c, pre_c, gate_c = _chunk_forward(
      activation, _slice(x, start, size), weights, _slice(keep, start, size)
    )
    kept = (pre_c, gate_c) if save else (None, None)
    return tuple(_pad_rows(a, block) for a in (out_c, *kept))

  def write_fn(start, result, state):
    return tuple(_write(buffer, rows, start) for buffer, rows in zip(state, result, strict=True))

  return _for_each_chunk(group_sizes, block, state, expert_fn, chunk_fn, write_fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ffn(activation, block, x, group_sizes, keep, w_in, w_gate, w_out):
  arrays = (x, group_sizes, keep, w_in, w_gate, w_out)
  return _forward_loop(activation, block, *arrays, False)[0]


def _ffn_fwd(activation, block, x, group_sizes, keep, w_in, w_gate, w_out):
  arrays = (x, group_sizes, keep, w_in, w_gate, w_out)
  out, pre, gate_pre = _forward_loop(activation, block, *arrays, True)
  return out, (x, group_sizes, keep, w_in, w_gate, w_out, pre, gate_pre)


def _ffn_bwd(activation, block, residual, d_out):
  x, group_sizes, keep, w_in, w_gate, w_out, pre, gate_pre = residual
  zeros_like_expert = lambda w: None if w is None else jnp.zeros_like(w[0])
  grads = tuple(None if w is None else jnp.zeros_like(w) for w in (w_in, w_gate, w_out))

  def expert_fn(e, state):
    d_x, grads, acc, previous = state
    # Write the previous expert's finished weight gradients, start this expert's.
    grads = tuple(
      None if g is None else jax.lax.dynamic_update_index_in_dim(g, a, previous, 0)
      for g, a in zip(grads, acc, strict=True)
    )
    weights = (w_in[e], None if w_gate is None else w_gate[e], w_out[e])
    return weights, (d_x, grads, tuple(map(zeros_like_expert, (w_in, w_gate, w_out))), e)

  def chunk_fn(size, start, valid_rows, weights):
    mine = (jnp.arange(size) < valid_rows)[:, None]
    g = jnp.where(mine, _slice(d_out, start, size), 0)  # overrun rows add no gradient
    d_rows, chunk_grads = _chunk_backward(
      activation,
      _slice(x, start, size),
      g,
      _slice(pre, start, size),
      _slice(gate_pre, start, size),
      _slice(keep, start, size),
      weights,
    )
    return _pad_rows(d_rows, block), chunk_grads

  def write_fn(start, result, state):
    d_x, grads, acc, previous = state
    d_rows, chunk_grads = result
    acc = tuple(None if a is None else a + c for a, c in zip(acc, chunk_grads, strict=True))
    return _write(d_x, d_rows, start), grads, acc, previous

  state = (
    jnp.zeros_like(x),
    grads,
    tuple(map(zeros_like_expert, (w_in, w_gate, w_out))),
    jnp.int32(0),
  )
  d_x, grads, acc, last = _for_each_chunk(group_sizes, block, state, expert_fn, chunk_fn, write_fn)
  d_in, d_gate, d_wout = (
    None if g is None else jax.lax.dynamic_update_index_in_dim(g, a, last, 0)
    for g, a in zip(grads, acc, strict=True)
  )
  return d_x, None, None, d_in, d_gate, d_wout


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


# ----------------------------------------------------------------------------- capacity buffers


def capacity_ffn(activation, x, keep, w_in, w_gate, w_out):
  """Each expert's FFN on its capacity buffer, a loop of one 2-D matmul chain per expert.

  Args:
    activation: one of `moejax.layers.activations.ACTIVATIONS`.
    x: `[experts, capacity, d_model]`.
    keep: `[experts, capacity, d_ff]` dropout scaling of the hidden layer, or None.
    w_in, w_gate (or None), w_out: the experts' weights, as in `ffn`.

  Returns:
    `[experts, capacity, d_model]`. Every buffer is one matmul, and each expert's weight
    gradients are set once (nothing to accumulate); measured faster than the ragged loop
    on these equal groups (`experiments/benchmarks/expert_matmuls.py`).
  """
  arrays = [None if a is None else jnp.asarray(a) for a in (x, keep, w_in, w_gate, w_out)]
  with jax.named_scope(SCOPE):
    return _capacity(activation, *_vary_alike(arrays))


def _capacity_forward(activation, x, keep, w_in, w_gate, w_out, save: bool):
  num_experts, capacity, _ = x.shape
  hidden_zeros = jnp.zeros_like(x, shape=(num_experts, capacity, w_in.shape[-1]))
  state = (
    jnp.zeros_like(x),
    hidden_zeros if save else None,
    hidden_zeros if save and w_gate is not None else None,
  )

  def body(e, state):
    weights = (w_in[e], None if w_gate is None else w_gate[e], w_out[e])
    out, pre, gate_pre = _chunk_forward(
      activation, x[e], weights, None if keep is None else keep[e]
    )
    kept = (pre, gate_pre) if save else (None, None)
    return tuple(
      None if buffer is None else buffer.at[e].set(value)
      for buffer, value in zip(state, (out, *kept), strict=True)
    )

  return jax.lax.fori_loop(0, num_experts, body, state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _capacity(activation, x, keep, w_in, w_gate, w_out):
  return _capacity_forward(activation, x, keep, w_in, w_gate, w_out, False)[0]


def _capacity_fwd(activation, x, keep, w_in, w_gate, w_out):
  out, pre, gate_pre = _capacity_forward(activation, x, keep, w_in, w_gate, w_out, True)
  return out, (x, keep, w_in, w_gate, w_out, pre, gate_pre)


def _capacity_bwd(activation, residual, d_out):
  x, keep, w_in, w_gate, w_out, pre, gate_pre = residual

  def body(e, grads):
    d_x, d_wi, d_wg, d_wo = grads
    weights = (w_in[e], None if w_gate is None else w_gate[e], w_out[e])
    d_rows, (g_in, g_gate, g_out) = _chunk_backward(
      activation,
      x[e],
      d_out[e],
      pre[e],
      None if gate_pre is None else gate_pre[e],
      None if keep is None else keep[e],
      weights,
    )
    d_wg = None if d_wg is None else d_wg.at[e].set(g_gate)
    return d_x.at[e].set(d_rows), d_wi.at[e].set(g_in), d_wg, d_wo.at[e].set(g_out)

  zeros = lambda w: None if w is None else jnp.zeros_like(w)
  grads = (jnp.zeros_like(x), zeros(w_in), zeros(w_gate), zeros(w_out))
  d_x, d_wi, d_wg, d_wo = jax.lax.fori_loop(0, x.shape[0], body, grads)
  return d_x, None, d_wi, d_wg, d_wo


_capacity.defvjp(_capacity_fwd, _capacity_bwd)
