"""The grouped expert FFN on XLA's CPU backend: rows in fixed-size blocks, one expert each.

`jax.lax.ragged_dot` is the grouped matmul on GPU and TPU. XLA's CPU backend computes it
densely for every group (about E times the work), so on CPU the rows sorted by expert are
padded into blocks of `block` rows, each owned by one expert (block-sparse, as MegaBlocks,
Gale et al. 2022), and a loop multiplies each block by its expert's weights.

`block_ffn` is that loop, with its own backward pass (`jax.custom_vjp`). Both directions
are `while` loops over the blocks actually used: a balanced routing uses about
rows / block of the ceil(rows / block) + E blocks laid out for the worst case. The forward
saves the pre-activations, so the backward recomputes no matmul; weight gradients
accumulate in place, one expert slice per block, with no per-block `[d_model, d_ff]`
gradient kept. The capacity paths use it too on CPU, with one block per expert: XLA's CPU
backend runs this loop at least as fast as one batched matmul
(`experiments/benchmarks/expert_matmuls.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.activations import hidden_activation


def block_size(rows: int, num_experts: int) -> int:
  """Rows per block: the largest power of two at most a balanced expert's rows (rows / E),
  between 8 and 256. Padding wastes under one block per expert; larger blocks make faster
  matmuls, smaller ones pad less."""
  target = max(8, rows // num_experts)
  return int(min(256, 1 << (target.bit_length() - 1)))


def block_layout(group_sizes: jax.Array, rows: int, block: int):
  """Lay `rows` rows sorted by expert into blocks of `block` rows, each owned by one expert.

  Args:
    group_sizes: `[experts]` rows of each expert; rows past their sum belong to none.
    rows: total rows (static).
    block: rows per block (static).

  Returns:
    slot_row: `[num_blocks * block]` the source row of each padded slot (`rows` = empty).
    block_expert: `[num_blocks]` the expert owning each block.
    row_slot: `[rows]` the padded slot of each row (`num_blocks * block` = no slot).
    used_blocks: scalar, the blocks holding any row; blocks from there on are empty.
    num_blocks = ceil(rows / block) + experts, enough for any `group_sizes`.
  """
  num_experts = group_sizes.shape[0]
  num_blocks = -(-rows // block) + num_experts
  sizes = group_sizes.astype(jnp.int32)
  padded_sizes = -(-sizes // block) * block
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  padded_ends = jnp.cumsum(padded_sizes)
  padded_starts = padded_ends - padded_sizes

  slots = jnp.arange(num_blocks * block)
  slot_expert = jnp.minimum(jnp.searchsorted(padded_ends, slots, side="right"), num_experts - 1)
  offset = slots - padded_starts[slot_expert]
  slot_used = (offset < sizes[slot_expert]) & (slots < padded_ends[-1])
  slot_row = jnp.where(slot_used, starts[slot_expert] + offset, rows)

  block_expert = slot_expert[::block]

  row_ids = jnp.arange(rows)
  row_expert = jnp.searchsorted(ends, row_ids, side="right")
  in_group = row_expert < num_experts
  row_expert = jnp.minimum(row_expert, num_experts - 1)
  row_slot = jnp.where(
    in_group, padded_starts[row_expert] + row_ids - starts[row_expert], num_blocks * block
  )
  return slot_row, block_expert, row_slot, padded_ends[-1] // block


def grouped_layout(group_sizes: jax.Array, rows: int):
  """`(block, *block_layout(...))` with the block size `block_size` picks for `rows` rows
  and `group_sizes.shape[0]` experts: the layout the CPU grouped FFN uses."""
  block = block_size(rows, group_sizes.shape[0])
  return (block, *block_layout(group_sizes, rows, block))


def _mm(a: jax.Array, b: jax.Array, contract_a: int, contract_b: int) -> jax.Array:
  """2-D matmul contracting axis `contract_a` of `a` with axis `contract_b` of `b`, without
  materialising a transpose."""
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())))


def block_ffn(activation, blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out):
  """Each used block `x` through its expert `e`'s FFN:
  `hidden_activation(activation, x @ w_in[e], x @ w_gate[e]) * keep @ w_out[e]`.

  Args:
    activation: one of `moejax.activations.ACTIVATIONS`.
    blocks: `[num_blocks, block, d_model]`.
    block_expert: `[num_blocks]` int, the expert of each block.
    used_blocks: scalar int; blocks from here on are skipped and give zeros.
    keep: `[num_blocks, block, d_ff]` dropout scaling of the hidden layer (0 or 1/keep_prob),
      or None for no dropout.
    w_in, w_gate (or None), w_out: `[experts, d_model, d_ff]`, `[experts, d_model, d_ff]`,
      `[experts, d_ff, d_model]`.

  Returns:
    `[num_blocks, block, d_model]`.
  """
  arrays = [
    None if a is None else jnp.asarray(a)
    for a in (blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out)
  ]
  return _block_ffn(activation, *_vary_alike(arrays))


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_ffn(activation, blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out):
  return _loop(
    activation,
    blocks,
    block_expert,
    used_blocks,
    keep,
    w_in,
    w_gate,
    w_out,
    save_pre_activations=False,
  )[0]


def _forward(activation, blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out):
  out, pre, gate_pre = _loop(
    activation,
    blocks,
    block_expert,
    used_blocks,
    keep,
    w_in,
    w_gate,
    w_out,
    save_pre_activations=True,
  )
  return out, (blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out, pre, gate_pre)


def _loop(
  activation,
  blocks,
  block_expert,
  used_blocks,
  keep,
  w_in,
  w_gate,
  w_out,
  *,
  save_pre_activations: bool,
):
  """The forward loop: `(out, pre, gate_pre)`, the pre-activations `[num_blocks, block,
  d_ff]` (None unless `save_pre_activations`; `gate_pre` None without a gate)."""
  num_blocks, block, _ = blocks.shape
  d_ff = w_in.shape[-1]
  save_gate = save_pre_activations and w_gate is not None

  def body(i, state):
    out, pre, gate_pre = state
    e, x = block_expert[i], blocks[i]
    pre_i = x @ w_in[e]
    gate_i = None if w_gate is None else x @ w_gate[e]
    out = out.at[i].set(_hidden(activation, pre_i, gate_i, keep, i) @ w_out[e])
    pre = pre.at[i].set(pre_i) if save_pre_activations else None
    gate_pre = gate_pre.at[i].set(gate_i) if save_gate else None
    return out, pre, gate_pre

  hidden_zeros = jnp.zeros_like(blocks, shape=(num_blocks, block, d_ff))
  state = (
    jnp.zeros_like(blocks),
    hidden_zeros if save_pre_activations else None,
    hidden_zeros if save_gate else None,
  )
  return jax.lax.fori_loop(0, used_blocks, body, state)


def _hidden(activation, pre, gate_pre, keep, i):
  """Block `i`'s hidden layer `[block, d_ff]`, with its dropout scaling if any."""
  hidden = hidden_activation(activation, pre, gate_pre)
  return hidden if keep is None else hidden * keep[i]


