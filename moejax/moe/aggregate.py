"""The model's MoE metrics: each MoE layer's aux dict (`MoeLayer`) aggregated over layers."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

SCALARS = ("lb_loss", "seq_aux_loss", "z_loss", "dropped_fraction")


def aggregate_aux(auxes: list[dict[str, Any]], num_experts: int) -> dict[str, Any]:
  """Means of the scalar MoE metrics over the MoE layers (`SCALARS`: float32 scalars, 0.0
  without MoE layers); the per-layer `expert_load` stacked `[num_moe_layers, num_experts]`
  (`[0, num_experts]` without); each layer's `routing` dict in a tuple, in layer order."""
  if not auxes:
    zero = jnp.zeros((), jnp.float32)
    return {
      **{name: zero for name in SCALARS},
      "expert_load": jnp.zeros((0, num_experts), jnp.float32),
      "routing": (),
    }
  mean = lambda name: jnp.mean(jnp.stack([a[name].astype(jnp.float32) for a in auxes]))
  return {
    **{name: mean(name) for name in SCALARS},
    "expert_load": jnp.stack([a["expert_load"] for a in auxes]),
    "routing": tuple(a["routing"] for a in auxes),
  }
