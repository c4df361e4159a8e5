"""What every dispatch form's test module checks: the form against the NumPy reference
(`moe_reference.dispatch_combine`), values and gradients, on a routing given as data.

The experts are real SwiGLU FFNs; the gradients (of sum(y · cotangent) with respect to the
tokens and the gates) are compared with central finite differences of the float64 NumPy
reference, an independent computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import moe_reference as ref
from moejax.moe.expert_parallel import ExpertSpec, run_experts
from moejax.moe.experts import Experts
from moejax.moe.routing import ExpertChoice, TokenChoice

D_MODEL, D_FF = 6, 5


def make_experts(num_experts: int, seed: int = 0) -> Experts:
  return Experts(num_experts, D_MODEL, D_FF, "swiglu", rngs=nnx.Rngs(seed))


def numpy_expert(experts: Experts):
  w = {n: np.asarray(getattr(experts, n)[...], np.float64) for n in ("w_in", "w_gate", "w_out")}
  return lambda e, v: ref.ffn(v, w["w_in"][e], w["w_gate"][e], w["w_out"][e], "swiglu")


def random_routing(groups: int, tokens: int, num_experts: int, k: int, seed: int):
  """A token-choice routing `[groups, tokens, k]` as data: distinct experts per token,
  positive gates, about one assignment in eight invalid."""
  rng = np.random.default_rng(seed)
  indices = np.stack(
    [np.stack([rng.permutation(num_experts)[:k] for _ in range(tokens)]) for _ in range(groups)]
  )
  gates = rng.uniform(0.1, 1.0, (groups, tokens, k))
  valid = rng.random((groups, tokens, k)) > 0.125
  return indices.astype(np.int32), gates, valid


def apply_form(form, experts, x, routing, capacity):
  """`x` `[G, S, d]` through prepare -> the experts (one device) -> combine; also `kept`."""
  E = experts.num_experts
  inputs, plan = form.prepare(x, routing, num_experts=E, capacity=capacity, dtype=jnp.float32)
  spec = ExpertSpec("swiglu", "block_loop", "cpu", 2.0, "rounds", routing_k(routing))
  outputs, overflow = run_experts(None, inputs, experts.weights(), spec)
  assert int(overflow) == 0
  return form.combine(outputs, plan).reshape(x.shape), plan.kept


def routing_k(routing) -> int:
  return routing.expert_indices.shape[-1] if isinstance(routing, TokenChoice) else 1


def token_choice(indices, gates, valid) -> TokenChoice:
  return TokenChoice(jnp.asarray(indices), jnp.asarray(gates, jnp.float32), jnp.asarray(valid))


def check_token_choice_values(form, *, capacity, groups=2, tokens=9, num_experts=4, k=2, seed=0):
  """The form's output and kept mask equal the reference's, group by group; returns the
  number of dropped valid assignments (so callers can check the test exercised drops)."""
  experts = make_experts(num_experts, seed)
  indices, gates, valid = random_routing(groups, tokens, num_experts, k, seed)
  x = np.random.default_rng(seed + 1).normal(size=(groups, tokens, D_MODEL))
  y, kept = apply_form(
    form, experts, jnp.asarray(x, jnp.float32), token_choice(indices, gates, valid), capacity
  )
  dropped = 0
  for g in range(groups):
    want_y, want_kept = ref.dispatch_combine(
      x[g], indices[g], gates[g], valid[g], numpy_expert(experts), capacity
    )
    np.testing.assert_allclose(np.asarray(y[g]), want_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(kept).reshape(groups, tokens, k)[g], want_kept)
    dropped += int(np.sum(valid[g] & ~want_kept))
  return dropped


def check_token_choice_gradients(form, *, capacity, tokens=7, num_experts=3, k=2, seed=0):
  """d sum(y · cot) / d(x, gates) equals central differences of the reference (float64)."""
  experts = make_experts(num_experts, seed)
  indices, gates, valid = random_routing(1, tokens, num_experts, k, seed)
  rng = np.random.default_rng(seed + 2)
  x = rng.normal(size=(1, tokens, D_MODEL))
  cot = rng.normal(size=(tokens, D_MODEL))

  def ours(x, gates):
    routing = TokenChoice(jnp.asarray(indices), gates, jnp.asarray(valid))
    y, _ = apply_form(form, experts, x, routing, capacity)
    return jnp.sum(y[0] * cot)

  grad_x, grad_gates = jax.grad(ours, argnums=(0, 1))(
    jnp.asarray(x, jnp.float32), jnp.asarray(gates, jnp.float32)
  )
  fn = numpy_expert(experts)

  def reference(x, gates):
    y, _ = ref.dispatch_combine(x[0], indices[0], gates[0], valid[0], fn, capacity)
    return float(np.sum(y * cot))

  np.testing.assert_allclose(
    np.asarray(grad_x), _central_difference(reference, x, gates, 0), rtol=1e-3, atol=1e-4
  )
  np.testing.assert_allclose(
    np.asarray(grad_gates), _central_difference(reference, x, gates, 1), rtol=1e-3, atol=1e-4
  )


def _central_difference(f, x, gates, which, eps=1e-6):
  args = [x.copy(), gates.copy()]
  target = args[which]
  grad = np.zeros_like(target)
  for index in np.ndindex(target.shape):
    saved = target[index]
    target[index] = saved + eps
    plus = f(*args)
    target[index] = saved - eps
    minus = f(*args)
    target[index] = saved
    grad[index] = (plus - minus) / (2 * eps)
  return grad


def check_expert_choice_values(form):
  """An expert-choice routing given as data (tokens 0 and 3 taken twice, token 2 by no
  expert): the form's output and taken mask equal the reference's."""
  experts = make_experts(3)
  x = np.random.default_rng(0).normal(size=(1, 5, D_MODEL))
  token_indices = np.array([[[0, 3], [3, 4], [1, 0]]], np.int32)  # [G, E, C]
  gates = np.random.default_rng(1).uniform(0.1, 1, (1, 3, 2))
  routing = ExpertChoice(jnp.asarray(token_indices), jnp.asarray(gates, jnp.float32))
  y, taken = apply_form(form, experts, jnp.asarray(x, jnp.float32), routing, 2)
  want_y, want_taken = ref.expert_choice_dispatch_combine(
    x[0], token_indices[0], gates[0], numpy_expert(experts)
  )
  np.testing.assert_allclose(np.asarray(y[0]), want_y, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(taken)[0], want_taken)
