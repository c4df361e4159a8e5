"""MoeLayer against the NumPy reference loop: every dispatch form through the whole layer,
routing groups, the routers, metrics and modes, and the routing it exposes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import moe_reference as ref
from moejax.moe import MoeConfig, MoeLayer

D_MODEL, D_FF = 8, 12


def make_layer(*, dtype=jnp.float32, rngs=None, mesh=None, **overrides):
  """A layer of 4 experts, top-2, with `overrides` of its `MoeConfig`."""
  config = MoeConfig(**{"num_experts": 4, "d_ff": D_FF, "top_k": 2, **overrides})
  layer = MoeLayer(config, d_model=D_MODEL, dtype=dtype, mesh=mesh, rngs=rngs or nnx.Rngs(0))
  # Spread the router so that routing is decisive and drops happen at small capacity.
  layer.router_kernel[...] = jax.random.normal(jax.random.key(7), layer.router_kernel.shape)
  return layer


def inputs(batch=2, seq=10, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, seq, D_MODEL))


def run_reference(layer, x, *, dropless=False, group_size=None):
  """The NumPy loop on `layer`'s weights; routing groups of `group_size` tokens (None: one
  per sequence, the layer's default)."""
  c = layer.config
  params = ref.layer_params(layer)
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  group = group_size or x.shape[1]
  cap = (
    None
    if dropless
    else ref.capacity(group, c.num_experts, c.top_k, c.capacity_factor, c.min_capacity)
  )
  y, dropped = ref.token_choice(
    tokens,
    params,
    num_experts=c.num_experts,
    top_k=c.top_k,
    activation=c.activation,
    renormalize=c.renormalize,
    capacity_per_expert=cap,
    group_size=group,
  )
  return y.reshape(x.shape), dropped


@pytest.mark.parametrize("expert_impl", ["block_loop", "grouped_matmul"])
@pytest.mark.parametrize("dispatch", ["auto", "einsum", "sort", "dropless"])
@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu", "geglu"])
def test_matches_reference_loop_with_drops(dispatch, activation, expert_impl):
  layer = make_layer(
    dispatch=dispatch,
    activation=activation,
    capacity_factor=0.6,
    min_capacity=1,
    expert_impl=expert_impl,
  )
  assert layer.expert_impl == expert_impl
  x = inputs()
  y, aux = layer(x)
  expected, dropped = run_reference(layer, x, dropless=dispatch == "dropless")
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)
  if dispatch != "dropless":
    assert dropped > 0, "the test should exercise dropping"
  assert float(aux["dropped_fraction"]) == pytest.approx(dropped / (x.shape[0] * x.shape[1] * 2))


@pytest.mark.parametrize("dispatch", ["einsum", "sort"])
def test_routing_groups_match_reference(dispatch):
  layer = make_layer(dispatch=dispatch, capacity_factor=0.75, min_capacity=1, group_size=5)
  x = inputs()
  y, aux = layer(x)
  expected, dropped = run_reference(layer, x, group_size=5)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)
  assert float(aux["dropped_fraction"]) == pytest.approx(dropped / 40)


@pytest.mark.parametrize("dispatch", ["einsum", "sort"])
def test_expert_choice_matches_reference(dispatch):
  layer = make_layer(router="expert_choice", dispatch=dispatch, capacity_factor=1.0, group_size=10)
  x = inputs()
  y, aux = layer(x)
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  cap = ref.capacity(10, 4, 2, 1.0, layer.config.min_capacity)
  expected = ref.expert_choice(
    tokens,
    ref.layer_params(layer),
    num_experts=4,
    capacity_per_expert=cap,
    activation="swiglu",
    group_size=10,
  )
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D_MODEL), expected, rtol=1e-4, atol=1e-5)
  assert float(aux["lb_loss"]) == 0.0
  assert 0.0 <= float(aux["dropped_fraction"]) < 1.0


def test_dense_router_is_the_softmax_mixture():
  layer = make_layer(router="dense", top_k=4, dispatch="sort")
  x = inputs()
  y, aux = layer(x)
  params = ref.layer_params(layer)
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  probs = ref.softmax(tokens @ params["router"])
  expected = sum(
    probs[:, e : e + 1]
    * np.stack(
      [
        ref.ffn(t, params["w_in"][e], params["w_gate"][e], params["w_out"][e], "swiglu")
        for t in tokens
      ]
    )
    for e in range(4)
  )
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D_MODEL), expected, rtol=1e-4, atol=1e-5)
  assert float(aux["dropped_fraction"]) == 0.0


