"""The dropless exchange over an expert axis (`moejax.moe.dropless_exchange`): its plan
by hand, rounds that drop nothing however skewed the router, and the opt-in bounded
buffer that drops and counts, against a NumPy count of what each receiver drops.

The whole model under skewed routers, on every mesh, is in `test_expert_parallel.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_expert_parallel import flat, layer_value_and_grad, make_layer, make_mesh

from helpers import moe_reference
from moejax.moe.dropless_exchange import exchange_plan, num_rounds


def test_exchange_plan_is_a_hand_count():
  # 2 devices, 4 experts (device 0 holds experts 0-1, device 1 experts 2-3).
  all_sizes = jnp.asarray(
    [
      [1, 2, 3, 0],  # device 0 routes 3 rows to device 0, 3 to device 1
      [4, 0, 1, 1],
    ]
  )  # device 1 routes 4 to device 0, 2 to device 1
  plan = {k: np.asarray(v) for k, v in exchange_plan(all_sizes, buffer_rows=5).items()}
  np.testing.assert_array_equal(plan["per_pair"], [[3, 3], [4, 2]])
  np.testing.assert_array_equal(plan["send_start"], [[0, 3], [0, 4]])
  np.testing.assert_array_equal(plan["recv_start"], [[0, 0], [3, 3]])
  np.testing.assert_array_equal(plan["first"], [[0, 0], [0, 0]])
  # Device 0's buffer of 5: its own 3 rows, then 2 of device 1's 4; device 1 takes all 5.
  np.testing.assert_array_equal(plan["sent"], [[3, 3], [2, 2]])
  # Round 1 moves device 0's stream past 5: device 1's last 2 rows for it (its rows 2-3,
  # landing at the buffer's start). Device 1's stream (5 rows) is done.
  plan = {k: np.asarray(v) for k, v in exchange_plan(all_sizes, 5, 1).items()}
  np.testing.assert_array_equal(plan["sent"], [[0, 0], [2, 0]])
  np.testing.assert_array_equal(plan["first"][1, 0], 2)
  np.testing.assert_array_equal(plan["send_start"][1, 0], 2)
  np.testing.assert_array_equal(plan["recv_start"][1, 0], 0)
  assert int(num_rounds(all_sizes, 5)) == 2  # streams of 7 and 5 rows
  assert int(num_rounds(all_sizes, 7)) == 1
  assert int(num_rounds(all_sizes, 3)) == 3


def _numpy_overflow_layer(layer, x, mesh_devices, buffer_rows):
  """The dropless layer on `mesh_devices` expert devices with `buffer_rows` receive rows,
  by hand: which assignments each receiver drops, then the gated sum of the rest."""
  c = layer.config
  params = moe_reference.layer_params(layer)
  tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  probs = moe_reference.softmax(tokens @ params["router"])
  choice = np.argsort(-probs, -1, kind="stable")[:, : c.top_k]
  local = c.num_experts // mesh_devices
  per_device = tokens.shape[0] // mesh_devices
  chunks = {}  # (sender, receiver) -> assignments (token, rank) in row order
  for s in range(mesh_devices):
    mine = range(s * per_device, (s + 1) * per_device)
    rows = [(t, r) for r in range(c.top_k) for t in mine]  # rank-major
    rows.sort(key=lambda a: choice[a[0], a[1]])  # stable sort by expert
    for j in range(mesh_devices):
      chunks[s, j] = [a for a in rows if choice[a] // local == j]
  dropped = set()
  for j in range(mesh_devices):
    start = 0
    for s in range(mesh_devices):
      fits = max(0, min(len(chunks[s, j]), buffer_rows - start))
      dropped |= set(chunks[s, j][fits:])
      start += len(chunks[s, j])
  y = np.zeros_like(tokens)
  for t in range(tokens.shape[0]):
    for r in range(c.top_k):
      if (t, r) not in dropped:
        e = choice[t, r]
        y[t] += probs[t, e] * moe_reference.ffn(
          tokens[t], params["w_in"][e], params["w_gate"][e], params["w_out"][e], c.activation
        )
  return y.reshape(x.shape), len(dropped)


def _skewed_layer(mesh=None, **overrides):
  """A dropless layer whose router sends most tokens to expert 0 first."""
  layer = make_layer(dispatch="dropless", group_size=None, mesh=mesh, **overrides)
  layer.router_kernel[...] = 3 * layer.router_kernel[...]
  return layer


def test_dropless_opt_in_buffer_drops_and_counts_as_documented():
  mesh = make_mesh(1, 4)
  layer = _skewed_layer(mesh, dropless_buffer_factor=0.75, dropless_overflow="drop")
  x = jax.random.normal(jax.random.key(1), (8, 4, 16))  # 8 tokens, 16 rows per device
  y, aux = jax.jit(lambda x: layer(x))(x)
  want, dropped = _numpy_overflow_layer(layer, x, 4, buffer_rows=12)
  assert dropped > 0, "the test should overflow some receive buffer"
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  assert float(aux["dropped_fraction"]) == pytest.approx(dropped / (32 * 2))
  np.testing.assert_array_equal(np.asarray(aux["routing"]["kept"]), True)  # only the exchange drops


_REFERENCE = []


def _one_device_reference(x):
  """The skewed layer's (value, dropped, grads) on one device, computed once."""
  if not _REFERENCE:
    step, state = layer_value_and_grad(_skewed_layer(dropless_buffer_factor=0.5))
    _REFERENCE.append(jax.device_get(jax.jit(step)(state, x)))
  return _REFERENCE[0]


