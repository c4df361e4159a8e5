"""Running the experts on prepared inputs, on one device or over a mesh's expert axis.

`run_experts(mesh, inputs, ...)` is the one function between dispatch and the experts:

* without a mesh (or with one batch shard) it is the experts themselves
  (`experts.capacity_ffn` / `experts.grouped_ffn`);
* on a mesh it runs inside `jax.shard_map` over the batch axes: each device takes its
  own groups of `inputs` and, when the mesh has an `expert` axis of size n > 1, reaches
  the experts through an exchange over that axis (GShard, Lepikhin et al. 2020): every
  device holds E/n experts of each layer.

Capacity buffers `[groups, E, C, d]` go by `jax.lax.all_to_all`: each device sends every
other the slots of its experts. Dropless rows go by a ragged exchange
(`jax.lax.ragged_all_to_all` on GPU and TPU, as MaxText and Megatron do): each device
sends each expert-device exactly the rows routed there. A device's receive buffer holds
`ceil(dropless_buffer_factor · R)` rows, R being its own routed rows (the expected load
when experts are balanced); rows that would land past it are dropped, come back as zeros,
and are counted (`overflow` → the layer's `dropped_fraction`), never silently. XLA's CPU
backend lacks `ragged_all_to_all`, so there the same exchange runs as an `all_to_all` of
fixed-size blocks (the most one device can send another) with the same offsets and the
same result. A custom VJP makes the backward of each exchange the exchange the other way.

`per_device(mesh, fn, *args)` runs a per-group function (routing, dispatch, combine) on
each device's own groups with no communication.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe import experts as experts_lib
from moejax.moe.dispatch import CapacityBuffers, RoutedRows
from moejax.moe.rows import permute_rows
from moejax.sharding import EXPERT, axis_size, batch_axes, num_batch_shards, varying_axes


def shards_groups(mesh, num_groups: int) -> bool:
  """Whether the per-device program runs on `mesh`: it has several batch shards and they
  divide the `num_groups` leading groups (each device holds whole groups)."""
  if mesh is None:
    return False
  shards = num_batch_shards(mesh)
  return shards > 1 and num_groups % shards == 0


def per_device(mesh, fn: Callable, *args, replicated=()):
  """`fn(*args, *replicated)` on each device's share of the leading (group) axis of every
  leaf of `args` and of the result, without communication, when `shards_groups`; else
  plain `fn(*args, *replicated)` (XLA partitions the program). `replicated` arrays are
  whole on every device. For per-group work that XLA's partitioner would otherwise
  gather (top-k of batch-sharded probabilities is one)."""
  if not shards_groups(mesh, jax.tree.leaves(args)[0].shape[0]):
    return fn(*args, *replicated)
  spec = P(batch_axes(mesh))
  in_specs = (spec,) * len(args) + (P(),) * len(replicated)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=spec)(*args, *replicated)


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """The static facts `run_experts` needs.

  Attributes:
    activation: the experts' activation.
    impl: 'block_loop' or 'grouped_matmul' (`moejax.moe.experts`).
    platform: the devices' platform ('cpu', 'gpu', 'tpu'): picks the dropless exchange.
    buffer_factor: `MoeConfig.dropless_buffer_factor`.
    top_k: experts per token; bounds the rows one device can send another.
  """

  activation: str
  impl: str
  platform: str
  buffer_factor: float
  top_k: int


def run_experts(mesh, inputs, weights, spec: ExpertSpec, dropout=None):
  """The experts' outputs for `inputs` (`CapacityBuffers` or `RoutedRows`, same type and
  shapes back), and the number of dropless rows dropped for lack of receive buffer
  (int32 scalar; always 0 without an expert axis > 1).

  Args:
    mesh: None, or the layer's mesh. With an `expert` axis of size n > 1, `weights` are
      sharded over it and every device's groups must be whole (`shards_groups`).
    inputs: leading group axis first (see `moejax.moe.dispatch`).
    weights: `experts.ExpertWeights` of all E experts (global view).
    spec: `ExpertSpec`.
    dropout: `experts.ExpertDropout` or None.
  """
  n = axis_size(mesh, EXPERT)
  if not shards_groups(mesh, jax.tree.leaves(inputs)[0].shape[0]):
    if n > 1:
      raise ValueError("expert parallelism needs whole routing groups on every device.")
    return _local(inputs, weights, spec, dropout), jnp.zeros((), jnp.int32)
  batch = P(batch_axes(mesh))

  def body(inputs, weights, dropout):
    dropout = _per_device_dropout(dropout, mesh)
    if n == 1:
      return _local(inputs, weights, spec, dropout), jnp.zeros((1,), jnp.int32)
    if isinstance(inputs, CapacityBuffers):
      return _capacity_exchange(inputs, weights, spec, dropout, n), jnp.zeros((1,), jnp.int32)
    return _dropless_exchange(inputs, weights, spec, dropout, n)

  weight_spec = P(EXPERT) if n > 1 else P()
  outputs, overflow = jax.shard_map(
    body, mesh=mesh, in_specs=(batch, weight_spec, P()), out_specs=(batch, batch)
  )(inputs, weights, dropout)
  return outputs, jnp.sum(overflow)


def _per_device_dropout(dropout, mesh):
  """Inside `shard_map`: the dropout key folded with the device's batch-shard index."""
  if dropout is None:
    return None
  index = jnp.int32(0)
  for name in batch_axes(mesh):
    index = index * axis_size(mesh, name) + jax.lax.axis_index(name)
  return dropout._replace(key=jax.random.fold_in(dropout.key, index))


