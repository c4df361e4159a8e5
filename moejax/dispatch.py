"""How routed tokens reach their experts and come back.

Three dispatch forms; `einsum` and `sort` compute the same function (capacity, drops):

* `einsum`: one-hot dispatch and combine masks `[tokens, experts, capacity]` and two
  einsums (GShard, Lepikhin et al. 2020; Switch; the TPU-friendly form: no gather or
  scatter, positions from a cumulative sum);
* `sort`: assignments are placed into `[experts, capacity, d_model]` buffers by index
  (gather), the experts run on those buffers, and outputs are gathered back (every data
  movement, forward and backward, is a gather: `take_rows`);
* `dropless`: no capacity; rows sorted by expert go through a grouped matmul (MegaBlocks,
  Gale et al. 2022; OLMoE's dMoE).

`auto` (the default) is the fastest capacity form for the backend it runs on
(`resolve_dispatch`): `sort` on CPU and GPU, `einsum` on TPU.

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

DISPATCHES = ("auto", "einsum", "sort", "dropless")


def resolve_dispatch(dispatch: str, backend: str) -> str:
  """The dispatch form `dispatch` runs as on `backend` ('cpu', 'gpu', 'tpu', ...).

  `auto` keeps capacity semantics (the function is that of `einsum` and `sort`; it never
  turns into `dropless`) and picks the faster form:
    * CPU: `sort`. Measured by `experiments/benchmarks/moe_layer.py` (docs/performance.md):
      `einsum` is 2.7-2.9x slower over one group of 4096 tokens and about 1.3x slower
      with groups of 512 (E = 16 and 64); its `[tokens, experts, capacity]` masks grow
      quadratically with the group.
    * GPU: `sort` (gathers and scatter-adds are cheap; the one-hot masks are not).
    * TPU: `einsum`, the form GShard, Switch and ST-MoE use there: it is all matmuls,
      which the MXU runs, while gathers and scatters are slow on TPU.
  Other values are returned unchanged.
  """
  if dispatch != "auto":
    return dispatch
  return "einsum" if backend == "tpu" else "sort"


def expert_capacity(
  num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
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


@jax.custom_vjp
def take_rows(x: jax.Array, take: jax.Array, give: jax.Array) -> jax.Array:
  """Row gather whose gradient is a gather too: `y[m] = x[take[m]]`, `x` `[n, d]`.

  Args:
    x: `[n, d]`.
    take: `[m]` int32, the row of `x` each output row copies; `n` gives a zero row.
    give: `[n, j]` int32, the inverse map: the output rows that copy row `i` of `x`
      (`m` pads). Must list every `m'` with `take[m'] == i`, each once.

  Returns:
    `[m, d]`. The cotangent of `x` is `dx[i] = sum_j dy[give[i, j]]`: a gather and a sum
    over `j` instead of the scatter-add that autodiff of `x[take]` produces, which XLA's
    CPU backend runs serially. Dispatch and combine both know their inverse map (a token
    has at most k slots; a slot holds at most one token), so every data movement of the
    `sort` and `dropless` paths, forward and backward, is a gather.
  """
  return _pad_row(x)[take]


def _pad_row(x: jax.Array) -> jax.Array:
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])


def _take_rows_fwd(x, take, give):
  return take_rows(x, take, give), (take, give)


def _take_rows_bwd(residual, dy):
  take, give = residual
  dx = jnp.sum(_pad_row(dy)[give], axis=1)
  return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def inverse_slots(slot: jax.Array, num_slots: int) -> jax.Array:
  """`[num_slots, 1]` the position in `slot` (`[m]`, values in `[0, num_slots]`) that
  fills each slot, or `m` for an empty slot; the inverse map of `take_rows`. Each slot
  below `num_slots` must be filled at most once (`num_slots` marks "no slot")."""
  m = slot.shape[0]
  return (
    jnp.full((num_slots,), m, jnp.int32)
    .at[slot]
    .set(jnp.arange(m, dtype=jnp.int32), mode="drop")[:, None]
  )


def token_choice_slots(choice: TokenChoice, num_experts: int, capacity: int):
  """The `[experts * capacity]` slot table of a token-choice routing, built by sorting.

  Returns:
    slot_token: `[experts * capacity]` token in each slot (`tokens` marks an empty slot).
    kept: `[tokens, k]` bool, assignments that got a slot.
    token_slot: `[tokens, k]` the slot of each assignment (`experts * capacity` if dropped
      or invalid), the inverse of `slot_token`.
  """
  num_tokens, k = choice.expert_indices.shape
  experts, _, valid, tokens = _assignments(choice)
  _, positions, _ = sort_by_expert(experts, valid, num_experts)
  kept = valid & (positions < capacity)
  size = num_experts * capacity
  slot = jnp.where(kept, experts * capacity + positions, size)
  slot_token = jnp.full((size,), num_tokens, jnp.int32).at[slot].set(tokens, mode="drop")
  return slot_token, kept.reshape(k, num_tokens).T, slot.reshape(k, num_tokens).T


def dispatch_to_slots(
  x: jax.Array, slot_token: jax.Array, token_slot: jax.Array, num_experts: int
) -> jax.Array:
  """`[tokens, d]` -> `[experts, capacity, d]` by gathers (forward and backward); empty
  slots hold zeros. `slot_token`, `token_slot` from `token_choice_slots`."""
  return take_rows(x, slot_token, token_slot).reshape(num_experts, -1, x.shape[-1])


def combine_from_slots(
  expert_out: jax.Array, token_slot: jax.Array, token_gate: jax.Array
) -> jax.Array:
  """`[experts, capacity, d]` -> `[tokens, d]` (see `gated_sum_of_rows`)."""
  return gated_sum_of_rows(expert_out.reshape(-1, expert_out.shape[-1]), token_slot, token_gate)


def gated_sum_of_rows(rows: jax.Array, token_rows: jax.Array, token_gate: jax.Array) -> jax.Array:
  """`[n, d]` -> `[tokens, d]`: each token sums its k rows (`token_rows` `[tokens, k]`, `n`
  = none) weighted by `token_gate` `[tokens, k]`, by gathers forward and backward. Each
  row belongs to at most one (token, rank)."""
  num_tokens, k = token_rows.shape
  flat = token_rows.reshape(-1)
  picked = take_rows(rows, flat, inverse_slots(flat, rows.shape[0])).reshape(num_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", picked, token_gate.astype(picked.dtype))


def expert_choice_slots(choice: ExpertChoice):
  """The slot table of an expert-choice routing: `[experts * capacity]` tokens and gates."""
  return choice.token_indices.reshape(-1), choice.gates.reshape(-1)


def gather_to_experts(x: jax.Array, slot_token: jax.Array, num_experts: int) -> jax.Array:
  """`[tokens, d]` -> `[experts, capacity, d]` by index; empty slots read a zero row."""
  padded = jnp.concatenate([x, jnp.zeros((1, x.shape[-1]), x.dtype)])
  return padded[slot_token].reshape(num_experts, -1, x.shape[-1])


def scatter_from_experts(
  expert_out: jax.Array, slot_token: jax.Array, slot_gate: jax.Array, num_tokens: int
) -> jax.Array:
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
  expert_hot = jax.nn.one_hot(choice.expert_indices, num_experts, dtype=dtype)  # [t, k, e]
  slot_hot = jax.nn.one_hot(
    jnp.where(kept, positions, capacity), capacity, dtype=dtype
  )  # [t, k, c]
  dispatch = jnp.einsum("tke,tkc->tec", expert_hot, slot_hot)
  combine = jnp.einsum("tke,tkc->tec", expert_hot * choice.gates[..., None].astype(dtype), slot_hot)
  return dispatch, combine, kept


def expert_choice_masks(choice: ExpertChoice, num_tokens: int, dtype):
  """One-hot dispatch and combine masks `[tokens, experts, capacity]` of an expert-choice routing."""
  dispatch = jnp.transpose(jax.nn.one_hot(choice.token_indices, num_tokens, dtype=dtype), (2, 0, 1))
  return dispatch, dispatch * choice.gates[None].astype(dtype)


# ----------------------------------------------------------------------------- dropless


def dropless(
  x: jax.Array,
  choice: TokenChoice,
  num_experts: int,
  grouped_experts: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
  """Every valid assignment is processed: sort rows by expert, grouped matmul, gather back.

  Args:
    x: `[tokens, d_model]`.
    choice: `TokenChoice` with `[tokens, k]` fields.
    grouped_experts: `(rows [k·tokens, d], group_sizes [experts]) -> [k·tokens, d]`, rows
      sorted by expert; rows past `sum(group_sizes)` are zero and must map to zero.

  Returns:
    `[tokens, d_model]`.
  """
  num_tokens, k = choice.expert_indices.shape
  num_rows = num_tokens * k
  experts, gates, valid, tokens = _assignments(choice)  # [k·tokens], rank-major
  order, _, group_sizes = sort_by_expert(experts, valid, num_experts)
  row_of = jnp.zeros((num_rows,), jnp.int32).at[order].set(jnp.arange(num_rows, dtype=jnp.int32))
  row_of = jnp.where(valid, row_of, num_rows)
  token_rows = row_of.reshape(k, num_tokens).T  # [tokens, k]
  row_token = jnp.where(valid[order], tokens[order], num_tokens)
  rows = take_rows(x, row_token, token_rows)  # [k·tokens, d], by expert
  out = grouped_experts(rows, group_sizes)
  return gated_sum_of_rows(out, token_rows, jnp.where(choice.valid, choice.gates, 0.0))
