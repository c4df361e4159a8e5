"""The FFN hidden-layer activations shared by the dense FFN and the experts.

Gated activations (SwiGLU, GeGLU; Shazeer 2020, "GLU Variants Improve Transformer") use
two input matrices (gate and up); the others one.
"""

from __future__ import annotations

import jax

ACTIVATIONS = ("relu", "gelu", "swiglu", "geglu")
_GATED = {"swiglu": jax.nn.silu, "geglu": jax.nn.gelu}
_PLAIN = {"relu": jax.nn.relu, "gelu": jax.nn.gelu}


def check_activation(activation: str) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(
      f"activation={activation!r} is not supported; allowed: {', '.join(ACTIVATIONS)}."
    )


def is_gated(activation: str) -> bool:
  return activation in _GATED


def hidden_activation(activation: str, pre: jax.Array, gate_pre: jax.Array | None) -> jax.Array:
  """The FFN hidden layer from its pre-activations: act(pre), or act(gate_pre) · pre if gated."""
  if activation in _GATED:
    return _GATED[activation](gate_pre) * pre
  return _PLAIN[activation](pre)
