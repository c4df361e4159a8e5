"""Expert feed-forward networks: one dense FFN and the stacked experts of an MoE layer.

Weights carry no biases. Gated activations (SwiGLU, GeGLU; Shazeer 2020, "GLU Variants
Improve Transformer") use three matrices (gate, up, down); the others two (in, out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import block_ffn
from moejax.activations import check_activation, hidden_activation, is_gated
from moejax.dispatch import take_rows
from moejax.parallel import logical


def on_rows(fn, x: jax.Array) -> jax.Array:
  """`fn` (`[rows, d_in] -> [rows, d_out]`) applied to `x` `[..., d_in]` as one 2-D array;
  returns `[..., d_out]`.

  A matmul over `[batch, seq, d]` contracts two token axes in its weight gradient, which
  XLA's CPU backend runs about 2x slower than the same contraction over one flattened
  axis (a SwiGLU FFN, 4096 tokens, d_model 512, hidden 2048, forward+backward: 454-499 ms
  against 246-251 ms on 2 cores). Every projection of the model goes through here.
  """
  rows = fn(x.reshape(-1, x.shape[-1]))
  return rows.reshape(*x.shape[:-1], rows.shape[-1])


def _expert_init(scale: float = 1.0):
  """Fan-in truncated normal per expert: `[experts, fan_in, fan_out]` with experts a batch axis."""
  return nnx.initializers.variance_scaling(
    scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
  )


class FeedForward(nnx.Module):
  """Dense FFN `[..., d_model] -> [..., d_model]` (the dense baseline and shared experts)."""

  def __init__(
    self, d_model: int, d_ff: int, activation: str = "swiglu", *, dtype=jnp.float32, rngs: nnx.Rngs
  ):
    check_activation(activation)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.activation = activation
    self.dtype = dtype
    self.w_in = nnx.Param(
      init(rngs.params(), (d_model, d_ff), jnp.float32), **logical("embed", "mlp")
    )
    self.w_gate = (
      nnx.Param(init(rngs.params(), (d_model, d_ff), jnp.float32), **logical("embed", "mlp"))
      if is_gated(activation)
      else None
    )
    self.w_out = nnx.Param(
      init(rngs.params(), (d_ff, d_model), jnp.float32), **logical("mlp", "embed")
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return on_rows(self._rows, x.astype(self.dtype))

  def _rows(self, x: jax.Array) -> jax.Array:
    pre = x @ self.w_in[...].astype(self.dtype)
    gate_pre = None if self.w_gate is None else x @ self.w_gate[...].astype(self.dtype)
    return hidden_activation(self.activation, pre, gate_pre) @ self.w_out[...].astype(self.dtype)


class Experts(nnx.Module):
  """E expert FFNs with stacked weights `[experts, d_model, d_ff]` and `[experts, d_ff, d_model]`.

  Two layouts of the routed tokens are supported:
    * `__call__(x)` with `x` `[experts, capacity, d_model]`: one batched matmul per weight
      on GPU and TPU, a loop of 2-D matmuls over the experts on CPU (the capacity paths,
      `einsum` and `sort` dispatch);
    * `grouped(x, group_sizes)` with `x` `[rows, d_model]` sorted by expert: a grouped
      matmul with no capacity (the `dropless` path, Gale et al. 2022, MegaBlocks).
  """

  def __init__(
    self,
    num_experts: int,
    d_model: int,
    d_ff: int,
    activation: str = "swiglu",
    *,
    dropout_rate: float = 0.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_activation(activation)
    init = _expert_init()
    shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    self.activation = activation
    self.dtype = dtype
    self.num_experts = num_experts
    names_in, names_out = logical("expert", "embed", "mlp"), logical("expert", "mlp", "embed")
    self.w_in = nnx.Param(init(rngs.params(), shape_in, jnp.float32), **names_in)
    self.w_gate = (
      nnx.Param(init(rngs.params(), shape_in, jnp.float32), **names_in)
      if is_gated(activation)
      else None
    )
    self.w_out = nnx.Param(init(rngs.params(), shape_out, jnp.float32), **names_out)
    # Expert dropout acts on the expert hidden layer (ST-MoE, Zoph et al. 2022, §4.3).
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def weights(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """`(w_in, w_gate or None, w_out)` in the compute dtype, for `apply_batched`/`apply_grouped`
    on weights held outside the module (the expert-parallel path passes each device's shard)."""
    cast = lambda w: None if w is None else w[...].astype(self.dtype)
    return cast(self.w_in), cast(self.w_gate), cast(self.w_out)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[experts, capacity, d_model] -> [experts, capacity, d_model]`."""
    return self.apply_batched(x, self.weights(), self.active_dropout())

  def active_dropout(self):
    """The expert dropout (a function of the hidden layer), or None when it is off (rate 0
    or deterministic): the expert paths then skip it entirely."""
    if self.dropout.rate == 0.0 or self.dropout.deterministic:
      return None
    return self.dropout

  def apply_batched(self, x: jax.Array, weights, dropout) -> jax.Array:
    """`__call__` on explicit `weights` (any number of experts, from `weights()` or a shard of
    them) with `dropout` a function of the hidden layer, or None for no dropout.

    On CPU each expert's buffer is one block of `block_ffn.block_ffn`: XLA's CPU backend runs
    a loop of 2-D matmuls faster than one batched matmul (forward+backward, E=16/64 experts of
    512/128 rows: see docs/performance.md)."""
    w_in, w_gate, w_out = weights
    x = x.astype(self.dtype)
    if jax.default_backend() == "cpu":
      num_experts = x.shape[0]
      keep = _keep_scale(dropout, x.shape[:2] + (w_in.shape[-1],), self.dtype)
      return block_ffn.block_ffn(
        self.activation, x, jnp.arange(num_experts), num_experts, keep, w_in, w_gate, w_out
      )
    return batched_ffn(self.activation, x, w_in, w_gate, w_out, dropout)

  def grouped(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`[rows, d_model]` sorted by expert, `group_sizes` `[experts]` -> `[rows, d_model]`.

    Rows past `sum(group_sizes)` belong to no expert; their output is zero.
    On GPU and TPU this is `jax.lax.ragged_dot`. XLA's CPU backend computes `ragged_dot`
    densely for every group (about E times the work), so on CPU the rows are instead
    padded into fixed-size blocks, each owned by one expert (block-sparse, as MegaBlocks),
    and a loop multiplies every block by its expert's weights.
    """
    return self.apply_grouped(x, group_sizes, self.weights(), self.active_dropout())

  def apply_grouped(self, x: jax.Array, group_sizes: jax.Array, weights, dropout) -> jax.Array:
    """`grouped` on explicit `weights` (`group_sizes` has one entry per expert of `weights`)."""
    if jax.default_backend() == "cpu":
      return self._grouped_blocks(x, group_sizes, weights, dropout)
    return self._grouped_ragged(x, group_sizes, weights, dropout)

  def _grouped_ragged(self, x, group_sizes, weights, dropout) -> jax.Array:
    w_in, w_gate, w_out = weights
    x = x.astype(self.dtype)
    pre = jax.lax.ragged_dot(x, w_in, group_sizes)
    gate_pre = None if w_gate is None else jax.lax.ragged_dot(x, w_gate, group_sizes)
    hidden = _apply(dropout, hidden_activation(self.activation, pre, gate_pre))
    out = jax.lax.ragged_dot(hidden, w_out, group_sizes)
    in_group = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(in_group[:, None], out, 0)

  def _grouped_blocks(self, x, group_sizes, weights, dropout) -> jax.Array:
    """The CPU grouped matmul: rows laid out in blocks of one expert each
    (`block_ffn.grouped_layout`), then `block_ffn.block_ffn` over the blocks in use."""
    rows, d = x.shape
    block, slot_row, block_expert, row_slot, used_blocks = block_ffn.grouped_layout(
      group_sizes, rows
    )
    blocks = take_rows(x, slot_row, row_slot[:, None])
    blocks = blocks.reshape(-1, block, d).astype(self.dtype)  # [blocks, block, d]
    w_in, w_gate, w_out = weights
    keep = _keep_scale(dropout, blocks.shape[:2] + (w_in.shape[-1],), self.dtype)
    out = block_ffn.block_ffn(
      self.activation, blocks, block_expert, used_blocks, keep, w_in, w_gate, w_out
    )
    return take_rows(out.reshape(-1, d), row_slot, slot_row[:, None])


def batched_ffn(
  activation: str,
  x: jax.Array,
  w_in: jax.Array,
  w_gate: jax.Array | None,
  w_out: jax.Array,
  dropout=None,
) -> jax.Array:
  """`x` `[experts, capacity, d_model]` through each expert's FFN as one batched einsum per
  weight (the GPU/TPU form); `dropout` a function of the hidden layer or None."""
  pre = jnp.einsum("ecd,edf->ecf", x, w_in)
  gate_pre = None if w_gate is None else jnp.einsum("ecd,edf->ecf", x, w_gate)
  hidden = _apply(dropout, hidden_activation(activation, pre, gate_pre))
  return jnp.einsum("ecf,efd->ecd", hidden, w_out)


def _apply(dropout, hidden: jax.Array) -> jax.Array:
  return hidden if dropout is None else dropout(hidden)


def _keep_scale(dropout, shape, dtype) -> jax.Array | None:
  """Dropout's scaling of the hidden layer (0 or 1/keep_prob), drawn outside the expert loop
  so the loop stays pure; None without dropout."""
  return None if dropout is None else dropout(jnp.ones(shape, dtype))