def test_renormalized_top_k_matches_reference():
  layer = make_layer(dispatch="dropless", renormalize=True)
  x = inputs()
  expected, _ = run_reference(layer, x, dropless=True)
  np.testing.assert_allclose(np.asarray(layer(x)[0]), expected, rtol=1e-4, atol=1e-5)


def test_shared_experts_add_a_dense_ffn():
  layer = make_layer(dispatch="dropless", num_shared_experts=2)
  x = inputs()
  y, _ = layer(x)
  routed, _ = run_reference(layer, x, dropless=True)
  shared = layer.shared
  w = {n: np.asarray(getattr(shared, n)[...], np.float64) for n in ("w_in", "w_gate", "w_out")}
  assert w["w_in"].shape == (D_MODEL, 2 * D_FF)
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  dense = np.stack([ref.ffn(t, w["w_in"], w["w_gate"], w["w_out"], "swiglu") for t in tokens])
  np.testing.assert_allclose(np.asarray(y), routed + dense.reshape(x.shape), rtol=1e-4, atol=1e-5)


def _loss_and_grads(layer, x):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(jnp.sin(y)) + aux["lb_loss"] + aux["z_loss"]

  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("capacity_factor", [0.6, 4.0])
def test_einsum_and_sort_agree_in_value_and_gradient(capacity_factor):
  x = inputs()
  results = {}
  for dispatch in ("einsum", "sort"):
    layer = make_layer(dispatch=dispatch, capacity_factor=capacity_factor, min_capacity=1)
    results[dispatch] = _loss_and_grads(layer, x)
  (v1, g1), (v2, g2) = results["einsum"], results["sort"]
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_all_dispatches_agree_in_gradient_without_drops():
  x = inputs()
  grads = {
    d: _loss_and_grads(make_layer(dispatch=d, capacity_factor=4.0), x)
    for d in ("einsum", "sort", "dropless")
  }
  for d in ("sort", "dropless"):
    np.testing.assert_allclose(float(grads[d][0]), float(grads["einsum"][0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[d][1]), jax.tree.leaves(grads["einsum"][1]), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- properties


@settings(max_examples=4, deadline=None)
@given(
  batch=st.integers(1, 3),
  seq=st.integers(1, 9),
  num_experts=st.integers(1, 6),
  k=st.integers(1, 3),
  capacity_factor=st.sampled_from([0.3, 0.5, 1.0, 1.5, 3.0]),
  dispatch=st.sampled_from(["einsum", "sort", "dropless"]),
  seed=st.integers(0, 1000),
)
def test_property_layer_matches_reference(
  batch, seq, num_experts, k, capacity_factor, dispatch, seed
):
  k = min(k, num_experts)
  layer = make_layer(
    num_experts=num_experts,
    top_k=k,
    dispatch=dispatch,
    capacity_factor=capacity_factor,
    min_capacity=1,
  )
  x = inputs(batch, seq, seed)
  y, aux = layer(x)
  expected, dropped = run_reference(layer, x, dropless=dispatch == "dropless")
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)
  assert float(aux["dropped_fraction"]) == pytest.approx(dropped / (batch * seq * k), abs=1e-6)
  np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- metrics and modes


@pytest.mark.parametrize("dispatch", ["einsum", "sort", "dropless"])
def test_nothing_dropped_when_capacity_covers_all_assignments(dispatch):
  layer = make_layer(dispatch=dispatch, num_experts=4, top_k=2, capacity_factor=4.0)  # C >= T·k
  _, aux = layer(inputs())
  assert float(aux["dropped_fraction"]) == 0.0
  assert aux["expert_load"].shape == (4,)
  np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), 1.0, rtol=1e-6)


def test_expert_load_counts_assignments_before_capacity():
  layer = make_layer(dispatch="sort", capacity_factor=0.3, min_capacity=1)
  x = inputs()
  _, aux = layer(x)
  probs = ref.softmax(
    np.asarray(x, np.float64).reshape(-1, D_MODEL) @ ref.layer_params(layer)["router"]
  )
  chosen = np.argsort(-probs, -1)[:, :2].reshape(-1)
  np.testing.assert_allclose(
    np.asarray(aux["expert_load"]), np.bincount(chosen, minlength=4) / chosen.size, rtol=1e-6
  )


