"""Dropout on a block's dense residual branches (`model.dropout`): the attention output and
the dense FFN output, before each is added to the residual stream (Vaswani et al. 2017,
§5.4). The MoE branch has its own, `model.expert_dropout` on the expert hidden layer
(ST-MoE).

It acts in training mode only (`model.train()`; `model.eval()` turns it off) and draws from
the `dropout` RNG stream, which exists only when the rate is above 0: a rate of 0 adds no
state and draws nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ResidualDropout(nnx.Module):
  """`y = x · keep / (1 - rate)` with `keep ~ Bernoulli(1 - rate)` per element in training
  mode; `y = x` in eval mode or at rate 0. `x` any shape, y the same shape and dtype."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
      raise ValueError(f"config.model.dropout={rate!r} must be a rate in [0, 1).")
    self.rate = float(rate)
    self.rng = rngs["dropout"].fork() if rate else None
    self.deterministic = False

  def draws_randomness(self) -> bool:
    """Whether a call draws from the RNG stream (training mode, rate above 0)."""
    return self.rng is not None and not self.deterministic

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.rng is None or self.deterministic:  # not `draws_randomness()`
      return x
    keep = jax.random.bernoulli(self.rng(), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


def draws_randomness(module: nnx.Module) -> bool:
  """Whether a call of `module` draws from an RNG stream: whether any module in it with a
  `draws_randomness()` method (dropout, an MoE layer's router noise) says so."""
  asks = (
    getattr(m, "draws_randomness", None) for _, m in nnx.iter_modules(module) if m is not module
  )
  return any(ask() for ask in asks if callable(ask))
