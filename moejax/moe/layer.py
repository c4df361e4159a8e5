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

The call path of one token, on one device or on a mesh (the same code):

    MoeLayer.__call__
      routing.router_logits, softmax              global view  [G, S, E]
      expert_parallel.per_device(top_k_choice)    each device's groups
      routing.load_balancing_loss, router_z_loss  global view (the same on every mesh)
      expert_parallel.per_device(form.prepare)    dispatch.{EINSUM, SORT, DROPLESS}
      expert_parallel.run_experts                 experts (+ all-to-all on an expert axis)
      expert_parallel.per_device(form.combine)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.ffn import FeedForward
from moejax.moe import routing
from moejax.moe.config import MoeConfig
from moejax.moe.dispatch import FORMS, expert_capacity
from moejax.moe.experts import Experts
from moejax.moe.expert_parallel import ExpertSpec, per_device, run_experts, shards_groups
from moejax.sharding import EXPERT, axis_size, batch_axes, mesh_platform, num_batch_shards
from moejax.sharding import logical


class MoeLayer(nnx.Module):
  """Sparse Mixture-of-Experts FFN: `y, aux = layer(x)`, x and y `[batch, seq, d_model]`.

  `aux` holds the float32 scalars `lb_loss`, `z_loss`, `dropped_fraction` (share of the
  T·k token→expert assignments not processed: past capacity, or past a dropless receive
  buffer), `expert_load` `[experts]` (share of assignments per expert before capacity;
  sums to 1), and `routing`: `probs` `[T, E]` router probabilities, and for token choice
  `expert_indices` `[T, k]` and `kept` `[T, k]`, for expert choice `token_indices`
  `[groups, E, C]` (T = batch·seq, tokens in order).

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
      config.activation, self.expert_impl, platform, config.dropless_buffer_factor, config.top_k
    )
    self.deterministic = False
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
      FeedForward(
        d_model, config.num_shared_experts * config.d_ff, config.activation, dtype=dtype, rngs=rngs
      )
      if config.num_shared_experts
      else None
    )

  @property
  def num_experts(self) -> int:
    return self.config.num_experts

  @property
  def top_k(self) -> int:
    return self.config.top_k

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

  def __call__(self, x: jax.Array):
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(
        f"MoeLayer input must be [batch, seq, d_model={self.d_model}], got shape {x.shape}."
      )
    c, E = self.config, self.config.num_experts
    batch, seq, d = x.shape
    group = seq if c.group_size is None or self.dispatch == "dropless" else c.group_size
    num_tokens = batch * seq
    if num_tokens % group:
      raise ValueError(f"group_size={c.group_size} must divide batch·seq={num_tokens}.")
    num_groups = num_tokens // group
    self._check_mesh(num_tokens, num_groups)
    grouped = x.reshape(num_groups, group, d)

    training = not self.deterministic
    needs_key = training and (c.router_jitter or c.router == "noisy_top_k")
    logits = routing.router_logits(
      grouped,
      self.router_kernel[...],
      noise_kernel=None if self.noise_kernel is None else self.noise_kernel[...],
      jitter=c.router_jitter,
      key=self.router_rng() if needs_key else None,
    )  # [G, S, E]
    probs = jax.nn.softmax(logits, axis=-1)
    aux = {"z_loss": routing.router_z_loss(logits)}
    capacity = self.capacity(group)

    if c.router == "expert_choice":
      choice = per_device(
        self.mesh, jax.vmap(functools.partial(routing.expert_choice, capacity=capacity)), probs
      )
      aux["lb_loss"] = jnp.zeros((), jnp.float32)  # balanced by construction
      aux["expert_load"] = jnp.full((E,), 1.0 / E, jnp.float32)
    else:
      top_k = functools.partial(routing.top_k_choice, k=c.top_k, renormalize=c.renormalize)
      choice = per_device(self.mesh, jax.vmap(top_k), probs)  # [G, S, k]
      indices = choice.expert_indices.reshape(-1)
      aux["expert_load"] = jnp.zeros((E,), jnp.float32).at[indices].add(1.0 / indices.size)
      aux["lb_loss"] = (
        jnp.zeros((), jnp.float32)
        if c.router == "dense"  # every token uses every expert: nothing to balance
        else routing.load_balancing_loss(probs, choice.expert_indices, E)
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
      out = out + self.shared(x.reshape(num_tokens, d))

    kept = plan.kept.reshape(num_tokens, -1)
    if c.router == "expert_choice":  # the share of tokens that no expert took
      aux["dropped_fraction"] = 1.0 - jnp.mean(kept.astype(jnp.float32))
      aux["routing"] = {
        "probs": probs.reshape(num_tokens, E),
        "token_indices": choice.token_indices,
      }
    else:
      valid = choice.valid.reshape(num_tokens, -1)
      dropped = jnp.sum(valid & ~kept) + overflow
      aux["dropped_fraction"] = dropped.astype(jnp.float32) / valid.size
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