def test_eval_mode_uses_eval_capacity_and_train_mode_restores_it():
  layer = make_layer(dispatch="sort", capacity_factor=0.5, eval_capacity_factor=4.0, min_capacity=1)
  x = inputs()
  _, train_aux = layer(x)
  layer.eval()
  _, eval_aux = layer(x)
  layer.train()
  _, again = layer(x)
  assert float(train_aux["dropped_fraction"]) > 0
  assert float(eval_aux["dropped_fraction"]) == 0
  assert float(again["dropped_fraction"]) == float(train_aux["dropped_fraction"])


@pytest.mark.parametrize(
  "setting",
  [
    dict(router="noisy_top_k"),
    dict(router_jitter=0.2),
    dict(second_expert_policy="random"),
    dict(expert_dropout=0.5),
  ],
)
def test_stochastic_options_act_in_training_only(setting):
  x = inputs()
  plain = make_layer(dispatch="dropless")
  layer = make_layer(dispatch="dropless", **setting)
  layer.router_kernel[...] = plain.router_kernel[...]
  nnx.update(layer.experts, nnx.state(plain.experts, nnx.Param))
  train_a, _ = layer(x)
  train_b, _ = layer(x)
  assert not np.allclose(np.asarray(train_a), np.asarray(train_b)), (
    "training draws fresh randomness"
  )
  layer.eval()
  eval_a, _ = layer(x)
  eval_b, _ = layer(x)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  plain.eval()
  # In eval mode the option has no effect at all: the output is the plain layer's.
  np.testing.assert_allclose(np.asarray(eval_a), np.asarray(plain(x)[0]), rtol=1e-6, atol=1e-7)


def test_noisy_top_k_initialises_its_kernels_to_zero():
  config = MoeConfig(num_experts=3, d_ff=4, router="noisy_top_k")
  layer = MoeLayer(config, d_model=8, rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(layer.router_kernel[...]))
  assert not np.any(np.asarray(layer.noise_kernel[...]))


def test_same_seed_same_layer_and_output():
  x = inputs()
  a = make_layer(rngs=nnx.Rngs(3), router_jitter=0.1)
  b = make_layer(rngs=nnx.Rngs(3), router_jitter=0.1)
  np.testing.assert_array_equal(np.asarray(a(x)[0]), np.asarray(b(x)[0]))


def test_bfloat16_compute_keeps_router_in_float32():
  layer = make_layer(dtype=jnp.bfloat16, dispatch="sort")
  x = inputs()
  y, aux = layer(x)
  expected, _ = run_reference(layer, x)
  assert y.dtype == x.dtype and aux["z_loss"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), expected, rtol=0.1, atol=0.05)


def test_layer_jits_and_differentiates_under_nnx_jit():
  layer = make_layer(dispatch="sort")

  @nnx.jit
  def step(layer, x):
    return nnx.grad(lambda m: jnp.mean(m(x)[0] ** 2))(layer)

  grads = step(layer, inputs())
  assert np.isfinite(np.asarray(grads.experts.w_in[...])).all()


# --------------------------------------------------------------------------- routing exposed


def test_the_layer_exposes_its_routing():
  layer = make_layer(dispatch="sort", capacity_factor=0.6, min_capacity=1)
  x = inputs()
  _, aux = layer(x)
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  probs = ref.softmax(tokens @ ref.layer_params(layer)["router"])
  routing = aux["routing"]
  np.testing.assert_allclose(np.asarray(routing["probs"]), probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
    np.asarray(routing["expert_indices"]), np.argsort(-probs, -1, kind="stable")[:, :2]
  )
  kept = np.asarray(routing["kept"])
  assert kept.shape == (20, 2) and 0 < kept.sum() < 40
  assert float(aux["dropped_fraction"]) == pytest.approx(1 - kept.mean())


def test_wrong_input_width_and_group_size_raise():
  with pytest.raises(ValueError, match="d_model=8"):
    make_layer()(jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="group_size=7"):
    make_layer(group_size=7)(inputs())


def test_an_einsum_mask_too_big_for_a_routing_group_names_group_size():
  """4096 tokens x 64 experts x capacity 80 = 21M mask elements > 2**24: refused."""
  config = MoeConfig(num_experts=64, d_ff=8, top_k=1, dispatch="einsum", group_size=4096)
  layer = MoeLayer(config, d_model=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^group_size=4096: einsum dispatch masks"):
    layer(jnp.zeros((1, 4096, 8)))
  config = MoeConfig(num_experts=64, d_ff=8, top_k=1, dispatch="einsum", group_size=2048)
  MoeLayer(config, d_model=8, rngs=nnx.Rngs(0))(jnp.zeros((1, 4096, 8)))  # 5M: fine