def _local(inputs, weights, spec: ExpertSpec, dropout):
  """All experts on this program's inputs, no exchange."""
  if isinstance(inputs, CapacityBuffers):
    groups, num_experts, capacity, d = inputs.buffers.shape
    x = jnp.transpose(inputs.buffers, (1, 0, 2, 3)).reshape(num_experts, groups * capacity, d)
    y = experts_lib.capacity_ffn(spec.activation, spec.impl, x, weights, dropout)
    y = jnp.transpose(y.reshape(num_experts, groups, capacity, d), (1, 0, 2, 3))
    return CapacityBuffers(y)
  if inputs.rows.shape[0] != 1:
    raise ValueError(f"dropless rows come one set per program, got {inputs.rows.shape[0]}.")
  rows = experts_lib.grouped_ffn(
    spec.activation, spec.impl, inputs.rows[0], inputs.group_sizes[0], weights, dropout
  )
  return RoutedRows(rows[None], inputs.group_sizes)


def _capacity_exchange(inputs: CapacityBuffers, weights, spec, dropout, n: int):
  """`[G, E, C, d]` -> all-to-all (each device gets the slots of its E/n experts from every
  device: `[n·G, E/n, C, d]`) -> the local experts -> all-to-all back."""
  groups, num_experts, capacity, d = inputs.buffers.shape
  local = num_experts // n
  received = jax.lax.all_to_all(inputs.buffers, EXPERT, 1, 0, tiled=True)
  x = jnp.transpose(received, (1, 0, 2, 3)).reshape(local, n * groups * capacity, d)
  y = experts_lib.capacity_ffn(spec.activation, spec.impl, x, weights, dropout)
  y = jnp.transpose(y.reshape(local, n * groups, capacity, d), (1, 0, 2, 3))
  return CapacityBuffers(jax.lax.all_to_all(y, EXPERT, 0, 1, tiled=True))


# ----------------------------------------------------------------------------- dropless


