"""Row gathers whose gradients are gathers too: the data movement of `sort` and `dropless`.

Autodiff of a plain gather `x[idx]` produces a scatter-add, which XLA's CPU backend runs
serially. Dispatch and combine both know the inverse of their maps (a token has at most
k slots; a slot holds at most one token), so every data movement, forward and backward,
is a gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def take_rows(x: jax.Array, take: jax.Array, give: jax.Array) -> jax.Array:
  """`y[m] = x[take[m]]`, with `x` `[n, d]` and a gather for the gradient.

  Args:
    x: `[n, d]`.
    take: `[m]` int32, the row of `x` each output row copies; `n` gives a zero row.
    give: `[n, j]` int32, the inverse map: the output rows that copy row `i` of `x`
      (`m` pads). Must list every `m'` with `take[m'] == i`, each once.

  Returns:
    `[m, d]`. The cotangent of `x` is `dx[i] = sum_j dy[give[i, j]]`.
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
  fills each slot, or `m` for an empty slot: the inverse map of `take_rows`. Each slot
  below `num_slots` must be filled at most once (`num_slots` marks "no slot")."""
  m = slot.shape[0]
  return (
    jnp.full((num_slots,), m, jnp.int32)
    .at[slot]
    .set(jnp.arange(m, dtype=jnp.int32), mode="drop")[:, None]
  )


def permute_rows(x: jax.Array, order: jax.Array) -> jax.Array:
  """`x[order]` for a permutation `order` `[n]` of `x`'s rows `[n, d]`, gathers both ways."""
  return take_rows(x, order, inverse_slots(order, x.shape[0]))


def gated_sum_of_rows(rows: jax.Array, token_rows: jax.Array, token_gate: jax.Array) -> jax.Array:
  """`[n, d]` -> `[tokens, d]`: each token sums its k rows (`token_rows` `[tokens, k]`, `n`
  = none) weighted by `token_gate` `[tokens, k]`, by gathers forward and backward. Each
  row belongs to at most one (token, rank)."""
  num_tokens, k = token_rows.shape
  flat = token_rows.reshape(-1)
  picked = take_rows(rows, flat, inverse_slots(flat, rows.shape[0])).reshape(num_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", picked, token_gate.astype(picked.dtype))
