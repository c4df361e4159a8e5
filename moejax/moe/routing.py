"""Routers: from router logits to the experts each token (or each expert) chooses.

A router maps router logits `[tokens, experts]` to a routing decision. Two kinds of
decision exist:

* token choice (`TokenChoice`): every token picks `k` experts (Switch k=1, GShard/GLaM
  k=2, Mixtral k=2 renormalised, OLMoE k=8 of 64; the dense mixture is k=E);
* expert choice (`ExpertChoice`, Zhou et al. 2022, "Mixture-of-Experts with Expert
  Choice Routing"): every expert picks its top-C tokens of a routing group.

All router math runs in float32, whatever the layer's compute dtype. Every function here
acts on one routing group (`[tokens, ...]`); the layer vmaps them over groups.

The 2024-2026 families are settings of the same pieces (config keys `model.*` in brackets):

| piece | function | Switch/Mixtral/OLMoE | DeepSeek-V3 | Qwen2/3-MoE | Llama 4 |
|---|---|---|---|---|---|
| logits x·W (+ b) | `router_logits` [`router_bias`] | no bias (Switch has one) | no bias | no bias | no bias |
| scores | `router_scores` [`score_fn`] | softmax | sigmoid | softmax | sigmoid |
| selection bias | `token_choice(selection_bias=)`, `update_selection_bias` [`bias_update_rate`] | - | yes | - | - |
| group limit | `group_limited_mask` [`num_expert_groups`, `topk_groups`] | - | 8 groups, 4 kept | - | - |
| gate normalisation | `token_choice(normalize=)` [`renormalize`] | Mixtral yes | yes | Qwen1.5/2 no, Qwen3 yes | no (k=1) |
| gate scale | `token_choice(routed_scaling_factor=)` [`routed_scaling_factor`] | 1 | 2.5 | 1 | 1 |
| balance loss | `pooled_load_balancing_loss` [`lb_pooling`], `sequence_aux_loss` [`seq_aux_loss_weight`] | per call / per group | per sequence, α=1e-4 | Qwen3: global batch | not published |
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from moejax.moe.balancing import check_choice


@struct.dataclass
class TokenChoice:
  """Token-choice routing of one group of tokens.

  Attributes:
    expert_indices: `[tokens, k]` int32, the chosen experts, best first.
    gates: `[tokens, k]` float32, the weight of each chosen expert in the combine.
    valid: `[tokens, k]` bool; False for an assignment the router decided not to send
      (GShard's random second expert) and for every assignment of a padding token
      (`MoeLayer`'s `token_mask`). Invalid assignments take no capacity.
  """

  expert_indices: jax.Array
  gates: jax.Array
  valid: jax.Array


@struct.dataclass
class ExpertChoice:
  """Expert-choice routing of one group of tokens.

  Attributes:
    token_indices: `[experts, capacity]` int32, the tokens each expert takes, best first;
      `tokens` marks an empty slot (only with padding, `expert_choice(token_mask=)`).
    gates: `[experts, capacity]` float32, the router probability of each (token, expert).
  """

  token_indices: jax.Array
  gates: jax.Array


def top_k_choice(router_probs: jax.Array, k: int, *, renormalize: bool) -> TokenChoice:
  """Each token takes its k most probable experts.

  Args:
    router_probs: `[tokens, experts]` float32.
    k: experts per token.
    renormalize: True rescales the k gates to sum to 1 (Mixtral, OLMoE keeps raw);
      False keeps the raw softmax probabilities (Switch, GShard).

  Returns:
    `TokenChoice` with `[tokens, k]` fields. The same as `token_choice(router_probs, k,
    normalize=renormalize)`.
  """
  return token_choice(router_probs, k, normalize=renormalize)


def random_second_expert(choice: TokenChoice, key: jax.Array) -> TokenChoice:
  """GShard's stochastic second expert (Lepikhin et al. 2020, Algorithm 1; GLaM).

  With g1, g2 the top-2 gates normalised to sum to one, the second assignment is kept
  with probability min(1, 2·g2): a token that is nearly sure of its first expert rarely
  spends capacity on its second.

  Args:
    choice: a k=2 `TokenChoice` with `[tokens, 2]` fields.
    key: PRNG key.
  """
  g1, g2 = choice.gates[:, 0], choice.gates[:, 1]
  second_share = g2 / jnp.maximum(g1 + g2, jnp.finfo(jnp.float32).tiny)
  keep_second = jax.random.uniform(key, g2.shape) < 2.0 * second_share
  valid = choice.valid.at[:, 1].set(choice.valid[:, 1] & keep_second)
  return dataclasses.replace(choice, valid=valid)


def expert_choice(
  router_probs: jax.Array, capacity: int, token_mask: jax.Array | None = None
) -> ExpertChoice:
  """Each expert takes the `capacity` tokens of the group with the highest probability for it.

  Expert choice is not causal: whether a token is taken depends on the other tokens of
  its group, later tokens included, so a decoder trained with it sees the future through
  the routing. Use it for encoders, or with groups that never span a sequence's future.

  Args:
    router_probs: `[tokens, experts]` float32 softmax over experts (Zhou et al. 2022).
    capacity: tokens per expert, at most the number of tokens.
    token_mask: None (every token real), or `[tokens]` bool, False for padding: an expert
      takes real tokens only; a slot left over for want of real tokens holds the index
      `tokens` (no token: the dispatch forms leave it empty) with gate 0.

  Returns:
    `ExpertChoice` with `[experts, capacity]` fields.
  """
  if token_mask is None:
    gates, token_indices = jax.lax.top_k(router_probs.T, capacity)
    return ExpertChoice(token_indices=token_indices.astype(jnp.int32), gates=gates)
  ranked = jnp.where(token_mask[None, :], router_probs.T, -1.0)  # padding after every real
  gates, token_indices = jax.lax.top_k(ranked, capacity)
  real = token_mask[token_indices]
  num_tokens = router_probs.shape[0]
  return ExpertChoice(
    token_indices=jnp.where(real, token_indices, num_tokens).astype(jnp.int32),
    gates=jnp.where(real, gates, 0.0),
  )


def noisy_logits(clean_logits: jax.Array, noise_logits: jax.Array, key: jax.Array) -> jax.Array:
  """Noisy top-k gating (Shazeer et al. 2017, eq. 4): logits + N(0, 1) · softplus(x · W_noise).

  Args:
    clean_logits: `[tokens, experts]` x · W_g.
    noise_logits: `[tokens, experts]` x · W_noise.
    key: PRNG key.
  """
  noise = jax.random.normal(key, clean_logits.shape, jnp.float32)
  return clean_logits + noise * jax.nn.softplus(noise_logits)


def router_logits(
  tokens: jax.Array,
  router_kernel: jax.Array,
  *,
  noise_kernel: jax.Array | None = None,
  jitter: float = 0.0,
  key: jax.Array | None = None,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Router logits `[..., experts]` float32 of `tokens` `[..., d_model]`: x · W (+ b).

  With `jitter` > 0 and a `key`, the router input (only) is scaled by U(1-eps, 1+eps)
  (Switch Transformer, Fedus et al. 2021, §2.4); with a `noise_kernel` and a `key`, the
  logits get Shazeer et al.'s tunable noise (`noisy_logits`). Without a key both are off
  (eval mode).

  `bias` `[experts]` (`model.router_bias`) is a trained logit bias, added before the
  noise: logits = x · W + b, the `router_bias` of Switch Transformer's reference code
  (Mesh TensorFlow / flaxformer `RouterWeights(use_bias=True)`). It moves the scores, so it
  changes both the selection and the gates; DeepSeek-V3's untrained balancing bias, which
  changes the selection only, is `token_choice(selection_bias=...)` instead.
  """
  router_in = tokens.astype(jnp.float32)
  if jitter and key is not None:
    jitter_key, key = jax.random.split(key)
    router_in = router_in * jax.random.uniform(
      jitter_key, router_in.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter
    )
  logits = router_in @ router_kernel
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if noise_kernel is not None and key is not None:
    logits = noisy_logits(logits, router_in @ noise_kernel, key)
  return logits


# ----------------------------------------------------------------------------- the families

SCORE_FNS = ("softmax", "sigmoid")


def router_scores(logits: jax.Array, score_fn: str = "softmax") -> jax.Array:
  """Router scores `[..., experts]` float32 from logits `[..., experts]` (`model.score_fn`).

  * 'softmax': p_i = exp(l_i) / Σ_j exp(l_j) (Shazeer et al. 2017; Switch, Mixtral,
    DeepSeek-V2, Qwen2/3-MoE): the scores of a token sum to 1.
  * 'sigmoid': s_i = σ(l_i) = 1 / (1 + exp(-l_i)) (DeepSeek-V3, arXiv:2412.19437, §2.1.2
    eq. 15, "s_{i,t} = Sigmoid(u_t^T e_i)"; Llama 4): each expert's affinity on its own,
    in (0, 1); they do not compete and need not sum to 1.
  """
  check_choice("score_fn", score_fn, SCORE_FNS)
  logits = logits.astype(jnp.float32)
  if score_fn == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  return jax.nn.sigmoid(logits)


def group_limited_mask(
  selection_scores: jax.Array, num_expert_groups: int, topk_groups: int, *, group_score_top: int = 2
) -> jax.Array:
  """Which experts a token may choose under group-limited routing: `[..., experts]` bool.

  The E experts form `num_expert_groups` equal groups of consecutive experts (group g
  holds experts g·E/G ... (g+1)·E/G - 1; a group is meant to live on one device or
  node). A group's score is the sum of its `group_score_top` best selection scores; each
  token keeps its `topk_groups` best groups and may choose only among their experts.

  * DeepSeek-V3 "node-limited routing" (arXiv:2412.19437, §2.1.2): groups are nodes,
    ranked by "the sum of the highest K_r/M affinity scores of the experts distributed
    on each node"; K_r = 8 experts, M = 4 nodes, so the top-2 sum (`group_score_top=2`,
    the default; DeepSeek's released routers hard-code top-2 with n_group=8,
    topk_group=4). The scores ranked are the *biased* selection scores s + b.
  * DeepSeek-V2 "device-limited routing" (arXiv:2405.04434, §2.2.2): the M devices "that
    have experts with the highest affinity scores", that is the group max
    (`group_score_top=1`).

  Args:
    selection_scores: `[..., experts]` float32, the scores that rank experts (s + b).
    num_expert_groups: G (`model.num_expert_groups`), dividing E.
    topk_groups: groups kept per token (`model.topk_groups`), 1 <= topk_groups <= G.
    group_score_top: how many of a group's best scores its score sums (<= E/G).

  Returns:
    `[..., experts]` bool, True for the experts of each token's kept groups.
  """
  num_experts = selection_scores.shape[-1]
  _check_groups(num_experts, num_expert_groups, topk_groups, group_score_top)
  per_group = num_experts // num_expert_groups
  grouped = selection_scores.reshape(*selection_scores.shape[:-1], num_expert_groups, per_group)
  group_scores = jnp.sum(jax.lax.top_k(grouped, group_score_top)[0], axis=-1)  # [..., G]
  _, kept_groups = jax.lax.top_k(group_scores, topk_groups)  # [..., topk_groups]
  kept = jnp.sum(jax.nn.one_hot(kept_groups, num_expert_groups, dtype=jnp.int32), axis=-2) > 0
  return jnp.repeat(kept, per_group, axis=-1)


def token_choice(
  scores: jax.Array,
  k: int,
  *,
  selection_bias: jax.Array | None = None,
  num_expert_groups: int = 1,
  topk_groups: int | None = None,
  group_score_top: int = 2,
  normalize: bool = False,
  routed_scaling_factor: float = 1.0,
) -> TokenChoice:
  """Token-choice routing with the DeepSeek/Qwen/Llama-4 options: each token takes k experts.

  1. Selection scores u = s + b, with b = `selection_bias` `[experts]` (zero if None).
  2. With `num_expert_groups` G > 1, only the experts of each token's `topk_groups` best
     groups may be chosen (`group_limited_mask`; the others' u become -inf).
  3. The k experts of highest u, best first.
  4. Gates from the *unbiased* scores: g'_i = s_i for a chosen expert i (DeepSeek-V3,
     arXiv:2412.19437, eq. 16: the bias "is only used for routing"; the gating value is
     still s_{i,t}).
  5. With `normalize`, g_i = g'_i / Σ_{j chosen} g'_j (eq. 13; Mixtral's renormalisation of
     the top-k softmax probabilities is the same formula on softmax scores).
  6. g_i · `routed_scaling_factor` (DeepSeek-V2/V3 `routed_scaling_factor` in their
     config.json, 2.5 for V3, 16.0 for V2; `model.routed_scaling_factor`).

  The selection (steps 1-3) is discrete: gradients reach `scores` through the gates only,
  never through `selection_bias`. Llama 4 is k=1 on sigmoid scores without
  normalisation: gate = σ(top logit).

  Args:
    scores: `[..., experts]` float32 router scores (`router_scores`).
    k: experts per token.
    selection_bias: None or `[experts]`, the aux-loss-free balancing bias (Wang et al.
      2024; updated by `update_selection_bias`).
    num_expert_groups: G (`model.num_expert_groups`); 1 means no group limit.
    topk_groups: groups kept per token (`model.topk_groups`); None means all G.
    group_score_top: see `group_limited_mask` (2: DeepSeek-V3; 1: DeepSeek-V2).
    normalize: rescale the k gates to sum to 1 (`model.renormalize`) before scaling.
    routed_scaling_factor: multiplies every gate (`model.routed_scaling_factor`).

  Returns:
    `TokenChoice` with `[..., k]` fields; every assignment valid.
  """
  scores = scores.astype(jnp.float32)
  num_experts = scores.shape[-1]
  if not isinstance(k, int) or not 1 <= k <= num_experts:
    raise ValueError(f"top_k={k!r} must be an int between 1 and num_experts={num_experts}.")
  if not routed_scaling_factor > 0:
    raise ValueError(f"routed_scaling_factor={routed_scaling_factor!r} must be > 0.")
  select = scores
  if selection_bias is not None:
    if selection_bias.shape != (num_experts,):
      raise ValueError(
        f"selection_bias must have shape ({num_experts},), got {selection_bias.shape}."
      )
    select = select + jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
  select = jax.lax.stop_gradient(select)
  if num_expert_groups > 1 or topk_groups is not None:
    topk_groups = num_expert_groups if topk_groups is None else topk_groups
    _check_groups(num_experts, num_expert_groups, topk_groups, group_score_top)
    allowed_experts = topk_groups * (num_experts // num_expert_groups)
    if k > allowed_experts:
      raise ValueError(
        f"top_k={k} exceeds the {allowed_experts} experts of topk_groups={topk_groups} "
        f"groups of {num_experts // num_expert_groups}."
      )
    mask = group_limited_mask(
      select, num_expert_groups, topk_groups, group_score_top=group_score_top
    )
    select = jnp.where(mask, select, -jnp.inf)
  _, indices = jax.lax.top_k(select, k)
  gates = jnp.take_along_axis(scores, indices, axis=-1)
  if normalize:
    total = jnp.sum(gates, axis=-1, keepdims=True)
    gates = gates / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
  if routed_scaling_factor != 1.0:
    gates = gates * routed_scaling_factor
  return TokenChoice(
    expert_indices=indices.astype(jnp.int32), gates=gates, valid=jnp.ones(indices.shape, bool)
  )


def _check_groups(
  num_experts: int, num_expert_groups: int, topk_groups: int, group_score_top: int
) -> None:
  if not isinstance(num_expert_groups, int) or num_expert_groups < 1:
    raise ValueError(f"num_expert_groups={num_expert_groups!r} must be a positive int.")
  if num_experts % num_expert_groups:
    raise ValueError(
      f"num_expert_groups={num_expert_groups} must divide num_experts={num_experts}."
    )
  if not isinstance(topk_groups, int) or not 1 <= topk_groups <= num_expert_groups:
    raise ValueError(
      f"topk_groups={topk_groups!r} must be an int between 1 and num_expert_groups="
      f"{num_expert_groups}."
    )
  per_group = num_experts // num_expert_groups
  if not isinstance(group_score_top, int) or not 1 <= group_score_top <= per_group:
    raise ValueError(
      f"group_score_top={group_score_top!r} must be an int between 1 and the {per_group} "
      "experts of a group."
    )
