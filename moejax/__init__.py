"""moejax: sparse Mixture-of-Experts transformer language models in JAX and Flax NNX."""

from moejax.moe import MoeConfig, MoeLayer, load_balancing_loss, router_z_loss

__all__ = ["MoeConfig", "MoeLayer", "load_balancing_loss", "router_z_loss"]
__version__ = "0.1.0"
