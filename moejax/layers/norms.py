"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.parallel.sharding import logical


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x²) + eps) · scale over the last axis.

  Normalises in float32 and returns the input's dtype. `scale` `[dim]` starts at ones.
  `eps` is the published model's: 1e-5 (Mixtral, Qwen2-MoE, OLMoE), 1e-6 (Qwen3, DeepSeek).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed"):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), **logical(axis_name))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., dim]` -> `[..., dim]`."""
    x32 = x.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 / rms * self.scale[...]).astype(x.dtype)
