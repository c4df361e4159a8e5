"""Running the experts on prepared inputs, on one device or over a mesh's expert axis.

`run_experts(mesh, inputs, ...)` is the one function between dispatch and the experts:

* without a mesh (or with one batch shard) it is the experts themselves
  (`experts.capacity_ffn` / `experts.grouped_ffn`);
* on a mesh it runs inside `jax.shard_map` over the batch axes: each device takes its
  own groups of `inputs` and, when the mesh has an `expert` axis of size n > 1, reaches
  the experts through an exchange over that axis (GShard, Lepikhin et al. 2020): every
  device holds E/n experts of each layer.

Capacity buffers `[groups, E, C, d]` go by `jax.lax.all_to_all`: each device sends every
other the slots of its experts. Dropless rows go by a ragged exchange, in rounds of a
bounded receive buffer until every row has moved (`moejax.moe.dropless_exchange`).

`per_device(mesh, fn, *args)` runs a per-group function (routing, dispatch, combine) on
each device's own groups with no communication.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.moe import experts as experts_lib
from moejax.moe.dispatch import CapacityBuffers, RoutedRows
from moejax.moe.dropless_exchange import dropless_exchange
from moejax.parallel.sharding import EXPERT, axis_size, batch_axes, num_batch_shards


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
    buffer_factor: `MoeConfig.dropless_buffer_factor`: one round's receive rows over a
      device's own rows.
    overflow: `MoeConfig.dropless_overflow`: 'rounds' (more rounds until every row has
      moved) or 'drop' (rows past the buffer are dropped and counted).
    top_k: experts per token; bounds the rows one device can send another.
  """

  activation: str
  impl: str
  platform: str
  buffer_factor: float
  overflow: str
  top_k: int


def run_experts(mesh, inputs, weights, spec: ExpertSpec, dropout=None):
  """The experts' outputs for `inputs` (`CapacityBuffers` or `RoutedRows`, same type and
  shapes back), and the number of dropless rows dropped for lack of receive buffer
  (int32 scalar; 0 unless `spec.overflow == 'drop'` and an expert axis > 1).

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
    return dropless_exchange(inputs, weights, spec, dropout, n)

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
