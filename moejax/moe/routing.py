"""Routers and the router auxiliary losses.

A router maps router logits `[tokens, experts]` to a routing decision. Two kinds of
decision exist:

* token choice (`TokenChoice`): every token picks `k` experts (Switch k=1, GShard/GLaM
  k=2, Mixtral k=2 renormalised, OLMoE k=8 of 64; the dense mixture is k=E);
* expert choice (`ExpertChoice`, Zhou et al. 2022, "Mixture-of-Experts with Expert
  Choice Routing"): every expert picks its top-C tokens of a routing group.

All router math runs in float32, whatever the layer's compute dtype. Every function here
acts on one routing group (`[tokens, ...]`); the layer vmaps them over groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TokenChoice:
  """Token-choice routing of one group of tokens.

  Attributes:
    expert_indices: `[tokens, k]` int32, the chosen experts, best first.
    gates: `[tokens, k]` float32, the weight of each chosen expert in the combine.
    valid: `[tokens, k]` bool; False for an assignment the router decided not to send
      (GShard's random second expert). Invalid assignments take no capacity.
  """

  expert_indices: jax.Array
  gates: jax.Array
  valid: jax.Array


@struct.dataclass
class ExpertChoice:
  """Expert-choice routing of one group of tokens.

  Attributes:
    token_indices: `[experts, capacity]` int32, the tokens each expert takes, best first.
    gates: `[experts, capacity]` float32, the router probability of each (token, expert).
  """

  token_indices: jax.Array
  gates: jax.Array


def load_balancing_loss(
  router_probs: jax.Array, expert_indices: jax.Array, num_experts: int
) -> jax.Array:
  """Auxiliary load-balancing loss E · Σᵢ fᵢ · Pᵢ (Switch Transformer, Fedus et al. 2021, eq. 4).

  fᵢ is the share of the T·k token→expert assignments (before capacity) that go to expert
  i; Pᵢ is the mean router probability of expert i over the T tokens. It equals 1.0 for
  perfectly uniform routing, for any k, and grows as routing concentrates.

  Args:
    router_probs: `[..., experts]` softmax router probabilities; leading dims are tokens.
    expert_indices: `[..., k]` chosen experts for the same tokens.
    num_experts: E.

  Returns:
    A float32 scalar.
  """
  probs = router_probs.reshape(-1, router_probs.shape[-1]).astype(jnp.float32)
  indices = expert_indices.reshape(-1)
  assignment_share = jnp.zeros((num_experts,), jnp.float32).at[indices].add(1.0)
  assignment_share = assignment_share / indices.shape[0]
  mean_prob = jnp.mean(probs, axis=0)
  return num_experts * jnp.sum(assignment_share * mean_prob)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
  """Router z-loss: mean over tokens of logsumexp(logits)² (ST-MoE, Zoph et al. 2022, eq. 5).

  Args:
    router_logits: `[..., experts]`; leading dims are tokens.

  Returns:
    A float32 scalar.
  """
  logits = router_logits.astype(jnp.float32)
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def top_k_choice(router_probs: jax.Array, k: int, *, renormalize: bool) -> TokenChoice:
  """Each token takes its k most probable experts.

  Args:
    router_probs: `[tokens, experts]` float32.
    k: experts per token.
    renormalize: True rescales the k gates to sum to 1 (Mixtral, OLMoE keeps raw);
      False keeps the raw softmax probabilities (Switch, GShard).

  Returns:
    `TokenChoice` with `[tokens, k]` fields.
  """
  gates, indices = jax.lax.top_k(router_probs, k)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return TokenChoice(
    expert_indices=indices.astype(jnp.int32), gates=gates, valid=jnp.ones(indices.shape, bool)
  )


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
  return choice.replace(valid=valid)


def expert_choice(router_probs: jax.Array, capacity: int) -> ExpertChoice:
  """Each expert takes the `capacity` tokens of the group with the highest probability for it.

  Expert choice is not causal: whether a token is taken depends on the other tokens of
  its group, later tokens included, so a decoder trained with it sees the future through
  the routing. Use it for encoders, or with groups that never span a sequence's future.

  Args:
    router_probs: `[tokens, experts]` float32 softmax over experts (Zhou et al. 2022).
    capacity: tokens per expert, at most the number of tokens.

  Returns:
    `ExpertChoice` with `[experts, capacity]` fields.
  """
  gates, token_indices = jax.lax.top_k(router_probs.T, capacity)
  return ExpertChoice(token_indices=token_indices.astype(jnp.int32), gates=gates)


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
) -> jax.Array:
  """Router logits `[..., experts]` float32 of `tokens` `[..., d_model]`.

  With `jitter` > 0 and a `key`, the router input (only) is scaled by U(1-eps, 1+eps)
  (Switch Transformer, Fedus et al. 2021, §2.4); with a `noise_kernel` and a `key`, the
  logits get Shazeer et al.'s tunable noise (`noisy_logits`). Without a key both are off
  (eval mode).
  """
  router_in = tokens.astype(jnp.float32)
  if jitter and key is not None:
    jitter_key, key = jax.random.split(key)
    router_in = router_in * jax.random.uniform(
      jitter_key, router_in.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter
    )
  logits = router_in @ router_kernel
  if noise_kernel is not None and key is not None:
    logits = noisy_logits(logits, router_in @ noise_kernel, key)
  return logits
