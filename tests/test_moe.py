"""MoeLayer against the NumPy reference loop, the dispatch paths against each other, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import moejax
from moejax import dispatch as dispatch_lib
from moejax.block_ffn import block_layout

import moe_reference as ref

D_MODEL, D_FF = 8, 12


def make_layer(**kwargs):
  defaults = dict(d_model=D_MODEL, d_ff=D_FF, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
  defaults.update(kwargs)
  layer = moejax.MoeLayer(**defaults)
  # Spread the router so that routing is decisive and drops happen at small capacity.
  layer.router_kernel[...] = jax.random.normal(jax.random.key(7), layer.router_kernel.shape)
  return layer


def inputs(batch=2, seq=10, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, seq, D_MODEL))


def run_reference(layer, x, *, dropless=False, group_size=None):
  params = ref.layer_params(layer)
  tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
  group = group_size or tokens.shape[0]
  cap = (
    None
    if dropless
    else ref.capacity(
      group, layer.num_experts, layer.top_k, layer.capacity_factor, layer.min_capacity
    )
  )
  y, dropped = ref.token_choice(
    tokens,
    params,
    num_experts=layer.num_experts,
    top_k=layer.top_k,
    activation=layer.experts.activation,
    renormalize=layer.renormalize,
    capacity_per_expert=cap,
    group_size=group_size,
  )
  return y.reshape(x.shape), dropped


@pytest.mark.parametrize("dispatch", ["auto", "einsum", "sort", "dropless"])
@pytest.mark.parametrize("activation", ["swiglu", "relu", "gelu", "geglu"])
def test_matches_reference_loop_with_drops(dispatch, activation):
  layer = make_layer(dispatch=dispatch, activation=activation, capacity_factor=0.6, min_capacity=1)
  x = inputs()
  y, aux = layer(x)
  expected, dropped = run_reference(layer, x, dropless=dispatch == "dropless")
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)
  if dispatch != "dropless":
    assert dropped > 0, "the test should exercise dropping"
  assert float(aux["dropped_fraction"]) == pytest.approx(dropped / (x.shape[0] * x.shape[1] * 2))


def test_auto_dispatch_keeps_capacity_and_picks_the_form_per_backend():
  assert [dispatch_lib.resolve_dispatch("auto", b) for b in ("cpu", "gpu", "tpu")] == [
    "sort",
    "sort",
    "einsum",
  ]
  for explicit in ("einsum", "sort", "dropless"):
    assert dispatch_lib.resolve_dispatch(explicit, "tpu") == explicit
  assert make_layer(dispatch="auto").dispatch == dispatch_lib.resolve_dispatch(
    "auto", jax.default_backend()
  )


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
  cap = ref.capacity(10, 4, 2, 1.0, layer.min_capacity)
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
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_all_dispatches_agree_in_gradient_without_drops():
  x = inputs()
  grads = {
    d: _loss_and_grads(make_layer(dispatch=d, capacity_factor=4.0), x)
    for d in ("einsum", "sort", "dropless")
  }
  for d in ("sort", "dropless"):
    np.testing.assert_allclose(float(grads[d][0]), float(grads["einsum"][0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[d][1]), jax.tree.leaves(grads["einsum"][1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_ragged_dot_path_matches_the_cpu_block_path():
  layer = make_layer(num_experts=5)
  rows = jax.random.normal(jax.random.key(3), (23, D_MODEL))
  sizes = jnp.array([7, 0, 9, 1, 4])  # 21 of 23 rows used: the last two belong to none
  weights, dropout = layer.experts.weights(), layer.experts.active_dropout()
  blocks = layer.experts._grouped_blocks(rows, sizes, weights, dropout)
  ragged = layer.experts._grouped_ragged(rows, sizes, weights, dropout)
  np.testing.assert_allclose(np.asarray(blocks), np.asarray(ragged), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(blocks[21:]), 0.0)


# --------------------------------------------------------------------------- properties


@settings(max_examples=10, deadline=None)
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


@settings(max_examples=25, deadline=None)
@given(assignments=st.integers(1, 60), num_experts=st.integers(1, 9), seed=st.integers(0, 1000))
def test_property_queue_positions_by_sort_equal_cumsum(assignments, num_experts, seed):
  rng = np.random.default_rng(seed)
  experts = rng.integers(0, num_experts, assignments)
  valid = rng.random(assignments) < 0.8
  _, by_sort, sizes = dispatch_lib.sort_by_expert(
    jnp.asarray(experts), jnp.asarray(valid), num_experts
  )
  by_cumsum = dispatch_lib.positions_by_cumsum(
    jnp.asarray(experts), jnp.asarray(valid), num_experts
  )
  # Hand count: the position is the number of earlier valid assignments to the same expert.
  expected = [np.sum((experts[:i] == experts[i]) & valid[:i]) for i in range(assignments)]
  np.testing.assert_array_equal(np.asarray(by_sort)[valid], np.asarray(expected)[valid])
  np.testing.assert_array_equal(np.asarray(by_cumsum)[valid], np.asarray(expected)[valid])
  np.testing.assert_array_equal(
    np.asarray(sizes), np.bincount(experts[valid], minlength=num_experts)
  )


@settings(max_examples=25, deadline=None)
@given(
  sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
  spare=st.integers(0, 5),
  block=st.sampled_from([8, 16]),
)
def test_property_block_layout_places_every_row_once(sizes, spare, block):
  rows = sum(sizes) + spare
  slot_row, block_expert, row_slot, used = block_layout(jnp.asarray(sizes), rows, block)
  slot_row, block_expert, row_slot = map(np.asarray, (slot_row, block_expert, row_slot))
  owner = np.repeat(np.arange(len(sizes)), sizes)
  for r in range(sum(sizes)):
    assert slot_row[row_slot[r]] == r
    assert block_expert[row_slot[r] // block] == owner[r]
  assert np.all(row_slot[sum(sizes) :] == len(slot_row))
  assert np.sum(slot_row < rows) == sum(sizes)
  assert int(used) == sum(-(-s // block) for s in sizes)  # blocks holding any row
  assert np.all(slot_row[int(used) * block :] == rows)  # every later slot is empty


@settings(max_examples=25, deadline=None)
@given(
  tokens=st.integers(1, 12),
  k=st.integers(1, 3),
  slots=st.integers(1, 30),
  seed=st.integers(0, 1000),
)
def test_property_take_rows_gradient_is_the_scatter_add_gradient(tokens, k, slots, seed):
  """`take_rows` with a token -> slots inverse map against autodiff of a plain gather."""
  rng = np.random.default_rng(seed)
  # A random partial injection of the tokens' k assignments into `slots` slots.
  wanted = rng.permutation(tokens * k)[:slots]
  slot_of = np.full(tokens * k, slots)
  slot_of[wanted] = np.arange(len(wanted))
  rng.shuffle(slot_of[:])
  token_slot = slot_of.reshape(tokens, k)
  slot_token = np.full(slots, tokens)
  for assignment, slot in enumerate(slot_of):
    if slot < slots:
      slot_token[slot] = assignment // k
  x = jnp.asarray(rng.normal(size=(tokens, 3)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(slots, 3)), jnp.float32)
  plain = lambda x: jnp.concatenate([x, jnp.zeros((1, 3))])[slot_token]
  ours = lambda x: dispatch_lib.take_rows(x, jnp.asarray(slot_token), jnp.asarray(token_slot))
  np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(plain(x)))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
  np.testing.assert_allclose(np.asarray(grad(ours)), np.asarray(grad(plain)), rtol=1e-6, atol=1e-6)
  inverse = np.asarray(dispatch_lib.inverse_slots(jnp.asarray(slot_of), slots))[:, 0]
  for slot in range(slots):  # hand check of the inverse map
    filled = np.flatnonzero(slot_of == slot)
    assert inverse[slot] == (filled[0] if len(filled) else tokens * k)


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
  layer = moejax.MoeLayer(d_model=8, d_ff=4, num_experts=3, router="noisy_top_k", rngs=nnx.Rngs(0))
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


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  "kwargs,needle",
  [
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(router="hash"), "router"),
    (dict(dispatch="scatter"), "dispatch"),
    (dict(activation="tanh"), "activation"),
    (dict(router="dense", top_k=2), "top_k=num_experts"),
    (dict(router="expert_choice", dispatch="dropless"), "dropless"),
    (dict(second_expert_policy="random", top_k=1), "second_expert_policy"),
    (dict(second_expert_policy="sometimes"), "second_expert_policy"),
    (dict(group_size=4, dispatch="dropless"), "group_size"),
  ],
)
def test_bad_settings_raise_one_clear_line(kwargs, needle):
  with pytest.raises(ValueError, match=needle) as info:
    make_layer(**kwargs)
  assert "\n" not in str(info.value)
  if "router" in kwargs and needle == "router":
    assert "top_k" in str(info.value) and "expert_choice" in str(info.value)


def test_wrong_input_width_and_group_size_raise():
  with pytest.raises(ValueError, match="d_model=8"):
    make_layer()(jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="group_size=7"):
    make_layer(group_size=7)(inputs())
