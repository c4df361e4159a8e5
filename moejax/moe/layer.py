"""`MoeLayer`: route -> prepare -> run the experts -> combine, plus optional shared experts.

One layer covers the published routings as settings of `MoeConfig`:

| model | router | top_k | renormalize | other |
|---|---|---|---|---|
| Switch Transformer (Fedus et al. 2021) | top_k | 1 | False | router_jitter=0.01 |
| GShard / GLaM (Lepikhin et al. 2020; Du et al. 2021) | top_k | 2 | False | second_expert_policy='random' |
| ST-MoE (Zoph et al. 2022) | top_k | 2 | False | z-loss, expert_dropout |
| Mixtral (Jiang et al. 2024) | top_k | 2 | True | dispatch='dropless' |
| OLMoE (Muennighoff et al. 2024) | top_k | 8 of 64 | False | dispatch='dropless' |
| Shazeer et al. 2017 | noisy_top_k | k | True | |
| Expert choice (Zhou et al. 2022) | expert_choice | (C = cf·S·k/E) | | not causal |
| dense mixture | dense | E | | |
| DeepSeek-V2 (2024) | top_k | 6 of 160 | False | 2 shared experts, num_expert_groups=8, topk_groups=3, routed_scaling_factor=16 |
| DeepSeek-V3 (2024) | top_k | 8 of 256 | True | score_fn='sigmoid', bias_update_rate=0.001, num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5, 1 shared expert, seq_aux_loss_weight |
| Qwen2-MoE (Qwen1.5-MoE-A2.7B) | top_k | 4 of 60 | False | shared expert of its own width, shared_expert_gate |
| Qwen3-MoE (2025) | top_k | 8 of 128 | True | global-batch LB ('call', pooled over devices) |
| Llama 4 routing (2025) | top_k | 1 | False | score_fn='sigmoid', a shared expert |

The call path of one token, on one device or on a mesh (the same code):

    MoeLayer.__call__
      routing.router_logits, softmax              global view  [G, S, E]
      expert_parallel.per_device(top_k_choice)    each device's groups
      balancing.load_balancing_loss, router_z_loss  global view (the same on every mesh)
      expert_parallel.per_device(form.prepare)    dispatch.{EINSUM, SORT, DROPLESS}
      expert_parallel.run_experts                 experts (+ all-to-all on an expert axis)
      expert_parallel.per_device(form.combine)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.ffn import FeedForward
from moejax.moe import balancing, routing
from moejax.moe.config import MoeConfig
from moejax.moe.dispatch import FORMS, expert_capacity
from moejax.moe.expert_parallel import ExpertSpec, per_device, run_experts, shards_groups
from moejax.moe.experts import Experts
from moejax.parallel.sharding import (
  EXPERT,
  axis_size,
  batch_axes,
  logical,
  mesh_platform,
  num_batch_shards,
)

# The most elements an `einsum` dispatch or combine mask `[group, E, capacity]` may have per
# routing group (64 MiB in float32): the masks grow as group_size², so a group that spans
# a pod's global batch would need terabytes.
EINSUM_MASK_LIMIT = 2**24


class SelectionBias(nnx.Variable):
  """Aux-loss-free balancing's per-expert bias `[experts]` (Wang et al. 2024; DeepSeek-V3):
  added to the router scores to select experts, never to gate them; not trained by the
  optimizer but moved after every step (`MoeLayer.update_selection_bias`)."""


class MoeLayer(nnx.Module):
  """Sparse Mixture-of-Experts FFN: `y, aux = layer(x, token_mask=None)`, x and y
  `[batch, seq, d_model]`.

  `aux` holds the float32 scalars `lb_loss` (pooled as `lb_pooling` says), `seq_aux_loss`
  (DeepSeek-V3's sequence-wise balance loss, before its weight), `z_loss`,
  `dropped_fraction` (share of the T·k token→expert assignments not processed: past
  capacity, or past a dropless receive buffer), `expert_load` `[experts]` (share of
  assignments per expert before capacity; sums to 1), and `routing`: `probs` `[T, E]`
  router probabilities, and for token choice `expert_indices` `[T, k]` and `kept`
  `[T, k]`, for expert choice `token_indices` `[groups, E, C]` (T = batch·seq, tokens in
  order).

  `token_mask` `[batch, seq]` bool (True = a real token; None: all real) leaves padding
  out (packed rows, `moejax.layers.document_mask`): its assignments are invalid (`TokenChoice.valid`),
  so no dispatch form gives them capacity or counts them dropped; expert choice takes
  real tokens only; every statistic above is over the real tokens (T·k real assignments
  for `dropped_fraction`); and a padding token's output is zero (shared experts too). The
  capacity still comes from the group size, padding included.

  `layer.eval()` switches to `eval_capacity_factor` and turns off router noise, jitter,
  the random second expert and expert dropout; `layer.train()` switches back.

  Args:
    config: the `MoeConfig`.
    d_model: model width.
    dtype: compute dtype of the experts; parameters and router math stay float32.
    mesh: None (one device's program), or the mesh the layer runs on: its batch axes
      shard the groups, and an `expert` axis of size n > 1 shards the experts n ways.
    rngs: `nnx.Rngs` with `params` (and `router`/`dropout` streams, or `default`).

  Attributes:
    dispatch: the dispatch form, resolved from the devices' platform ('auto' -> 'einsum'
      on TPU, 'sort' elsewhere).
    expert_impl: the expert implementation, resolved likewise.
  """

  def __init__(
    self, config: MoeConfig, *, d_model: int, dtype=jnp.float32, mesh=None, rngs: nnx.Rngs
  ):
    if not isinstance(d_model, int) or d_model < 1:
      raise ValueError(f"d_model={d_model!r} must be a positive integer.")
    E = config.num_experts
    self.config, self.d_model, self.dtype, self.mesh = config, d_model, dtype, mesh
    platform = mesh_platform(mesh)
    self.dispatch = config.resolved_dispatch(platform)
    self.expert_impl = config.resolved_expert_impl(platform)
    self.expert_spec = ExpertSpec(
      config.activation,
      self.expert_impl,
      platform,
      config.dropless_buffer_factor,
      config.dropless_overflow,
      config.top_k,
    )
    self.deterministic = False
    self.noise_kernel: nnx.Param | None
    if config.router == "noisy_top_k":
      # Shazeer et al. 2017 initialise both W_g and W_noise to zero.
      zeros = jnp.zeros((d_model, E), jnp.float32)
      self.router_kernel = nnx.Param(zeros, **logical("embed", None))
      self.noise_kernel = nnx.Param(zeros, **logical("embed", None))
    else:
      # A small router init keeps early routing near uniform (Switch: weights scaled by 0.1).
      init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
      kernel = init(rngs.params(), (d_model, E), jnp.float32)
      self.router_kernel = nnx.Param(kernel, **logical("embed", None))
      self.noise_kernel = None
    self.router_bias = (
      nnx.Param(jnp.zeros((E,), jnp.float32), **logical(None)) if config.router_bias else None
    )
    self.selection_bias = (
      SelectionBias(jnp.zeros((E,), jnp.float32)) if config.bias_update_rate else None
    )
    self.router_rng = rngs["router"].fork()
    self.experts = Experts(
      E,
      d_model,
      config.d_ff,
      config.activation,
      dropout_rate=config.expert_dropout,
      dtype=dtype,
      rngs=rngs,
    )
    self.shared = (
      FeedForward(d_model, config.shared_d_ff, config.activation, dtype=dtype, rngs=rngs)
      if config.num_shared_experts
      else None
    )
    gate_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.shared_gate = (  # Qwen2-MoE: the shared branch scaled by sigmoid(x · w)
      nnx.Param(gate_init(rngs.params(), (d_model, 1), jnp.float32), **logical("embed", None))
      if config.shared_expert_gate
      else None
    )

  @property
  def num_experts(self) -> int:
    return self.config.num_experts

  @property
  def top_k(self) -> int:
    return self.config.top_k

  def update_selection_bias(self, expert_load: jax.Array) -> None:
    """Aux-loss-free balancing after a step: the bias moves by `bias_update_rate` toward the
    underloaded experts (`balancing.update_selection_bias`), from `expert_load` `[experts]`,
    this layer's share of the step's assignments over the global batch; `[..., experts]`
    for a stack of layers."""
    if self.selection_bias is None:
      raise ValueError("update_selection_bias: model.bias_update_rate=0 keeps no selection bias.")
    update = balancing.update_selection_bias
    for _ in range(expert_load.ndim - 1):
      update = jax.vmap(update, in_axes=(0, 0, None))
    self.selection_bias[...] = update(
      self.selection_bias[...], expert_load, self.config.bias_update_rate
    )

  def draws_randomness(self) -> bool:
    """Whether a call draws from the RNG streams (training mode with router jitter, router
    noise, GShard's random second expert, or expert dropout)."""
    c = self.config
    router = c.router_jitter or c.router == "noisy_top_k" or c.second_expert_policy == "random"
    return not self.deterministic and bool(router or c.expert_dropout)

  def capacity(self, group_tokens: int) -> int:
    """Capacity per expert of a routing group of `group_tokens` tokens, in the current mode."""
    c = self.config
    factor = c.eval_capacity_factor if self.deterministic else c.capacity_factor
    return expert_capacity(group_tokens, c.num_experts, c.top_k, factor, c.min_capacity)

  def __call__(self, x: jax.Array, token_mask: jax.Array | None = None):
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(
        f"MoeLayer input must be [batch, seq, d_model={self.d_model}], got shape {x.shape}."
      )
    c, E = self.config, self.config.num_experts
    batch, seq, d = x.shape
    if token_mask is not None and token_mask.shape != (batch, seq):
      raise ValueError(f"token_mask must be [batch, seq]={x.shape[:2]}, got {token_mask.shape}.")
    group = seq if c.group_size is None or self.dispatch == "dropless" else c.group_size
    num_tokens = batch * seq
    if num_tokens % group:
      raise ValueError(f"group_size={c.group_size} must divide batch·seq={num_tokens}.")
    num_groups = num_tokens // group
    self._check_mesh(num_tokens, num_groups)
    grouped = x.reshape(num_groups, group, d)
    # [G, S] True for real tokens, or None: every token real (the unmasked code path).
    mask = None if token_mask is None else token_mask.astype(bool).reshape(num_groups, group)

    training = not self.deterministic
    needs_key = training and (c.router_jitter or c.router == "noisy_top_k")
    logits = routing.router_logits(
      grouped,
      self.router_kernel[...],
      noise_kernel=None if self.noise_kernel is None else self.noise_kernel[...],
      jitter=c.router_jitter,
      key=self.router_rng() if needs_key else None,
      bias=None if self.router_bias is None else self.router_bias[...],
    )  # [G, S, E]
    scores = routing.router_scores(logits, c.score_fn)
    # Sigmoid scores do not sum to 1: the balance statistics use them normalised per token.
    probs = scores if c.score_fn == "softmax" else scores / jnp.sum(scores, -1, keepdims=True)
    aux: dict[str, Any] = {
      "z_loss": balancing.router_z_loss(logits, mask),
      "seq_aux_loss": jnp.zeros((), jnp.float32),
    }
    capacity = self.capacity(group)
    if self.dispatch == "einsum" and group * E * capacity > EINSUM_MASK_LIMIT:
      raise ValueError(
        f"group_size={c.group_size}: einsum dispatch masks of {group} tokens x {E} experts x "
        f"capacity {capacity} exceed {EINSUM_MASK_LIMIT:,} elements per routing group; set a "
        "smaller model.group_size (e.g. one sequence) or dispatch='sort'."
      )

    if c.router == "expert_choice":
      choose = jax.vmap(lambda p, *m: routing.expert_choice(p, capacity, *m))
      choice = per_device(self.mesh, choose, probs, *(() if mask is None else (mask,)))
      aux["lb_loss"] = jnp.zeros((), jnp.float32)  # balanced by construction
      aux["expert_load"] = jnp.full((E,), 1.0 / E, jnp.float32)
    else:
      choose_tokens = functools.partial(
        routing.token_choice, k=c.top_k, num_expert_groups=c.num_expert_groups,
        topk_groups=c.topk_groups, normalize=c.renormalize,
        routed_scaling_factor=c.routed_scaling_factor,
      )  # fmt: skip
      if self.selection_bias is None:
        choice = per_device(self.mesh, jax.vmap(choose_tokens), scores)  # [G, S, k]
      else:
        biased = jax.vmap(lambda s, b: choose_tokens(s, selection_bias=b), in_axes=(0, None))
        choice = per_device(self.mesh, biased, scores, replicated=(self.selection_bias[...],))
      indices = choice.expert_indices.reshape(-1)
      if mask is None:
        aux["expert_load"] = jnp.zeros((E,), jnp.float32).at[indices].add(1.0 / indices.size)
      else:  # padding's assignments are invalid: no capacity, not dropped, not counted
        choice = choice.replace(valid=choice.valid & mask[..., None])
        counts = balancing.expert_counts(indices, E, choice.valid)
        aux["expert_load"] = counts / jnp.maximum(jnp.sum(counts), 1.0)
      aux["lb_loss"] = jnp.zeros((), jnp.float32)
      if c.router != "dense":  # every token uses every expert: nothing to balance
        aux["lb_loss"] = balancing.pooled_load_balancing_loss(
          probs, choice.expert_indices, E, c.lb_pooling, mask
        )
        aux["seq_aux_loss"] = balancing.sequence_aux_loss(
          scores.reshape(batch, seq, E),
          choice.expert_indices.reshape(batch, seq, -1),
          E,
          token_mask,
        )
      if c.second_expert_policy == "random" and training:
        flat = jax.tree.map(lambda a: a.reshape(num_tokens, -1), choice)
        flat = routing.random_second_expert(flat, self.router_rng())
        choice = jax.tree.map(lambda a, b: a.reshape(b.shape), flat, choice)

    form = FORMS[self.dispatch]
    prepare = functools.partial(form.prepare, num_experts=E, capacity=capacity, dtype=self.dtype)
    inputs, plan = per_device(self.mesh, prepare, grouped, choice)
    outputs, overflow = run_experts(
      self.mesh, inputs, self.experts.weights(), self.expert_spec, self.experts.dropout()
    )
    out = per_device(self.mesh, form.combine, outputs, plan).reshape(num_tokens, d)
    if self.shared is not None:
      tokens = x.reshape(num_tokens, d)
      shared = self.shared(tokens)
      if self.shared_gate is not None:
        gate = jax.nn.sigmoid(tokens.astype(jnp.float32) @ self.shared_gate[...])
        shared = shared * gate.astype(shared.dtype)
      out = out + shared
    real = None if mask is None else mask.reshape(num_tokens, 1)
    if real is not None:
      out = jnp.where(real, out, jnp.zeros((), out.dtype))

    kept = plan.kept.reshape(num_tokens, -1)
    if c.router == "expert_choice":  # the share of (real) tokens that no expert took
      taken = kept.astype(jnp.float32)
      aux["dropped_fraction"] = 1.0 - (
        jnp.mean(taken) if real is None else jnp.sum(taken * real) / jnp.maximum(jnp.sum(real), 1)
      )
      aux["routing"] = {
        "probs": probs.reshape(num_tokens, E),
        "token_indices": choice.token_indices,
      }
    else:
      valid = choice.valid.reshape(num_tokens, -1)
      dropped = jnp.sum(valid & ~kept) + overflow
      assignments = valid.size if real is None else jnp.maximum(jnp.sum(real) * valid.shape[1], 1)
      aux["dropped_fraction"] = dropped.astype(jnp.float32) / assignments
      aux["routing"] = {
        "probs": probs.reshape(num_tokens, E),
        "expert_indices": choice.expert_indices.reshape(num_tokens, -1),
        "kept": kept,
      }
    return out.astype(x.dtype).reshape(batch, seq, d), aux

  def _check_mesh(self, num_tokens: int, num_groups: int) -> None:
    """With an expert axis > 1 every device must hold whole routing groups."""
    if axis_size(self.mesh, EXPERT) <= 1:
      return
    shards = num_batch_shards(self.mesh)
    if num_tokens % shards:
      raise ValueError(
        f"expert parallelism: {num_tokens} tokens (batch·seq) do not split over the "
        f"batch-sharding mesh axes {batch_axes(self.mesh)} (product {shards})."
      )
    if not shards_groups(self.mesh, num_groups):
      raise ValueError(
        f"expert parallelism: each device's {num_tokens // shards} tokens must be a multiple "
        f"of group_size={self.config.group_size}."
      )
