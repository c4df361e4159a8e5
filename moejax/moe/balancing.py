"""Load balance: the auxiliary losses on the router and aux-loss-free balancing's bias.

Each function acts on router outputs (`moejax.moe.routing`) and returns a float32 scalar
loss, or the new bias; all math is float32, whatever the layer's compute dtype. The losses
take an optional `token_mask` (bool, True = a real token): padding of packed rows
(`moejax.layers.document_mask`) then counts nowhere, every mean being over the real tokens only.

| piece | function | config key |
|---|---|---|
| Switch LB loss E·Σ f·P, pooled per call or per routing group | `pooled_load_balancing_loss` | `lb_loss_weight`, `lb_pooling` |
| router z-loss (ST-MoE) | `router_z_loss` | `z_loss_weight` |
| DeepSeek-V3 sequence-wise balance loss | `sequence_aux_loss` | `seq_aux_loss_weight` |
| aux-loss-free selection bias (Wang et al. 2024) | `expert_counts`, `update_selection_bias` | `bias_update_rate` |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LB_POOLINGS = ("group", "call")


def _masked_mean(values: jax.Array, token_mask: jax.Array, axis=None) -> jax.Array:
  """The mean of float32 `values` over the True entries of `token_mask` (same shape, or a
  prefix of it); 0.0 where there are none. Masked entries do not reach the result."""
  mask = token_mask.reshape(token_mask.shape + (1,) * (values.ndim - token_mask.ndim))
  total = jnp.sum(jnp.where(mask, values, 0.0), axis=axis)
  count = jnp.sum(jnp.broadcast_to(mask, values.shape), axis=axis, dtype=jnp.float32)
  return total / jnp.maximum(count, 1.0)


def load_balancing_loss(
  router_probs: jax.Array,
  expert_indices: jax.Array,
  num_experts: int,
  token_mask: jax.Array | None = None,
) -> jax.Array:
  """Auxiliary load-balancing loss E · Σᵢ fᵢ · Pᵢ (Switch Transformer, Fedus et al. 2021, eq. 4).

  fᵢ is the share of the T·k token→expert assignments (before capacity) that go to expert
  i; Pᵢ is the mean router probability of expert i over the T tokens. It equals 1.0 for
  perfectly uniform routing, for any k, and grows as routing concentrates.

  Args:
    router_probs: `[..., experts]` softmax router probabilities; leading dims are tokens.
    expert_indices: `[..., k]` chosen experts for the same tokens.
    num_experts: E.
    token_mask: None (every token), or `[...]` bool: f and P over the True tokens only
      (0.0 when there are none).

  Returns:
    A float32 scalar.
  """
  probs = router_probs.reshape(-1, router_probs.shape[-1]).astype(jnp.float32)
  if token_mask is not None:
    real = token_mask.reshape(-1)  # [T]
    chosen = jax.nn.one_hot(expert_indices.reshape(real.shape[0], -1), num_experts)  # [T, k, E]
    assignment_share = _masked_mean(jnp.sum(chosen, axis=1), real, axis=0) / chosen.shape[1]
    return num_experts * jnp.sum(assignment_share * _masked_mean(probs, real, axis=0))
  indices = expert_indices.reshape(-1)
  assignment_share = jnp.zeros((num_experts,), jnp.float32).at[indices].add(1.0)
  assignment_share = assignment_share / indices.shape[0]
  mean_prob = jnp.mean(probs, axis=0)
  return num_experts * jnp.sum(assignment_share * mean_prob)


def router_z_loss(router_logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
  """Router z-loss: mean over tokens of logsumexp(logits)² (ST-MoE, Zoph et al. 2022, eq. 5).

  Args:
    router_logits: `[..., experts]`; leading dims are tokens.
    token_mask: None (every token), or `[...]` bool: the mean over the True tokens only.

  Returns:
    A float32 scalar.
  """
  logits = router_logits.astype(jnp.float32)
  z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
  return jnp.mean(z) if token_mask is None else _masked_mean(z, token_mask)


def expert_counts(
  expert_indices: jax.Array, num_experts: int, valid: jax.Array | None = None
) -> jax.Array:
  """Token→expert assignments per expert: `[experts]` float32 from `[..., k]` indices.

  `valid` (`[..., k]` bool) drops assignments the router did not send. Sum the result
  over devices and micro-batches (`jax.lax.psum`, or add) to get the global batch's
  counts that `update_selection_bias` takes.
  """
  indices = expert_indices.reshape(-1)
  weights = (
    jnp.ones(indices.shape, jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
  )
  return jnp.zeros((num_experts,), jnp.float32).at[indices].add(weights)


def update_selection_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
  """One aux-loss-free balancing step: b_i ← b_i + u · sign(c̄ - c_i); returns the new bias.

  Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
  (arXiv:2408.15664), Algorithm 1: c_i is the number of tokens assigned to expert i in
  the batch, c̄ their mean, e_i = c̄ - c_i, and b_i ← b_i + u · sign(e_i). An overloaded
  expert's bias falls by u, an underloaded one's rises by u, a balanced one's stays.
  DeepSeek-V3 (arXiv:2412.19437, §2.1.2; §4.2: bias update speed γ = 0.001 for the first
  14.3T tokens, then 0.0) applies it at the end of every step to the counts of the whole
  step's batch. Run it outside the differentiated loss; it has no gradient.

  sign(c̄ - c_i) does not change when every count is scaled by the same positive number,
  so shares of the assignments (the layer's `expert_load`) work as well as counts.

  Args:
    bias: `[experts]` float32, the current selection bias.
    counts: `[experts]`, the assignments per expert over the global batch
      (`expert_counts`, summed over devices and micro-batches), or their shares.
    rate: u (`model.bias_update_rate`); 0 leaves the bias unchanged.

  Returns:
    `[experts]` float32.
  """
  if bias.shape != counts.shape or bias.ndim != 1:
    raise ValueError(f"bias {bias.shape} and counts {counts.shape} must both have shape [experts].")
  counts = jax.lax.stop_gradient(counts.astype(jnp.float32))
  error = jnp.mean(counts) - counts
  return jax.lax.stop_gradient(bias.astype(jnp.float32) + rate * jnp.sign(error))


def sequence_aux_loss(
  scores: jax.Array,
  expert_indices: jax.Array,
  num_experts: int,
  token_mask: jax.Array | None = None,
) -> jax.Array:
  """DeepSeek-V3's complementary sequence-wise balance loss Σ_i f_i · P_i, mean over sequences.

  DeepSeek-V3 (arXiv:2412.19437, §2.1.2, eqs. 17-20), for one sequence of T tokens with
  top-K_r routing over N_r experts:

      f_i   = N_r / (K_r · T) · Σ_t 1[token t chose expert i]          (eq. 18)
      s'_it = s_it / Σ_j s_jt      (the scores renormalised over all experts, eq. 19)
      P_i   = 1/T · Σ_t s'_it                                           (eq. 20)
      L_Bal = α · Σ_i f_i · P_i                                         (eq. 17)

  This returns Σ_i f_i P_i averaged over the sequences of the batch, without α: the caller
  multiplies by α = `model.seq_aux_loss_weight` (DeepSeek-V3 §4.2: 0.0001), as it does the
  LB loss by `lb_loss_weight`. It is 1.0 for perfectly uniform routing (the same
  normalisation as `load_balancing_loss`), and differentiable in `scores` only.

  Args:
    scores: `[batch, seq, experts]` router scores (sigmoid for DeepSeek-V3; softmax works
      too and then s' = s), positive.
    expert_indices: `[batch, seq, k]` the chosen experts (chosen with the selection bias).
    num_experts: N_r.
    token_mask: None (every token), or `[batch, seq]` bool: T, f and P of a sequence count
      its True tokens only, and the mean is over the sequences that have any.

  Returns:
    A float32 scalar.
  """
  if scores.ndim != 3 or expert_indices.ndim != 3 or scores.shape[:2] != expert_indices.shape[:2]:
    raise ValueError(
      f"sequence_aux_loss needs scores [batch, seq, experts] and indices [batch, seq, k], got "
      f"{scores.shape} and {expert_indices.shape}."
    )
  scores = scores.astype(jnp.float32)
  _, seq, k = expert_indices.shape
  normalised = scores / jnp.sum(scores, axis=-1, keepdims=True)
  chosen = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32)  # [b, s, k, E]
  if token_mask is not None:
    mean_score = _masked_mean(normalised, token_mask, axis=1)  # P: [batch, experts]
    fraction = num_experts / k * _masked_mean(jnp.sum(chosen, axis=2), token_mask, axis=1)
    has_tokens = jnp.any(token_mask, axis=1)  # [batch]
    return _masked_mean(jnp.sum(fraction * mean_score, axis=-1), has_tokens)
  mean_score = jnp.mean(normalised, axis=1)  # P: [batch, experts]
  fraction = num_experts / (k * seq) * jnp.sum(chosen, axis=(1, 2))  # f: [batch, experts]
  return jnp.mean(jnp.sum(fraction * mean_score, axis=-1))


def load_balancing_loss_per_group(
  router_probs: jax.Array,
  expert_indices: jax.Array,
  num_experts: int,
  token_mask: jax.Array | None = None,
) -> jax.Array:
  """The Switch LB loss of every routing group, averaged over groups ('group' pooling).

  For each group g: L_g = E · Σ_i f_gi · P_gi with f_gi the share of the group's S·k
  assignments that go to expert i and P_gi the mean probability of expert i over the
  group's S tokens; returns mean_g L_g. This is the pooling of Switch Transformer's
  Mesh TensorFlow code and of flaxformer (`_load_balancing_loss` averages
  f·P over groups and experts then multiplies by E²). flaxformer counts a token once per
  expert it chose, so its f sums to k: its loss is k times this one (the same at k=1).

  Args:
    router_probs: `[groups, group_size, experts]`.
    expert_indices: `[groups, group_size, k]`.
    num_experts: E.
    token_mask: None, or `[groups, group_size]` bool: each group's loss over its True
      tokens, and the mean over the groups that have any.

  Returns:
    A float32 scalar.
  """
  if router_probs.ndim != 3 or expert_indices.ndim != 3:
    raise ValueError(
      f"lb_pooling='group' needs [groups, group_size, ...] inputs, got {router_probs.shape} "
      f"and {expert_indices.shape}."
    )
  if token_mask is not None:
    per_group = jax.vmap(load_balancing_loss, in_axes=(0, 0, None, 0))(
      router_probs, expert_indices, num_experts, token_mask
    )
    return _masked_mean(per_group, jnp.any(token_mask, axis=1))
  per_group = jax.vmap(load_balancing_loss, in_axes=(0, 0, None))(
    router_probs, expert_indices, num_experts
  )
  return jnp.mean(per_group)


def pooled_load_balancing_loss(
  router_probs: jax.Array,
  expert_indices: jax.Array,
  num_experts: int,
  pooling: str,
  token_mask: jax.Array | None = None,
) -> jax.Array:
  """The Switch LB loss E · Σ_i f_i · P_i pooled as `model.lb_pooling` says.

  * 'call': f and P over every token of the call (`[groups, group_size]` flattened),
    `load_balancing_loss`. A layer call routes the whole step's batch, pooled over all
    devices: it is the global-batch balance of Qiu et al. 2025 ("Demons in the Detail",
    arXiv:2501.11873; Qwen3), not a per-device micro-batch balance.
  * 'group': one loss per routing group (leading axis of `[groups, group_size, ...]`), then
    their mean (`load_balancing_loss_per_group`; Switch/flaxformer). Groups that are
    sequences make it a sequence-level balance.

  Args:
    router_probs: `[groups, group_size, experts]`.
    expert_indices: the chosen experts, `[groups, group_size, k]`.
    num_experts: E.
    pooling: 'group' or 'call'.
    token_mask: None (every token), or `[groups, group_size]` bool, True for real tokens.
  """
  check_choice("lb_pooling", pooling, LB_POOLINGS)
  if pooling == "group":
    return load_balancing_loss_per_group(router_probs, expert_indices, num_experts, token_mask)
  return load_balancing_loss(router_probs, expert_indices, num_experts, token_mask)


def check_choice(name: str, value, allowed) -> None:
  """A one-line ValueError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(
      f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}."
    )
