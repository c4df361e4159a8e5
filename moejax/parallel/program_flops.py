"""The matmul FLOPs a traced program performs, read from its jaxpr.

The analytic count (`moejax.models.flops`) says what a model needs: 2 FLOPs per weight
and token forward, about 3x that to train. What a training step actually computes also
depends on what its backward pass recomputes (`model.remat`): JAX writes the recomputed
forward into the backward jaxpr (inside `remat` equations), so counting the jaxpr's
matmuls counts the recomputation too, whatever the policy saved.

Counted: every `dot_general` (`2 · prod(output) · prod(contracted dims)`) and every
`ragged_dot_general` (the grouped matmul: each row meets one group's weights, so
`2 · prod(output without its group dim) · prod(contracted dims)`). Elementwise work,
softmax and reductions are not counted: on the matrix units they are not the bound.

Loops: a `scan` counts its body `length` times. A `while` loop's trip count is known only
at run time (dropless's later exchange rounds, taken only under a skewed router): it
counts zero times, the step of a balanced router, as `moejax.parallel.hlo.collectives`
does with `unknown_trips=0`. A `cond` counts its most expensive branch.

A Pallas kernel (`pallas_call`, e.g. splash attention) counts its own `cost_estimate`
when it gives one, else its body once per step of its grid: an upper bound for kernels that
skip blocks, as causal splash attention skips those above the diagonal.

`shard_map` bodies see per-device shapes: their count is multiplied by the devices of
their newly manual axes, so the total is the whole program's, over all devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from jax.extend import core


def matmul_flops(jaxpr) -> float:
  """The matmul FLOPs of `jaxpr` (a `Jaxpr` or `ClosedJaxpr`) over the whole mesh.

  Divide by the number of devices for one device's share, as the partitioner spreads it.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  return float(sum(_equation_flops(eqn) for eqn in jaxpr.eqns))


def _equation_flops(eqn) -> float:
  name, params = eqn.primitive.name, eqn.params
  if name == "dot_general":
    (contract_lhs, _), _ = params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract_lhs)
  if name == "ragged_dot_general":
    numbers = params["ragged_dot_dimension_numbers"]
    (contract_lhs, _), _ = numbers.dot_dimension_numbers
    lhs, groups = eqn.invars[0].aval.shape, eqn.invars[2].aval.shape[-1]
    output = math.prod(eqn.outvars[0].aval.shape)
    if not numbers.rhs_group_dimensions:  # ragged contraction: one output per group
      output //= groups
    return 2.0 * output * math.prod(lhs[d] for d in contract_lhs)
  if name == "scan":
    return params["length"] * matmul_flops(params["jaxpr"])
  if name == "while":
    return 0.0  # trip count unknown until run time: see the module docstring
  if name == "cond":
    return max(matmul_flops(branch) for branch in params["branches"])
  if name == "pallas_call":
    estimate = params.get("cost_estimate")
    if estimate is not None:
      return float(estimate.flops)
    return math.prod(params["grid_mapping"].grid) * matmul_flops(params["jaxpr"])
  inner = sum(matmul_flops(sub) for sub in _sub_jaxprs(params))
  if name == "shard_map":
    mesh = params["mesh"]
    inner *= math.prod(mesh.shape[axis] for axis in params["newly_manual_axes"])
  return inner


def _sub_jaxprs(params: dict) -> Iterator:
  """The jaxprs an equation calls (`pjit`, `remat`, `shard_map`, `custom_jvp_call`, ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, (core.Jaxpr, core.ClosedJaxpr)):
        yield item
