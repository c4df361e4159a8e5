"""`/`-joined names of the leaves of NNX states and pure-dict pytrees
(`stacks/0/period/blocks/0/moe/router_kernel`): how checkpoints, the trainable-parameter
filters and the checkpoint converter name a parameter."""

from __future__ import annotations

from typing import Any

import jax


def path_name(path) -> str:
  """`('stacks', 0, 'period', ...)` (a jax key path) -> `'stacks/0/period/...'`."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat(tree: Any) -> dict[str, Any]:
  """`{'stacks/0/period/blocks/0/moe/router_kernel': leaf, ...}` of a pytree."""
  return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}
