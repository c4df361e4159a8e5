"""How routed tokens reach their experts and come back: three dispatch forms, one protocol.

Every form is a value with two methods:

    inputs, plan = form.prepare(x, routing, num_experts=E, capacity=C, dtype=...)  # x [G, S, d]
    y = form.combine(outputs, plan)  # y [G, S, d]; dropless: [1, G·S, d]

where `inputs` are what the experts run on (`CapacityBuffers` or `RoutedRows`),
`outputs` the experts' result of the same type and shape, and `plan` the small pytree the
combine needs (it also holds `kept`, the assignments that reached an expert). Every leaf
of `inputs`, `outputs` and `plan` has a leading group axis, so the layer can run
`prepare` and `combine` on each device's own groups (`expert_parallel.per_device`).

* `EINSUM`: one-hot dispatch and combine masks `[tokens, experts, capacity]` and two
  einsums (GShard, Lepikhin et al. 2020; Switch): no gather or scatter, queue positions
  by a cumulative sum. The TPU form.
* `SORT`: assignments placed into `[experts, capacity, d_model]` buffers by index, and
  gathered back; every data movement, forward and backward, is a gather
  (`moejax.moe.rows`).
* `DROPLESS`: no capacity; the rows of all assignments, sorted by expert, go through a
  grouped matmul (MegaBlocks, Gale et al. 2022; OLMoE's dMoE). Its routing groups do not
  matter, so it makes one set of rows of all the groups it is given.

Capacity and drop priority live here, once. Within a routing group an expert takes at
most `capacity` assignments; every top-1 choice comes before any top-2 choice, then token
order (Switch/GShard "batch prioritised by rank"). An assignment past capacity is
dropped; a token whose assignments are all dropped gets a zero MoE output and the
residual connection carries it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from moejax.moe.routing import ExpertChoice, TokenChoice
from moejax.moe.rows import gated_sum_of_rows, take_rows


@struct.dataclass
class CapacityBuffers:
  """Expert inputs of the capacity forms: `buffers` `[groups, experts, capacity, d_model]`
  (empty slots are zero)."""

  buffers: jax.Array


@struct.dataclass
class RoutedRows:
  """Expert inputs of dropless dispatch.

  Attributes:
    rows: `[groups, rows, d_model]`, each group's rows sorted by expert; rows past
      `sum(group_sizes[g])` are zero and belong to no expert.
    group_sizes: `[groups, experts]` int32, rows per expert.
  """

  rows: jax.Array
  group_sizes: jax.Array


def expert_capacity(
  num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
  """Capacity per expert = max(min_capacity, ceil(capacity_factor · T · k / E)), T the group size.

  It is capped at T: an expert can never receive a token twice, so a larger buffer would
  only hold padding.
  """
  capacity = max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
  return min(capacity, num_tokens)


def assignments(choice: TokenChoice):
  """`(experts, gates, valid, tokens)`, each `[k · tokens]`, flattened in priority order:
  every rank-1 choice first, then rank 2, ...; tokens in order within a rank."""
  num_tokens, k = choice.expert_indices.shape
  experts = choice.expert_indices.T.reshape(-1)
  gates = choice.gates.T.reshape(-1)
  valid = choice.valid.T.reshape(-1)
  tokens = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), k)
  return experts, gates, valid, tokens


def positions_by_cumsum(experts: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
  """Position of each assignment in its expert's queue, by a cumulative one-hot sum.

  Args:
    experts: `[assignments]` expert of each assignment, in priority order.
    valid: `[assignments]` False for assignments that take no place.

  Returns:
    `[assignments]` int32 positions (0 for invalid assignments).
  """
  one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32) * valid[:, None]
  return jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)


def sort_by_expert(experts: jax.Array, valid: jax.Array, num_experts: int):
  """Stable sort of assignments by expert; invalid assignments go last.

  Returns:
    order: `[assignments]` permutation putting assignments in expert order.
    positions: `[assignments]` position of each assignment in its expert's queue (same
      values as `positions_by_cumsum`).
    group_sizes: `[experts]` valid assignments per expert.
  """
  keys = jnp.where(valid, experts, num_experts)
  order = jnp.argsort(keys, stable=True)
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[keys].add(1)
  starts = jnp.cumsum(counts) - counts
  rank_in_expert = jnp.arange(keys.shape[0], dtype=jnp.int32) - starts[keys[order]]
  positions = jnp.zeros_like(rank_in_expert).at[order].set(rank_in_expert)
  return order, positions, counts[:num_experts]


# ----------------------------------------------------------------------------- one group


def token_choice_slots(choice: TokenChoice, num_experts: int, capacity: int):
  """The `[experts * capacity]` slot table of a token-choice routing, built by sorting.

  Returns:
    slot_token: `[experts * capacity]` token in each slot (`tokens` marks an empty slot).
    kept: `[tokens, k]` bool, assignments that got a slot.
    token_slot: `[tokens, k]` the slot of each assignment (`experts * capacity` if dropped
      or invalid), the inverse of `slot_token`.
  """
  num_tokens, k = choice.expert_indices.shape
  experts, _, valid, tokens = assignments(choice)
  _, positions, _ = sort_by_expert(experts, valid, num_experts)
  kept = valid & (positions < capacity)
  size = num_experts * capacity
  slot = jnp.where(kept, experts * capacity + positions, size)
  slot_token = jnp.full((size,), num_tokens, jnp.int32).at[slot].set(tokens, mode="drop")
  return slot_token, kept.reshape(k, num_tokens).T, slot.reshape(k, num_tokens).T


def token_choice_masks(choice: TokenChoice, num_experts: int, capacity: int, dtype):
  """One-hot dispatch and combine masks of a token-choice routing (GShard's einsum form).

  Returns:
    dispatch: `[tokens, experts, capacity]` 1 where a token occupies a slot.
    combine: `[tokens, experts, capacity]` the gate there.
    kept: `[tokens, k]` bool.
  """
  num_tokens, k = choice.expert_indices.shape
  experts, _, valid, _ = assignments(choice)
  positions = positions_by_cumsum(experts, valid, num_experts).reshape(k, num_tokens).T
  kept = choice.valid & (positions < capacity)
  expert_hot = jax.nn.one_hot(choice.expert_indices, num_experts, dtype=dtype)  # [t, k, e]
  slot_hot = jax.nn.one_hot(
    jnp.where(kept, positions, capacity), capacity, dtype=dtype
  )  # [t, k, c]
  dispatch = jnp.einsum("tke,tkc->tec", expert_hot, slot_hot)
  gated = expert_hot * choice.gates[..., None].astype(dtype)
  combine = jnp.einsum("tke,tkc->tec", gated, slot_hot)
  return dispatch, combine, kept


def expert_choice_masks(choice: ExpertChoice, num_tokens: int, dtype):
  """One-hot dispatch and combine masks `[tokens, experts, capacity]` of an expert-choice routing."""
  dispatch = jnp.transpose(jax.nn.one_hot(choice.token_indices, num_tokens, dtype=dtype), (2, 0, 1))
  return dispatch, dispatch * choice.gates[None].astype(dtype)


def _taken(token_indices: jax.Array, num_tokens: int) -> jax.Array:
  """`[tokens]` bool: tokens that some expert of an expert-choice routing took."""
  return jnp.zeros((num_tokens + 1,), bool).at[token_indices.reshape(-1)].set(True)[:num_tokens]


# ----------------------------------------------------------------------------- the forms


@struct.dataclass
class EinsumPlan:
  """`combine_mask` `[groups, tokens, experts, capacity]`; `kept` `[groups, tokens, k]`
  (token choice) or `[groups, tokens]` (expert choice: taken by some expert)."""

  combine_mask: jax.Array
  kept: jax.Array


class Einsum:
  """GShard's form: one-hot masks and einsums, no gathers (see the module docstring)."""

  name = "einsum"

  def prepare(self, x, routing, *, num_experts: int, capacity: int, dtype):
    """`x` `[G, S, d]`, `routing` a `TokenChoice` `[G, S, k]` or `ExpertChoice` `[G, E, C]`
    -> (`CapacityBuffers` `[G, E, C, d]`, `EinsumPlan`)."""
    num_tokens = x.shape[1]
    if isinstance(routing, ExpertChoice):
      dispatch, combine = jax.vmap(lambda c: expert_choice_masks(c, num_tokens, dtype))(routing)
      kept = jax.vmap(lambda c: _taken(c.token_indices, num_tokens))(routing)
    else:
      masks = jax.vmap(lambda c: token_choice_masks(c, num_experts, capacity, dtype))
      dispatch, combine, kept = masks(routing)
    buffers = jnp.einsum("gsec,gsd->gecd", dispatch, x.astype(dtype))
    return CapacityBuffers(buffers), EinsumPlan(combine, kept)

  def combine(self, outputs: CapacityBuffers, plan: EinsumPlan) -> jax.Array:
    """`[G, E, C, d]` -> `[G, S, d]`."""
    return jnp.einsum("gsec,gecd->gsd", plan.combine_mask, outputs.buffers)


@struct.dataclass
class SortPlan:
  """Token choice: `token_slot` `[groups, tokens, k]` (the slot of each assignment; E·C =
  dropped), `token_gate` `[groups, tokens, k]` (0 where dropped). Expert choice:
  `token_slot` `[groups, E·C]` (the token in each slot), `token_gate` `[groups, E·C]`.
  `kept` as in `EinsumPlan`."""

  token_slot: jax.Array
  token_gate: jax.Array
  kept: jax.Array


class Sort:
  """Slots by sorting, data movement by gathers (see the module docstring)."""

  name = "sort"

  def prepare(self, x, routing, *, num_experts: int, capacity: int, dtype):
    """As `Einsum.prepare`, with a `SortPlan`."""
    num_groups, num_tokens, d = x.shape
    x = x.astype(dtype)
    if isinstance(routing, ExpertChoice):
      slot_token = routing.token_indices.reshape(num_groups, -1)
      # A token may sit in any number of slots: a plain gather, and a scatter-add back.
      padded = jnp.concatenate([x, jnp.zeros((num_groups, 1, d), dtype)], axis=1)
      buffers = jnp.take_along_axis(padded, slot_token[..., None], axis=1)
      kept = jax.vmap(lambda t: _taken(t, num_tokens))(routing.token_indices)
      plan = SortPlan(slot_token, routing.gates.reshape(num_groups, -1), kept)
    else:
      slots = jax.vmap(lambda c: token_choice_slots(c, num_experts, capacity))
      slot_token, kept, token_slot = slots(routing)
      buffers = jax.vmap(take_rows)(x, slot_token, token_slot)
      plan = SortPlan(token_slot, jnp.where(kept, routing.gates, 0.0), kept)
    return CapacityBuffers(buffers.reshape(num_groups, num_experts, -1, d)), plan

  def combine(self, outputs: CapacityBuffers, plan: SortPlan) -> jax.Array:
    """`[G, E, C, d]` -> `[G, S, d]`."""
    num_groups, num_experts, capacity, d = outputs.buffers.shape
    flat = outputs.buffers.reshape(num_groups, num_experts * capacity, d)
    if plan.kept.ndim == 2:  # expert choice: each token sums the gated slots it sits in
      num_tokens = plan.kept.shape[1]
      weighted = flat * plan.token_gate[..., None].astype(flat.dtype)
      out = jnp.zeros((num_groups, num_tokens + 1, d), flat.dtype)
      out = jax.vmap(lambda o, s, w: o.at[s].add(w))(out, plan.token_slot, weighted)
      return out[:, :num_tokens]
    return jax.vmap(gated_sum_of_rows)(flat, plan.token_slot, plan.token_gate)


@struct.dataclass
class DroplessPlan:
  """`token_rows` `[1, tokens, k]` (the row of each assignment, rows = none),
  `token_gate` `[1, tokens, k]`, `kept` `[1, tokens, k]` (the valid assignments); tokens
  are all the groups' tokens, group-major."""

  token_rows: jax.Array
  token_gate: jax.Array
  kept: jax.Array


class Dropless:
  """Every valid assignment is processed: rows sorted by expert, a grouped matmul, a
  gated gather back (see the module docstring)."""

  name = "dropless"

  def prepare(self, x, routing: TokenChoice, *, num_experts: int, capacity: int | None, dtype):
    """`x` `[G, S, d]`, `routing` `[G, S, k]` -> (`RoutedRows` `[1, G·S·k, d]`, `DroplessPlan`)."""
    del capacity  # dropless has none
    num_groups, group, d = x.shape
    flat = jax.tree.map(lambda a: a.reshape(num_groups * group, *a.shape[2:]), routing)
    num_tokens, k = flat.expert_indices.shape
    num_rows = num_tokens * k
    experts, _, valid, tokens = assignments(flat)  # [k·tokens], rank-major
    order, _, group_sizes = sort_by_expert(experts, valid, num_experts)
    row_of = jnp.zeros((num_rows,), jnp.int32).at[order].set(jnp.arange(num_rows, dtype=jnp.int32))
    row_of = jnp.where(valid, row_of, num_rows)
    token_rows = row_of.reshape(k, num_tokens).T  # [tokens, k]
    row_token = jnp.where(valid[order], tokens[order], num_tokens)
    rows = take_rows(x.reshape(num_tokens, d).astype(dtype), row_token, token_rows)
    gates = jnp.where(flat.valid, flat.gates, 0.0)
    plan = DroplessPlan(token_rows[None], gates[None], flat.valid[None])
    return RoutedRows(rows[None], group_sizes[None]), plan

  def combine(self, outputs: RoutedRows, plan: DroplessPlan) -> jax.Array:
    """`[1, rows, d]` -> `[1, G·S, d]`, the tokens of `prepare` group-major."""
    return gated_sum_of_rows(outputs.rows[0], plan.token_rows[0], plan.token_gate[0])[None]


EINSUM, SORT, DROPLESS = Einsum(), Sort(), Dropless()
FORMS = {form.name: form for form in (EINSUM, SORT, DROPLESS)}
