"""The dense feed-forward network and the 2-D row layout every projection uses.

Weights carry no biases. Gated activations (SwiGLU, GeGLU; Shazeer 2020, "GLU Variants
Improve Transformer") use three matrices (gate, up, down); the others two (in, out).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.layers.activations import check_activation, hidden_activation, is_gated
from moejax.layers.saved_names import FFN_IN, FFN_OUT, FFN_PRE
from moejax.parallel.sharding import logical


def on_rows(fn, x: jax.Array) -> jax.Array:
  """`fn` (`[rows, d_in] -> [rows, d_out]`) applied to `x` `[..., d_in]` as one 2-D array;
  returns `[..., d_out]`.

  A matmul over `[batch, seq, d]` contracts two token axes in its weight gradient, which
  XLA's CPU backend runs about 2x slower than the same contraction over one flattened
  axis (docs/performance.md, "What changed"). Every projection of the model goes through
  here.
  """
  rows = fn(x.reshape(-1, x.shape[-1]))
  return rows.reshape(*x.shape[:-1], rows.shape[-1])


Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def ffn_core(
  activation: str,
  x: jax.Array,
  w_in: jax.Array,
  w_gate: jax.Array | None,
  w_out: jax.Array,
  *,
  matmul: Matmul = jnp.matmul,
  keep: jax.Array | None = None,
) -> jax.Array:
  """`act(x·W_in, x·W_gate) · keep · W_out`, every FFN's arithmetic (dense, shared and
  routed experts), with its activations named for the remat policies
  (`moejax.layers.saved_names`: `FFN_IN`, `FFN_PRE`, `FFN_OUT`).

  Args:
    x: the rows, `[..., d_model]` in the layout `matmul` takes.
    w_in, w_gate, w_out: the weights `matmul` multiplies them by; `w_gate` None for an
      ungated activation.
    matmul: `(rows, weight) -> product`: `jnp.matmul` for `[rows, d]` by `[d, f]`, a
      batched einsum for per-expert buffers, a grouped matmul for rows sorted by expert.
    keep: None, or expert dropout's scaling of the hidden units (`[..., d_ff]`).

  Returns:
    `[..., d_model]`.
  """
  x = checkpoint_name(x, FFN_IN)
  pre = checkpoint_name(matmul(x, w_in), FFN_PRE)
  gate_pre = None if w_gate is None else checkpoint_name(matmul(x, w_gate), FFN_PRE)
  hidden = hidden_activation(activation, pre, gate_pre)
  if keep is not None:
    hidden = hidden * keep
  return checkpoint_name(matmul(hidden, w_out), FFN_OUT)


class FeedForward(nnx.Module):
  """Dense FFN `[..., d_model] -> [..., d_model]` (the dense baseline and shared experts)."""

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    activation: str = "swiglu",
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
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
    gate = None if self.w_gate is None else self.w_gate[...].astype(self.dtype)
    w_in, w_out = self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype)
    return ffn_core(self.activation, x, w_in, gate, w_out)
