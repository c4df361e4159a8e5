"""Dropless rows over a mesh's expert axis: to the devices holding their experts and back.

Inside `jax.shard_map`, each device holds `R` rows sorted by expert (`RoutedRows`) and
E/n experts of every layer (n = the expert axis). Each device sends each expert-device
exactly the rows routed there, by a ragged exchange (`jax.lax.ragged_all_to_all` on GPU
and TPU, as MaxText and Megatron do), runs its experts on what it received, and sends the
results back.

**Rounds.** A device's receive buffer holds `B = ceil(dropless_buffer_factor · R)` rows
(the expected load is R when experts are balanced). The rows bound for device `j`, all
senders in order, form one stream; round `r` moves the stream's rows `[r·B, (r+1)·B)`.

* `overflow='rounds'` (the default): rounds run until every stream has moved, so no row
  is ever dropped, on any mesh. Round 0 is differentiated by JAX as usual; the rounds
  after it run in a `while_loop` whose trip count is the global maximum (all-reduced over
  the mesh), under a custom VJP that recomputes each round's exchange and experts in the
  backward pass. Memory is bounded by B, not by the worst case n·R: the later rounds
  hold one more buffer's working set (on OLMoE's pod program 24.8 GiB against the
  bounded exchange's 18.9, `docs/pods.md`), and their time is paid only under imbalance.
* `overflow='drop'`: one round; rows past a receiver's buffer are dropped, come back as
  zeros and are counted (`overflow`, then the layer's `dropped_fraction`), never silently.

XLA's CPU backend lacks `ragged_all_to_all`, so there the same exchange runs as an
`all_to_all` of fixed-size blocks (the most one device can send another in a round) with
the same offsets and the same result. A custom VJP makes the backward of each exchange the
exchange the other way.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moejax.moe import experts as experts_lib
from moejax.moe.dispatch import RoutedRows
from moejax.moe.rows import permute_rows
from moejax.parallel.sharding import EXPERT, varying_axes


def exchange_plan(all_sizes: jax.Array, buffer_rows: int, round_index=0) -> dict[str, jax.Array]:
  """Who sends how many dropless rows where in one round, from every device's per-expert
  row counts.

  Args:
    all_sizes: `[n, E]` int32, row `i` the rows device `i` routes to each expert (its rows
      are sorted by expert, so each destination's rows are contiguous). Device `j` holds
      experts `[j·E/n, (j+1)·E/n)`.
    buffer_rows: B, the rows a device receives in one round.
    round_index: r (an int or an int32 scalar): this round moves the rows at positions
      `[r·B, (r+1)·B)` of each receiver's stream (senders in order).

  Returns:
    `per_pair` `[n, n]` rows sender `i` routes to device `j` (all rounds);
    `sent` `[n, n]` the rows of the pair that move in this round;
    `first` `[n, n]` the index, among the pair's rows, of the first that moves;
    `send_start` `[n, n]` where those rows begin among sender `i`'s rows;
    `recv_start` `[n, n]` where they land in `j`'s buffer (senders in order, contiguous).
  """
  n, num_experts = all_sizes.shape
  per_pair = all_sizes.reshape(n, n, num_experts // n).sum(-1)
  pair_start = jnp.cumsum(per_pair, axis=1) - per_pair  # among the sender's rows
  stream_start = jnp.cumsum(per_pair, axis=0) - per_pair  # in the receiver's stream
  low = round_index * buffer_rows
  begin = jnp.clip(stream_start, low, low + buffer_rows)
  end = jnp.clip(stream_start + per_pair, low, low + buffer_rows)
  first = jnp.clip(begin - stream_start, 0, per_pair)
  return dict(
    per_pair=per_pair,
    sent=end - begin,
    first=first,
    send_start=pair_start + first,
    recv_start=begin - low,
  )


def num_rounds(all_sizes: jax.Array, buffer_rows: int) -> jax.Array:
  """int32 scalar: the rounds of B rows the fullest receiver of `all_sizes` `[n, E]` needs."""
  n, num_experts = all_sizes.shape
  streams = all_sizes.reshape(n, n, num_experts // n).sum((0, 2))  # [n] rows per receiver
  return (jnp.max(streams) + buffer_rows - 1) // buffer_rows


def exchange_vectors(plan, me, forward: bool):
  """The arguments of `jax.lax.ragged_all_to_all` for device `me` (offsets of empty
  chunks set to 0, so every offset is in range), and where the chunks it receives land in
  its own output (`recv_offsets`, for the CPU exchange).

  Forward: rows -> expert devices' buffers. Backward: buffers -> the rows they came from.
  """
  sent, send_start, recv_start = plan["sent"], plan["send_start"], plan["recv_start"]
  if forward:
    vectors = dict(
      input_offsets=(send_start[me], sent[me]),
      send_sizes=sent[me],
      output_offsets=(recv_start[me], sent[me]),
      recv_sizes=sent[:, me],
      recv_offsets=(recv_start[:, me], sent[:, me]),
    )
  else:
    vectors = dict(
      input_offsets=(recv_start[:, me], sent[:, me]),
      send_sizes=sent[:, me],
      output_offsets=(send_start[:, me], sent[:, me]),
      recv_sizes=sent[me],
      recv_offsets=(send_start[me], sent[me]),
    )
  return {
    name: jnp.where(value[1] > 0, value[0], 0) if isinstance(value, tuple) else value
    for name, value in vectors.items()
  }


def _varying_zeros(shape, dtype, like):
  """Zeros typed to vary over the mesh axes `like` varies over (inside `shard_map`)."""
  zeros = jnp.zeros(shape, dtype)
  varying = tuple(sorted(varying_axes(like)))
  return jax.lax.pcast(zeros, varying, to="varying") if varying else zeros


def ragged_exchange(x, vectors, out_rows: int, chunk: int, platform: str):
  """One ragged all-to-all over the expert axis: `x` `[rows, d]` -> `[out_rows, d]`
  (rows no chunk fills are zero)."""
  output = _varying_zeros((out_rows, x.shape[1]), x.dtype, x)
  if platform in ("gpu", "tpu"):
    return jax.lax.ragged_all_to_all(
      x,
      output,
      vectors["input_offsets"],
      vectors["send_sizes"],
      vectors["output_offsets"],
      vectors["recv_sizes"],
      axis_name=EXPERT,
    )
  # XLA:CPU: blocks of `chunk` rows (the most one device sends another) to every device.
  n = vectors["send_sizes"].shape[0]
  pick = vectors["input_offsets"][:, None] + jnp.arange(chunk)[None]  # [n, chunk]
  valid = jnp.arange(chunk)[None] < vectors["send_sizes"][:, None]
  blocks = jnp.where(valid[..., None], x[jnp.clip(pick, 0, x.shape[0] - 1)], 0)
  received = jax.lax.all_to_all(blocks, EXPERT, 0, 0, tiled=True).reshape(n * chunk, -1)
  starts, sizes = vectors["recv_offsets"], vectors["recv_sizes"]
  rows = jnp.arange(out_rows)[:, None]
  inside = (rows >= starts[None]) & (rows < (starts + sizes)[None])  # [out_rows, n]
  sender = jnp.argmax(inside, axis=1)
  keep = jnp.any(inside, axis=1)
  source = jnp.where(keep, sender * chunk + rows[:, 0] - starts[sender], 0)
  return jnp.where(keep[:, None], received[source], output)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _exchange(x, plan, me, forward, out_rows, chunk, platform):
  return ragged_exchange(x, exchange_vectors(plan, me, forward), out_rows, chunk, platform)


def _exchange_fwd(x, plan, me, forward, out_rows, chunk, platform):
  return _exchange(x, plan, me, forward, out_rows, chunk, platform), (plan, me, x.shape[0])


def _exchange_bwd(forward, out_rows, chunk, platform, residual, dy):
  plan, me, in_rows = residual
  dx = ragged_exchange(dy, exchange_vectors(plan, me, not forward), in_rows, chunk, platform)
  return dx, None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _received_experts(all_sizes, plan, me, local: int, buffer_rows: int):
  """`[B]` the local expert (0..E/n-1) of each received row of a round; `local` for a slot
  no row fills. Received chunks come in sender order, each sorted by expert."""
  mine = jax.lax.dynamic_slice_in_dim(all_sizes, me * local, local, axis=1)  # [n, E/n]
  n = mine.shape[0]
  slots = jnp.arange(buffer_rows)
  chunk_end = plan["recv_start"][:, me] + plan["sent"][:, me]
  sender = jnp.clip(jnp.searchsorted(chunk_end, slots, side="right"), 0, n - 1)
  offset = slots - plan["recv_start"][sender, me] + plan["first"][sender, me]
  expert = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(
    jnp.cumsum(mine, axis=1)[sender], offset
  )
  return jnp.where(slots < jnp.sum(plan["sent"][:, me]), expert, local)


def _local_experts(received, expert, weights, spec, dropout):
  """The local experts on one round's received rows `[B, d]`, in place."""
  local = weights[0].shape[0]
  order = jnp.argsort(expert, stable=True)
  local_sizes = jnp.zeros((local + 1,), jnp.int32).at[expert].add(1)[:local]
  y = experts_lib.grouped_ffn(
    spec.activation, spec.impl, permute_rows(received, order), local_sizes, weights, dropout
  )
  return permute_rows(y, jnp.argsort(order))


def _round_dropout(dropout, round_index):
  if dropout is None:
    return None
  return dropout._replace(key=jax.random.fold_in(dropout.key, round_index))


def dropless_exchange(inputs: RoutedRows, weights, spec, dropout, n: int):
  """Rows `[1, R, d]` sorted by expert -> each expert device -> the local experts -> back,
  in rounds (see the module docstring). Inside `shard_map` over the batch axes, `weights`
  this device's E/n experts.

  Returns:
    (`RoutedRows` of the experts' outputs, the rows dropped `[1]` int32: 0 unless
    `spec.overflow == 'drop'`).
  """
  rows, sizes = inputs.rows[0], inputs.group_sizes[0]
  num_rows, num_experts = rows.shape[0], sizes.shape[0]
  local = num_experts // n
  me = jax.lax.axis_index(EXPERT)
  # A device's tokens send another device at most min(k, E/n) rows each.
  chunk = min(num_rows, num_rows // spec.top_k * min(spec.top_k, local))
  buffer_rows = min(math.ceil(spec.buffer_factor * num_rows), n * chunk)
  chunk = min(chunk, buffer_rows)
  all_sizes = jax.lax.all_gather(sizes, EXPERT)  # [n, E]
  shapes = (buffer_rows, chunk, local)

  plan = exchange_plan(all_sizes, buffer_rows, 0)
  received = _exchange(rows, plan, me, True, buffer_rows, chunk, spec.platform)
  expert = _received_experts(all_sizes, plan, me, local, buffer_rows)
  y = _local_experts(received, expert, weights, spec, dropout)
  out = _exchange(y, plan, me, False, num_rows, chunk, spec.platform)
  if spec.overflow == "drop":
    overflow = jnp.sum(plan["per_pair"][me] - plan["sent"][me])
    return RoutedRows(out[None], inputs.group_sizes), overflow[None]
  if buffer_rows < n * chunk:  # some stream may need more than one round
    rounds = num_rounds(all_sizes, buffer_rows)
    others = tuple(a for a in sorted(varying_axes(rows)) if a != EXPERT)
    if others:
      rounds = jax.lax.pmax(rounds, others)
    missing = tuple(sorted(varying_axes(rows) - varying_axes(weights[0])))
    if missing:  # the later rounds' weight cotangents vary like the rows
      weights = jax.tree.map(lambda w: jax.lax.pcast(w, missing, to="varying"), weights)
    out = out + _later_rounds(rows, weights, all_sizes, rounds, dropout, spec, shapes)
  return RoutedRows(out[None], inputs.group_sizes), jnp.zeros((1,), jnp.int32)


def _round_vectors(all_sizes, round_index, shapes):
  """Round `round_index`'s forward and backward exchange vectors for this device, and the
  local expert of each row it receives."""
  buffer_rows, _, local = shapes
  me = jax.lax.axis_index(EXPERT)
  plan = exchange_plan(all_sizes, buffer_rows, round_index)
  expert = _received_experts(all_sizes, plan, me, local, buffer_rows)
  return exchange_vectors(plan, me, True), exchange_vectors(plan, me, False), expert


def _one_round(rows, weights, all_sizes, round_index, dropout, spec, shapes):
  """Round `round_index`'s rows through their experts and back `[R, d]` (zero for rows of
  other rounds); plain exchanges, for use inside `_later_rounds`' own VJP."""
  buffer_rows, chunk, _ = shapes
  forward, back, expert = _round_vectors(all_sizes, round_index, shapes)
  received = ragged_exchange(rows, forward, buffer_rows, chunk, spec.platform)
  y = _local_experts(received, expert, weights, spec, _round_dropout(dropout, round_index))
  return ragged_exchange(y, back, rows.shape[0], chunk, spec.platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _later_rounds(rows, weights, all_sizes, rounds, dropout, spec, shapes):
  """Rounds 1..rounds-1 summed `[R, d]`: every row round 0 did not move."""

  def body(r, total):
    return total + _one_round(rows, weights, all_sizes, r, dropout, spec, shapes)

  return jax.lax.fori_loop(1, rounds, body, _varying_zeros(rows.shape, rows.dtype, rows))


def _later_rounds_fwd(rows, weights, all_sizes, rounds, dropout, spec, shapes):
  out = _later_rounds(rows, weights, all_sizes, rounds, dropout, spec, shapes)
  return out, (rows, weights, all_sizes, rounds, dropout)


def _later_rounds_bwd(spec, shapes, residual, dy):
  """Each round again: its rows and their cotangents go forward to the expert devices,
  the local experts' VJP runs there, and the rows' cotangents come back."""
  rows, weights, all_sizes, rounds, dropout = residual
  buffer_rows, chunk, _ = shapes

  def body(r, carry):
    drows, dweights = carry
    forward, back, expert = _round_vectors(all_sizes, r, shapes)
    received = ragged_exchange(rows, forward, buffer_rows, chunk, spec.platform)
    dy_received = ragged_exchange(dy, forward, buffer_rows, chunk, spec.platform)
    round_dropout = _round_dropout(dropout, r)
    _, vjp = jax.vjp(
      lambda x, w: _local_experts(x, expert, w, spec, round_dropout), received, weights
    )
    dx_received, dw = vjp(dy_received)
    drows = drows + ragged_exchange(dx_received, back, rows.shape[0], chunk, spec.platform)
    return drows, jax.tree.map(jnp.add, dweights, dw)

  zeros = (
    _varying_zeros(rows.shape, rows.dtype, rows),
    jax.tree.map(lambda w: _varying_zeros(w.shape, w.dtype, w), weights),
  )
  drows, dweights = jax.lax.fori_loop(1, rounds, body, zeros)
  return drows, dweights, None, None, None


_later_rounds.defvjp(_later_rounds_fwd, _later_rounds_bwd)
