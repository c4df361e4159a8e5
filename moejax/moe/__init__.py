"""The Mixture-of-Experts layer: config, routing, dispatch, experts, expert parallelism.

Calls only go down: `layer` -> `routing`, `dispatch` -> `expert_parallel` (->
`dropless_exchange`) -> `experts` -> `block_ffn`; `rows` holds the gathers they share.
"""

from moejax.moe.balancing import load_balancing_loss, router_z_loss
from moejax.moe.config import MoeConfig
from moejax.moe.layer import MoeLayer

__all__ = ["MoeConfig", "MoeLayer", "load_balancing_loss", "router_z_loss"]