def _backward(activation, residual, d_out):
  blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out, pre, gate_pre = residual

  def body(i, grads):
    d_x, d_in, d_gate, d_wout = grads
    e, x, g = block_expert[i], blocks[i], d_out[i]
    hidden, hidden_vjp = jax.vjp(
      lambda p, q: _hidden(activation, p, q, keep, i),
      pre[i],
      None if gate_pre is None else gate_pre[i],
    )
    d_wout = d_wout.at[e].add(_mm(hidden, g, 0, 0))  # [d_ff, d_model]
    d_pre, d_gate_pre = hidden_vjp(_mm(g, w_out[e], 1, 1))  # [block, d_ff]
    d_in = d_in.at[e].add(_mm(x, d_pre, 0, 0))  # [d_model, d_ff]
    d_x_i = _mm(d_pre, w_in[e], 1, 1)
    if w_gate is not None:
      d_gate = d_gate.at[e].add(_mm(x, d_gate_pre, 0, 0))
      d_x_i = d_x_i + _mm(d_gate_pre, w_gate[e], 1, 1)
    return d_x.at[i].set(d_x_i), d_in, d_gate, d_wout

  grads = (
    jnp.zeros_like(blocks),
    jnp.zeros_like(w_in),
    None if w_gate is None else jnp.zeros_like(w_gate),
    jnp.zeros_like(w_out),
  )
  d_x, d_in, d_gate, d_wout = jax.lax.fori_loop(0, used_blocks, body, grads)
  return d_x, None, None, None, d_in, d_gate, d_wout


_block_ffn.defvjp(_forward, _backward)
