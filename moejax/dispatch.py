"""How routed tokens reach their experts and come back.

Three dispatch forms compute the same function:

* `einsum`: one-hot dispatch and combine masks `[tokens, experts, capacity]` and two
  einsums (GShard, Lepikhin et al. 2020; Switch; the TPU-friendly form: no gather or
  scatter, positions from a cumulative sum);
* `sort`: assignments are placed into `[experts, capacity, d_model]` buffers by index
  (gather), the experts run as one batched matmul, and outputs are scatter-added back;
* `dropless`: no capacity; rows sorted by expert go through a grouped matmul (MegaBlocks,
  Gale et al. 2022; OLMoE's dMoE).

Capacity and drop priority live here, once. Within a routing group, an expert takes at
most `capacity` assignments; every top-1 choice comes before any top-2 choice, then
token order (Switch/GShard "batch prioritised by rank"). An assignment past capacity is
dropped; a token whose assignments are all dropped gets a zero MoE output and the
residual connection carries it.

Functions here act on one routing group (`[tokens, ...]`); the layer vmaps them over
groups.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from moejax.routing import ExpertChoice, TokenChoice

DISPATCHES = ("einsum", "sort", "dropless")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Capacity per expert = max(min_capacity, ceil(capacity_factor · T · k / E)), T the group size.

  It is capped at T: an expert can never receive a token twice, so a larger buffer would
  only hold padding.
  """
  capacity = max(min_capacity, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
  return min(capacity, num_tokens)


def _assignments(choice: TokenChoice):
  """Flatten `[tokens, k]` to `[k * tokens]` in priority order: all rank-1 choices first."""
  num_tokens, k = choice.expert_indices.shape
  experts = choice.expert_indices.T.reshape(-1)
  gates = choice.gates.T.reshape(-1)
  valid = choice.valid.T.reshape(-1)
  tokens = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), k)
  return experts, gates, valid, tokens


def assignment_lists(choice: TokenChoice):
  """`(experts, gates, valid, tokens)`, each `[k * tokens]`, in priority order (rank-1 first)."""
  return _assignments(choice)


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


# ----------------------------------------------------------------------------- capacity paths


def token_choice_slots(choice: TokenChoice, num_experts: int, capacity: int):
  """The `[experts * capacity]` slot table of a token-choice routing, built by sorting.

  Returns:
    slot_token: `[experts * capacity]` token in each slot (`tokens` marks an empty slot).
    slot_gate: `[experts * capacity]` combine weight of each slot (0 for empty).
    kept: `[tokens, k]` bool, assignments that got a slot.
  """
  num_tokens, k = choice.expert_indices.shape
  experts, gates, valid, tokens = _assignments(choice)
  _, positions, _ = sort_by_expert(experts, valid, num_experts)
  kept = valid & (positions < capacity)
  slot = jnp.where(kept, experts * capacity + positions, num_experts * capacity)
  size = num_experts * capacity
  slot_token = jnp.full((size,), num_tokens, jnp.int32).at[slot].set(tokens, mode="drop")
  slot_gate = jnp.zeros((size,), gates.dtype).at[slot].set(gates, mode="drop")
  return slot_token, slot_gate, kept.reshape(k, num_tokens).T


def expert_choice_slots(choice: ExpertChoice):
  """The slot table of an expert-choice routing: `[experts * capacity]` tokens and gates."""
  return choice.token_indices.reshape(-1), choice.gates.reshape(-1)


def gather_to_experts(x: jax.Array, slot_token: jax.Array, num_experts: int) -> jax.Array:
  """`[tokens, d]` -> `[experts, capacity, d]` by index; empty slots read a zero row."""
  padded = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])
  return padded[slot_token].reshape(num_experts, -1, x.shape[-1])


def scatter_from_experts(expert_out: jax.Array, slot_token: jax.Array, slot_gate: jax.Array,
                         num_tokens: int) -> jax.Array:
  """`[experts, capacity, d]` -> `[tokens, d]`: each token sums its slots' gated outputs."""
  flat = expert_out.reshape(-1, expert_out.shape[-1])
  weighted = flat * slot_gate[:, None].astype(flat.dtype)
  out = jnp.zeros((num_tokens + 1, flat.shape[-1]), flat.dtype).at[slot_token].add(weighted)
  return out[:num_tokens]


def token_choice_masks(choice: TokenChoice, num_experts: int, capacity: int, dtype):
  """One-hot dispatch and combine masks of a token-choice routing (GShard's einsum form).

  Returns:
    dispatch: `[tokens, experts, capacity]` 1 where a token occupies a slot.
    combine: `[tokens, experts, capacity]` the gate there.
    kept: `[tokens, k]` bool.
  """
  num_tokens, k = choice.expert_indices.shape
  experts, _, valid, _ = _assignments(choice)
  positions = positions_by_cumsum(experts, valid, num_experts).reshape(k, num_tokens).T
  kept = choice.valid & (positions < capacity)
  expert_hot = jax.nn.one_hot(choice.expert_indices, num_experts, dtype=dtype)   # [t, k, e]
  slot_hot = jax.nn.one_hot(jnp.where(kept, positions, capacity), capacity, dtype=dtype)  # [t, k, c]
  dispatch = jnp.einsum("tke,tkc->tec", expert_hot, slot_hot)
  combine = jnp.einsum("tke,tkc->tec", expert_hot * choice.gates[..., None].astype(dtype), slot_hot)
  return dispatch, combine, kept


def expert_choice_masks(choice: ExpertChoice, num_tokens: int, dtype):
  """One-hot dispatch and combine masks `[tokens, experts, capacity]` of an expert-choice routing."""
  dispatch = jnp.transpose(jax.nn.one_hot(choice.token_indices, num_tokens, dtype=dtype), (2, 0, 1))
  return dispatch, dispatch * choice.gates[None].astype(dtype)


# ----------------------------------------------------------------------------- dropless


def dropless(x: jax.Array, choice: TokenChoice, num_experts: int,
             grouped_experts: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Every valid assignment is processed: sort rows by expert, grouped matmul, scatter back.

  Args:
    x: `[tokens, d_model]`.
    choice: `TokenChoice` with `[tokens, k]` fields.
    grouped_experts: `(rows [k·tokens, d], group_sizes [experts]) -> [k·tokens, d]`.

  Returns:
    `[tokens, d_model]`.
  """
  experts, gates, valid, tokens = _assignments(choice)
  order, _, group_sizes = sort_by_expert(experts, valid, num_experts)
  sorted_tokens = tokens[order]
  out = grouped_experts(x[sorted_tokens], group_sizes)
  weight = jnp.where(valid[order], gates[order], 0.0).astype(out.dtype)
  return jnp.zeros((x.shape[0], out.shape[-1]), out.dtype).at[sorted_tokens].add(out * weight[:, None])