@pytest.mark.parametrize("shape", [(1, 8), (2, 4), (4, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rounds_drop_nothing_under_a_skewed_router(shape):
  """A buffer of half a device's rows: every stream needs at least two rounds (the opt-in
  bound drops a third to a half of the assignments), and the default rounds give one
  device's value and gradients."""
  x = jax.random.normal(jax.random.key(0), (16, 8, 16))
  ref_value, ref_dropped, ref_grads = _one_device_reference(x)
  assert float(ref_dropped) == 0
  mesh = make_mesh(*shape)
  bounded = _skewed_layer(mesh, dropless_buffer_factor=0.5, dropless_overflow="drop")
  one_round_dropped = jax.jit(lambda x: bounded(x)[1]["dropped_fraction"])(x)
  assert float(one_round_dropped) > 0.3, "one round should not be enough"
  step, state = layer_value_and_grad(_skewed_layer(mesh, dropless_buffer_factor=0.5))
  value, dropped, grads = jax.jit(step)(state, x)
  assert float(dropped) == 0
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for path, ref in flat(ref_grads).items():
    err = np.max(np.abs(flat(grads)[path] - ref)) / np.max(np.abs(ref))
    assert err < 1e-5, f"{path}: gradient differs by {err:.2e} of its max"


def test_expert_dropout_runs_under_expert_parallelism_in_rounds():
  layer = _skewed_layer(
    make_mesh(2, 4),
    expert_dropout=0.5,
    dropless_buffer_factor=0.5,  # several rounds: each folds its own dropout key
    rngs=nnx.Rngs(params=0, dropout=1, router=2),
  )
  x = jax.random.normal(jax.random.key(0), (8, 4, 16))
  apply = nnx.jit(lambda m, x: m(x)[0])
  y1, y2 = apply(layer, x), apply(layer, x)
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x)[0]))))(layer, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.max(jnp.abs(grads.experts.w_in[...]))) > 0
  layer.eval()
  y_eval = apply(layer, x)
  assert bool(jnp.all(jnp.isfinite(y1))) and not np.allclose(y1, y2)  # a fresh mask each call
  np.testing.assert_allclose(y_eval, apply(layer, x), rtol=1e-5, atol=1e-6)  # eval: no dropout