def exchange_plan(all_sizes: jax.Array, buffer_rows: int) -> dict[str, jax.Array]:
  """Who sends how many dropless rows where, from every device's per-expert row counts.

  Args:
    all_sizes: `[n, E]` int32, row `i` the rows device `i` routes to each expert (its rows
      are sorted by expert, so each destination's rows are contiguous). Device `j` holds
      experts `[j·E/n, (j+1)·E/n)`.
    buffer_rows: the rows a device can receive.

  Returns:
    `per_pair` `[n, n]` rows sender `i` routes to device `j`; `sent` `[n, n]` the rows that
    fit (rows landing past a receiver's buffer are dropped, latest senders first);
    `send_start` `[n, n]` where sender `i`'s rows for `j` begin among its rows;
    `recv_start` `[n, n]` where they land in `j`'s buffer (senders in order).
  """
  n, num_experts = all_sizes.shape
  per_pair = all_sizes.reshape(n, n, num_experts // n).sum(-1)
  send_start = jnp.cumsum(per_pair, axis=1) - per_pair
  recv_start = jnp.cumsum(per_pair, axis=0) - per_pair
  sent = jnp.clip(buffer_rows - recv_start, 0, per_pair)
  return dict(per_pair=per_pair, sent=sent, send_start=send_start, recv_start=recv_start)


def exchange_vectors(plan, me, forward: bool):
  """The arguments of `jax.lax.ragged_all_to_all` for device `me`, and where the chunks it
  receives land in its own output (`recv_offsets`, for the CPU exchange).

  Forward: rows -> expert devices' buffers. Backward: buffers -> the rows they came from.
  """
  sent, send_start, recv_start = plan["sent"], plan["send_start"], plan["recv_start"]
  if forward:
    return dict(
      input_offsets=send_start[me],
      send_sizes=sent[me],
      output_offsets=recv_start[me],
      recv_sizes=sent[:, me],
      recv_offsets=recv_start[:, me],
    )
  return dict(
    input_offsets=recv_start[:, me],
    send_sizes=sent[:, me],
    output_offsets=send_start[:, me],
    recv_sizes=sent[me],
    recv_offsets=send_start[me],
  )


def _ragged_exchange(x, vectors, out_rows: int, chunk: int, platform: str):
  """One ragged all-to-all over the expert axis: `x` `[rows, d]` -> `[out_rows, d]`."""
  output = jnp.zeros((out_rows, x.shape[1]), x.dtype)
  if platform in ("gpu", "tpu"):
    # The result is typed like `output`: make it vary over the mesh axes `x` varies over,
    # or the backward pass's cotangent would not match its primal's type.
    varying = tuple(sorted(varying_axes(x)))
    if varying:
      output = jax.lax.pcast(output, varying, to="varying")
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
  starts = vectors["recv_offsets"]
  rows = jnp.arange(out_rows)
  sender = jnp.clip(jnp.searchsorted(starts, rows, side="right") - 1, 0, n - 1)
  offset = rows - starts[sender]
  keep = (offset >= 0) & (offset < vectors["recv_sizes"][sender])
  source = jnp.where(keep, sender * chunk + offset, 0)
  return jnp.where(keep[:, None], received[source], output)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _exchange(x, plan, me, forward, out_rows, chunk, platform):
  return _ragged_exchange(x, exchange_vectors(plan, me, forward), out_rows, chunk, platform)


def _exchange_fwd(x, plan, me, forward, out_rows, chunk, platform):
  return _exchange(x, plan, me, forward, out_rows, chunk, platform), (plan, me, x.shape[0])


def _exchange_bwd(forward, out_rows, chunk, platform, residual, dy):
  plan, me, in_rows = residual
  dx = _ragged_exchange(dy, exchange_vectors(plan, me, not forward), in_rows, chunk, platform)
  return dx, None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _dropless_exchange(inputs: RoutedRows, weights, spec: ExpertSpec, dropout, n: int):
  """Rows `[1, R, d]` sorted by expert -> each expert device (ragged exchange) -> sorted by
  local expert -> the local experts -> back. Returns (`RoutedRows`, overflow `[1]`)."""
  rows, sizes = inputs.rows[0], inputs.group_sizes[0]
  num_rows, num_experts = rows.shape[0], sizes.shape[0]
  local = num_experts // n
  me = jax.lax.axis_index(EXPERT)
  # A device's tokens send another device at most min(k, E/n) rows each.
  chunk = min(num_rows, num_rows // spec.top_k * min(spec.top_k, local))
  buffer_rows = min(math.ceil(spec.buffer_factor * num_rows), n * chunk)
  all_sizes = jax.lax.all_gather(sizes, EXPERT)  # [n, E]
  plan = exchange_plan(all_sizes, buffer_rows)
  received = _exchange(rows, plan, me, True, buffer_rows, chunk, spec.platform)

  # Each received row's local expert: chunks in sender order, each sorted by expert.
  mine = jax.lax.dynamic_slice_in_dim(all_sizes, me * local, local, axis=1)  # [n, E/n]
  slots = jnp.arange(buffer_rows)
  chunk_end = plan["recv_start"][:, me] + plan["sent"][:, me]
  sender = jnp.clip(jnp.searchsorted(chunk_end, slots, side="right"), 0, n - 1)
  offset = slots - plan["recv_start"][sender, me]
  expert = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(
    jnp.cumsum(mine, axis=1)[sender], offset
  )
  expert = jnp.where(slots < jnp.sum(plan["sent"][:, me]), expert, local)
  order = jnp.argsort(expert, stable=True)
  local_sizes = jnp.zeros((local + 1,), jnp.int32).at[expert].add(1)[:local]
  y = experts_lib.grouped_ffn(
    spec.activation, spec.impl, permute_rows(received, order), local_sizes, weights, dropout
  )
  y = permute_rows(y, jnp.argsort(order))
  back = _exchange(y, plan, me, False, num_rows, chunk, spec.platform)
  overflow = jnp.sum(plan["per_pair"][me] - plan["sent"][me])
  return RoutedRows(back[None], inputs.group_sizes), overflow[None]
