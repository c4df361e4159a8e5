"""The routed experts: stacked weights, and the expert FFN as pure functions of them.

Two layouts of routed tokens, two implementations of each (`expert_impl`, chosen once
from the platform of the layer's devices, `MoeConfig.resolved_expert_impl`):

| input | `grouped_matmul` (GPU, TPU) | `block_loop` (CPU) |
|---|---|---|
| capacity buffers `[experts, rows, d]` (`capacity_ffn`) | one batched einsum per weight | `block_ffn`, one matmul per expert |
| dropless rows `[rows, d]` sorted by expert (`grouped_ffn`) | `jax.lax.ragged_dot` (MegaBlocks' grouped GEMM) | `block_ffn`: each expert's rows in place, full blocks and one remainder matmul |

XLA's CPU backend computes `ragged_dot` densely for every group (about E times the work)
and runs a loop of 2-D matmuls faster than one batched matmul (docs/performance.md), hence
`block_loop` there. Expert dropout (ST-MoE, Zoph et al. 2022, §4.3) acts on the hidden
layer; `ExpertDropout` carries its rate and key, None when it is off.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.layers.activations import check_activation, is_gated
from moejax.layers.ffn import ffn_core
from moejax.layers.saved_names import FFN_IN, FFN_OUT
from moejax.moe import block_ffn
from moejax.parallel.sharding import logical

# `(w_in [E, d_model, d_ff], w_gate [E, d_model, d_ff] or None, w_out [E, d_ff, d_model])`.
ExpertWeights = tuple[jax.Array, jax.Array | None, jax.Array]


class ExpertDropout(NamedTuple):
  """Dropout on the expert hidden layer: keep each unit with probability 1 - `rate`."""

  rate: float
  key: jax.Array

  def keep_scale(self, shape, dtype) -> jax.Array:
    """The hidden layer's scaling `shape`: 0, or 1/(1 - rate) for a kept unit."""
    keep = jax.random.bernoulli(self.key, 1.0 - self.rate, shape)
    return keep.astype(dtype) / (1.0 - self.rate)


def _expert_init(scale: float = 1.0):
  """Fan-in truncated normal per expert: `[experts, fan_in, fan_out]` with experts a batch axis."""
  return nnx.initializers.variance_scaling(
    scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
  )


class Experts(nnx.Module):
  """E expert FFNs: weights `[experts, d_model, d_ff]` and `[experts, d_ff, d_model]`
  (gate too for SwiGLU/GeGLU), no biases; the expert dropout's RNG stream."""

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
    names_in, names_out = logical("expert", "embed", "mlp"), logical("expert", "mlp", "embed")
    self.activation, self.dtype, self.num_experts = activation, dtype, num_experts
    self.w_in = nnx.Param(init(rngs.params(), shape_in, jnp.float32), **names_in)
    self.w_gate = (
      nnx.Param(init(rngs.params(), shape_in, jnp.float32), **names_in)
      if is_gated(activation)
      else None
    )
    self.w_out = nnx.Param(init(rngs.params(), shape_out, jnp.float32), **names_out)
    self.dropout_rate = dropout_rate
    self.dropout_rng = rngs["dropout"].fork() if dropout_rate else None
    self.deterministic = False

  def weights(self) -> ExpertWeights:
    """The weights in the compute dtype."""
    gate = None if self.w_gate is None else self.w_gate[...].astype(self.dtype)
    return self.w_in[...].astype(self.dtype), gate, self.w_out[...].astype(self.dtype)

  def dropout(self) -> ExpertDropout | None:
    """A fresh `ExpertDropout`, or None when it is off (rate 0 or deterministic)."""
    if self.dropout_rng is None or self.deterministic:
      return None
    return ExpertDropout(self.dropout_rate, self.dropout_rng())


def capacity_ffn(
  activation: str,
  impl: str,
  x: jax.Array,
  weights: ExpertWeights,
  dropout: ExpertDropout | None = None,
) -> jax.Array:
  """Each expert's FFN on its buffer: `x` `[experts, rows, d_model]` -> the same shape.

  `weights` hold the same experts (any number: all of them, or one device's shard).
  """
  w_in, w_gate, w_out = weights
  num_experts, rows, d = x.shape
  keep = (
    None if dropout is None else dropout.keep_scale((num_experts, rows, w_in.shape[-1]), x.dtype)
  )
  if impl == "block_loop":  # each expert's buffer is one matmul
    x = checkpoint_name(x, FFN_IN)  # a policy keeps its rows and output, not its residuals
    return checkpoint_name(
      block_ffn.capacity_ffn(activation, x, keep, w_in, w_gate, w_out), FFN_OUT
    )
  return batched_ffn(activation, x, w_in, w_gate, w_out, keep)


def batched_ffn(activation, x, w_in, w_gate, w_out, keep=None) -> jax.Array:
  """`x` `[experts, rows, d_model]` through each expert's FFN as one batched einsum per
  weight; `keep` `[experts, rows, d_ff]` dropout scaling or None."""
  batched = lambda rows, w: jnp.einsum("ecd,edf->ecf", rows, w)
  return ffn_core(activation, x, w_in, w_gate, w_out, matmul=batched, keep=keep)


def grouped_ffn(
  activation: str,
  impl: str,
  x: jax.Array,
  group_sizes: jax.Array,
  weights: ExpertWeights,
  dropout: ExpertDropout | None = None,
) -> jax.Array:
  """Rows sorted by expert through their expert's FFN: `x` `[rows, d_model]`, `group_sizes`
  `[experts]` (one per expert of `weights`) -> `[rows, d_model]`. Rows past
  `sum(group_sizes)` belong to no expert; their output is zero."""
  w_in, w_gate, w_out = weights
  keep = None if dropout is None else dropout.keep_scale((x.shape[0], w_in.shape[-1]), x.dtype)
  if impl == "block_loop":
    block = block_ffn.block_size(x.shape[0], group_sizes.shape[0])
    x = checkpoint_name(x, FFN_IN)  # a policy keeps its rows and output, not its residuals
    out = block_ffn.ffn(activation, x, group_sizes, keep, w_in, w_gate, w_out, block=block)
    return checkpoint_name(out, FFN_OUT)
  grouped = lambda rows, w: jax.lax.ragged_dot(rows, w, group_sizes)
  out = ffn_core(activation, x, w_in, w_gate, w_out, matmul=grouped, keep=keep)
  in_group = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(in_group[:, None], out, 0)
