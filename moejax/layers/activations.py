"""The FFN hidden-layer activations shared by the dense FFN and the experts.

Gated activations (SwiGLU, GeGLU; Shazeer 2020, "GLU Variants Improve Transformer") use
two input matrices (gate and up); the others one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh")
_exact_gelu = functools.partial(jax.nn.gelu, approximate=False)
_tanh_gelu = functools.partial(jax.nn.gelu, approximate=True)
# 'gelu': x·Φ(x) exactly (Hendrycks & Gimpel 2016; PyTorch's default); 'gelu_tanh': its tanh
# approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (BERT, GPT-2, Mesh TensorFlow's
# T5/ST-MoE), within about 1e-3 of it. SwiGLU and GeGLU (exact) gate with silu and gelu;
# 'geglu_tanh' gates with the tanh approximation, as Grok-1 does (`jax.nn.gelu`'s default
# in xai-org/grok-1's model.py, `DenseBlock`).
_GATED: dict[str, Callable[[jax.Array], jax.Array]] = {
  "swiglu": jax.nn.silu,
  "geglu": _exact_gelu,
  "geglu_tanh": _tanh_gelu,
}
_PLAIN: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": jax.nn.relu,
  "gelu": _exact_gelu,
  "gelu_tanh": _tanh_gelu,
}


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
    if gate_pre is None:
      raise ValueError(f"activation {activation!r} is gated: it needs the gate's pre-activations.")
    return _GATED[activation](gate_pre) * pre
  return _PLAIN[activation](pre)
