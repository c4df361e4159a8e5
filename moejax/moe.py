"""`MoeLayer`: router ─► dispatch ─► experts ─► combine, plus optional shared experts.

One layer covers the published routings as settings:

| model | router | top_k | renormalize | other |
|---|---|---|---|---|
| Switch Transformer (Fedus et al. 2021) | top_k | 1 | False | router_jitter=0.01 |
| GShard / GLaM (Lepikhin et al. 2020; Du et al. 2021) | top_k | 2 | False | second_expert_policy='random' |
| ST-MoE (Zoph et al. 2022) | top_k | 2 | False | z-loss, expert_dropout |
| Mixtral (Jiang et al. 2024) | top_k | 2 | True | dispatch='dropless' |
| OLMoE (Muennighoff et al. 2024) | top_k | 8 of 64 | False | dispatch='dropless' |
| Shazeer et al. 2017 | noisy_top_k | k | True | |
| Expert choice (Zhou et al. 2022) | expert_choice | (C = cf·T·k/E) | | not causal |
| dense mixture | dense | E | | |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch as dispatch_lib
from moejax import parallel
from moejax import routing
from moejax.activations import check_activation
from moejax.experts import Experts, FeedForward


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(
      f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}."
    )


class MoeLayer(nnx.Module):
  """Sparse Mixture-of-Experts FFN: `y, aux = layer(x)`, x and y `[batch, seq, d_model]`.

  `aux` holds scalars `lb_loss`, `z_loss`, `dropped_fraction` (share of the T·k
  token→expert assignments not processed because of capacity), and `expert_load`
  `[experts]` (share of assignments per expert before capacity; sums to 1).

  `layer.eval()` switches to `eval_capacity_factor` and turns off router noise, jitter,
  the random second expert and expert dropout; `layer.train()` switches back. Both act
  through the `deterministic` attribute, as Flax's own modules do.

  Args:
    d_model: model width.
    d_ff: hidden size of each expert.
    num_experts: E.
    top_k: experts per token (token choice); for expert choice, the average number of
      experts per token that sets the capacity; for `router='dense'` it must equal E.
    router: 'top_k', 'noisy_top_k', 'expert_choice' or 'dense' (see the module table).
    dispatch: 'auto', 'einsum', 'sort' or 'dropless' (see `moejax.dispatch`). 'auto'
      computes the capacity function of 'einsum'/'sort' with the form that is faster on
      the default backend (`moejax.dispatch.resolve_dispatch`); `layer.dispatch` holds the
      form chosen.
    capacity_factor: capacity = max(min_capacity, ceil(cf · T · k / E)) per routing group
      in training; not used by 'dropless'.
    eval_capacity_factor: the same in eval mode.
    min_capacity: floor of the capacity.
    activation: 'relu', 'gelu', 'swiglu' or 'geglu'.
    renormalize: rescale the chosen top-k gates to sum to 1 (Mixtral) or keep the raw
      softmax probabilities (Switch, GShard).
    second_expert_policy: 'all', or 'random' (GShard: the second expert is used with
      probability min(1, 2·g2/(g1+g2)); needs top_k=2).
    router_jitter: Switch's multiplicative jitter eps: the router input (only) is scaled
      by U(1-eps, 1+eps) in training.
    expert_dropout: dropout rate on the expert hidden layer (ST-MoE).
    num_shared_experts: experts every token goes through, as one dense FFN of hidden
      num_shared_experts · d_ff added to the routed output (DeepSeekMoE, Dai et al. 2024).
    group_size: tokens per routing group (capacity and expert choice act per group);
      None makes all tokens of a call one group. Must divide batch·seq.
    dtype: compute dtype of the experts; parameters and router math stay float32.
    rngs: `nnx.Rngs` with `params` (and `router`/`dropout` streams, or `default`).

  Expert parallelism: when the layer's mesh (attribute `expert_mesh`: 'auto' = the
  ambient `jax.set_mesh` mesh, a Mesh, or None; see `moejax.parallel`) has an `expert`
  axis of size n > 1, the experts are sharded n ways and tokens reach them by all-to-all
  (`moejax.parallel`). Routing, losses and metrics are unchanged; the capacity paths then
  need `group_size` set, dividing each device's token count, so that the routing groups
  (and so the function computed) do not depend on the mesh.
  """

  def __init__(
    self,
    *,
    d_model: int,
    d_ff: int,
    num_experts: int,
    top_k: int = 2,
    router: str = "top_k",
    dispatch: str = "auto",
    capacity_factor: float = 1.25,
    eval_capacity_factor: float = 2.0,
    min_capacity: int = 4,
    activation: str = "swiglu",
    renormalize: bool = False,
    second_expert_policy: str = "all",
    router_jitter: float = 0.0,
    expert_dropout: float = 0.0,
    num_shared_experts: int = 0,
    group_size: int | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    _check_choice("router", router, routing.ROUTERS)
    _check_choice("dispatch", dispatch, dispatch_lib.DISPATCHES)
    _check_choice("second_expert_policy", second_expert_policy, routing.SECOND_EXPERT_POLICIES)
    check_activation(activation)
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}.")
    if router == "dense" and top_k != num_experts:
      raise ValueError(
        f"router='dense' sends every token to every expert: set top_k=num_experts "
        f"({num_experts}), got top_k={top_k}."
      )
    if router == "expert_choice" and dispatch == "dropless":
      raise ValueError(
        "dispatch='dropless' needs token-choice routing; router='expert_choice' "
        "fixes the tokens per expert: use dispatch 'einsum' or 'sort'."
      )
    if second_expert_policy == "random" and top_k != 2:
      raise ValueError(f"second_expert_policy='random' needs top_k=2, got top_k={top_k}.")
    for name, value in (
      ("capacity_factor", capacity_factor),
      ("eval_capacity_factor", eval_capacity_factor),
    ):
      if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0.")
    if min_capacity < 1:
      raise ValueError(f"min_capacity={min_capacity} must be >= 1.")
    if not 0.0 <= router_jitter < 1.0:
      raise ValueError(f"router_jitter={router_jitter} must be in [0, 1).")
    if not 0.0 <= expert_dropout < 1.0:
      raise ValueError(f"expert_dropout={expert_dropout} must be in [0, 1).")
    if num_shared_experts < 0:
      raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0.")
    if group_size is not None and (group_size < 1 or dispatch == "dropless"):
      raise ValueError(
        f"group_size={group_size!r}: routing groups set capacity; use a positive "
        "size with dispatch 'einsum' or 'sort', or None."
      )

    self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
    self.router = router
    self.dispatch = dispatch_lib.resolve_dispatch(dispatch, jax.default_backend())
    self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
    self.min_capacity, self.renormalize = min_capacity, renormalize
    self.second_expert_policy, self.router_jitter = second_expert_policy, router_jitter
    self.group_size, self.dtype = group_size, dtype
    self.deterministic = False
    # 'auto': expert-parallel when the ambient mesh (`jax.set_mesh`) has an expert axis > 1;
    # a Mesh: that mesh; None: never. See `moejax.parallel.use_expert_parallel`.
    self.expert_mesh = parallel.AUTO

    if router == "noisy_top_k":
      # Shazeer et al. 2017 initialise both W_g and W_noise to zero.
      zeros = jnp.zeros((d_model, num_experts), jnp.float32)
      self.router_kernel = nnx.Param(zeros, **parallel.logical("embed", None))
      self.noise_kernel = nnx.Param(zeros, **parallel.logical("embed", None))
    else:
      # A small router init keeps early routing near uniform (Switch: weights scaled by 0.1).
      init = nnx.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
      self.router_kernel = nnx.Param(
        init(rngs.params(), (d_model, num_experts), jnp.float32), **parallel.logical("embed", None)
      )
      self.noise_kernel = None
    self.router_rng = rngs["router"].fork()
    self.experts = Experts(
      num_experts, d_model, d_ff, activation, dropout_rate=expert_dropout, dtype=dtype, rngs=rngs
    )
    self.shared = (
      FeedForward(d_model, num_shared_experts * d_ff, activation, dtype=dtype, rngs=rngs)
      if num_shared_experts
      else None
    )

  # --------------------------------------------------------------------------- routing

  def _router_logits(self, tokens: jax.Array) -> jax.Array:
    """`[tokens, d_model]` -> float32 logits `[tokens, experts]`."""
    router_in = tokens.astype(jnp.float32)
    if self.router_jitter and not self.deterministic:
      router_in = router_in * jax.random.uniform(
        self.router_rng(),
        router_in.shape,
        jnp.float32,
        1.0 - self.router_jitter,
        1.0 + self.router_jitter,
      )
    logits = router_in @ self.router_kernel[...]
    if self.noise_kernel is not None and not self.deterministic:
      logits = routing.noisy_logits(logits, router_in @ self.noise_kernel[...], self.router_rng())
    return logits

  def _capacity(self, group_tokens: int) -> int:
    factor = self.eval_capacity_factor if self.deterministic else self.capacity_factor
    return dispatch_lib.expert_capacity(
      group_tokens, self.num_experts, self.top_k, factor, self.min_capacity
    )

  # --------------------------------------------------------------------------- forward

  def __call__(self, x: jax.Array):
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(
        f"MoeLayer input must be [batch, seq, d_model={self.d_model}], got shape {x.shape}."
      )
    batch, seq, d = x.shape
    num_tokens = batch * seq
    group = self.group_size or num_tokens
    if num_tokens % group:
      raise ValueError(f"group_size={self.group_size} must divide batch·seq={num_tokens}.")
    tokens = x.reshape(num_tokens, d)

    logits = self._router_logits(tokens)  # [T, E]
    probs = jax.nn.softmax(logits, axis=-1)  # [T, E]
    aux = {"z_loss": routing.router_z_loss(logits)}

    if self.router == "expert_choice":
      out, ec_aux = self._expert_choice(tokens, probs)
    else:
      out, ec_aux = self._token_choice(tokens, probs)
    aux.update(ec_aux)
    if self.shared is not None:
      out = out + self.shared(tokens)
    return out.astype(x.dtype).reshape(batch, seq, d), aux

  def _token_choice(self, tokens, probs):
    E, k = self.num_experts, self.top_k
    choice = parallel.per_device(
      lambda p: routing.top_k_choice(p, k, renormalize=self.renormalize),
      parallel.layer_mesh(self.expert_mesh),
      probs,
    )
    aux = {
      "lb_loss": routing.load_balancing_loss(probs, choice.expert_indices, E),
      "expert_load": jnp.zeros((E,), jnp.float32)
      .at[choice.expert_indices.reshape(-1)]
      .add(1.0 / choice.expert_indices.size),
    }
    if self.second_expert_policy == "random" and not self.deterministic:
      choice = routing.random_second_expert(choice, self.router_rng())

    if self.dispatch == "dropless":
      mesh = self._device_mesh(tokens.shape[0])
      if mesh is None:
        out = dispatch_lib.dropless(tokens, choice, E, self.experts.grouped)
      else:
        out = parallel.dropless_expert_parallel(
          mesh, tokens, choice, self.experts, parallel.dropout_key(self.experts)
        )
      aux["dropped_fraction"] = jnp.zeros((), jnp.float32)
      return out, aux

    def dispatch(grouped_x, grouped_choice, capacity):
      if self.dispatch == "einsum":
        masks = jax.vmap(lambda c: dispatch_lib.token_choice_masks(c, E, capacity, self.dtype))
        dispatch_mask, combine_mask, kept = masks(grouped_choice)  # [G, S, E, C]
        return self._einsum_dispatch(grouped_x, dispatch_mask, combine_mask) + (kept,)
      slots = jax.vmap(lambda c: dispatch_lib.token_choice_slots(c, E, capacity))
      slot_token, kept, token_slot = slots(grouped_choice)  # [G, E·C], [G, S, k]
      token_gate = jnp.where(kept, grouped_choice.gates, 0.0)
      buffers = jax.vmap(lambda x, s, t: dispatch_lib.dispatch_to_slots(x, s, t, E))(
        grouped_x.astype(self.dtype), slot_token, token_slot
      )
      combine = lambda out: jax.vmap(dispatch_lib.combine_from_slots)(out, token_slot, token_gate)
      return buffers, combine, kept

    out, kept = self._capacity_moe(tokens, choice, dispatch)  # kept [T, k]
    dropped = jnp.sum(choice.valid & ~kept)
    aux["dropped_fraction"] = dropped.astype(jnp.float32) / choice.expert_indices.size
    return out, aux

  def _expert_choice(self, tokens, probs):
    E = self.num_experts

    def dispatch(grouped_x, grouped_probs, capacity):
      num_groups, group, _ = grouped_x.shape
      choice = jax.vmap(routing.expert_choice, in_axes=(0, None))(grouped_probs, capacity)
      if self.dispatch == "einsum":
        dispatch_mask, combine_mask = jax.vmap(
          lambda c: dispatch_lib.expert_choice_masks(c, group, self.dtype)
        )(choice)
        buffers, combine = self._einsum_dispatch(grouped_x, dispatch_mask, combine_mask)
      else:
        slot_token, slot_gate = jax.vmap(dispatch_lib.expert_choice_slots)(choice)
        buffers, combine = self._sort_dispatch(grouped_x, slot_token, slot_gate)
      taken = (
        jnp.zeros((num_groups, group + 1), bool)
        .at[jnp.arange(num_groups)[:, None], choice.token_indices.reshape(num_groups, -1)]
        .set(True)
      )
      return buffers, combine, taken[:, :group]

    out, taken = self._capacity_moe(tokens, probs, dispatch)
    aux = {
      # Expert choice balances load by construction and has no balancing loss.
      "lb_loss": jnp.zeros((), jnp.float32),
      "expert_load": jnp.full((E,), 1.0 / E, jnp.float32),
      # For expert choice: the share of tokens that no expert took.
      "dropped_fraction": 1.0 - jnp.mean(taken.astype(jnp.float32)),
    }
    return out, aux

  # --------------------------------------------------------------------------- expert compute

  def _device_mesh(self, num_tokens: int):
    """The mesh on which each device dispatches its own tokens, or None (one program).

    With an expert axis > 1 (expert parallelism) that is required: a clear error if this
    call cannot run so. With only data axes it is used when it computes the same function
    (dropless: always; capacity: when each device holds whole routing groups), and
    otherwise XLA partitions the single-device program.
    """
    mesh = parallel.layer_mesh(self.expert_mesh)
    if mesh is None:
      return None
    capacity = self.dispatch != "dropless"
    if parallel.axis_size(mesh, parallel.EXPERT) > 1:
      local = parallel.local_token_count(mesh, num_tokens)
      if capacity and self.group_size is None:
        raise ValueError(
          "expert parallelism needs group_size set (tokens per routing group), so "
          "that routing groups do not depend on the mesh; got group_size=None."
        )
      if capacity and local % self.group_size:
        raise ValueError(
          f"expert parallelism: each device's {local} tokens must be a multiple of "
          f"group_size={self.group_size}."
        )
      return mesh
    shards = parallel.num_batch_shards(mesh)
    if shards == 1 or num_tokens % shards:
      return None
    if capacity and (self.group_size is None or (num_tokens // shards) % self.group_size):
      return None
    return mesh

  def _capacity_moe(self, tokens, route, dispatch):
    """Routes groups, dispatches into `[groups, E, C, d]`, runs the experts, combines.

    `dispatch(grouped_x [G, S, d], grouped_route, capacity) -> (buffers [G, E, C, d],
    combine: [G, E, C, d] -> [G, S, d], stats [G, S, ...])`. Without a mesh the experts
    run here; on a mesh (`_device_mesh`) each device runs its own groups and reaches the
    experts by all-to-all over the expert axis (`parallel.capacity_expert_parallel`).

    Returns:
      `(out [tokens, d], stats [tokens, ...])`.
    """
    num_tokens, d = tokens.shape
    group = self.group_size or num_tokens
    capacity = self._capacity(group)

    def body(tokens, route, expert_fn):
      local = tokens.shape[0]
      num_groups = local // group
      grouped_x = tokens.reshape(num_groups, group, d)
      grouped_route = jax.tree.map(lambda a: a.reshape(num_groups, group, *a.shape[1:]), route)
      buffers, combine, stats = dispatch(grouped_x, grouped_route, capacity)
      out = combine(expert_fn(buffers.astype(self.dtype)))
      return out.reshape(local, -1), stats.reshape(local, *stats.shape[2:])

    mesh = self._device_mesh(num_tokens)
    if mesh is None:
      return body(tokens, route, self._local_experts)
    return parallel.capacity_expert_parallel(
      mesh, body, tokens, route, self.experts, parallel.dropout_key(self.experts)
    )

  def _local_experts(self, buffers):
    """`[G, E, C, d]` -> `[G, E, C, d]` through all experts on this device."""
    num_groups, num_experts, capacity, d = buffers.shape
    x = jnp.transpose(buffers, (1, 0, 2, 3)).reshape(num_experts, num_groups * capacity, d)
    out = self.experts(x).reshape(num_experts, num_groups, capacity, d)
    return jnp.transpose(out, (1, 0, 2, 3))

  def _einsum_dispatch(self, grouped_x, dispatch_mask, combine_mask):
    """`[G, S, d]` with masks `[G, S, E, C]` -> buffers `[G, E, C, d]` and their combine."""
    buffers = jnp.einsum("gsec,gsd->gecd", dispatch_mask, grouped_x.astype(self.dtype))
    return buffers, lambda out: jnp.einsum("gsec,gecd->gsd", combine_mask, out)

  def _sort_dispatch(self, grouped_x, slot_token, slot_gate):
    """Expert choice: `[G, S, d]` with slot tables `[G, E·C]` -> buffers `[G, E, C, d]` and
    their combine (a token may sit in any number of slots, so the combine scatter-adds)."""
    group = grouped_x.shape[1]
    E = self.num_experts
    buffers = jax.vmap(lambda x, s: dispatch_lib.gather_to_experts(x, s, E))(grouped_x, slot_token)
    combine = lambda out: jax.vmap(
      lambda o, s, g: dispatch_lib.scatter_from_experts(o, s, g, group)
    )(out, slot_token, slot_gate)
    return buffers, combine
