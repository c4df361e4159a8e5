"""Tests of moejax.parallel: the mesh, shardings, and expert parallelism against one device.

The model tests compile one train step (loss and gradients) per (dispatch, mesh) and
check on it: the loss, the MoE metrics and every gradient equal the single-device ones;
the compiled HLO has all-to-alls (with an expert axis) of the expected size and no
all-gather of expert weights; the outputs carry the parameter shardings.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from moejax import parallel
from moejax.model import TransformerLM
from moejax.moe import MoeLayer

VOCAB, BATCH, SEQ, D_MODEL, E, K, D_FF = 260, 8, 16, 32, 8, 2, 32
GROUP = 16
LB_WEIGHT, Z_WEIGHT = 0.01, 1e-3
MESHES = [(1, 1), (8, 1), (2, 4), (1, 8), (4, 2)]
# Gradients: max |g - g_ref| / max |g_ref| per parameter (the sharded step sums over the
# batch in another order). Measured: about 1.5e-6 (sort) and 1e-6 (dropless).
GRAD_TOL = 1e-5


def model_config(dispatch: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      vocab_size=VOCAB,
      num_layers=2,
      d_model=D_MODEL,
      num_heads=4,
      num_kv_heads=2,
      head_dim=None,
      d_ff=64,
      activation="swiglu",
      num_experts=E,
      top_k=K,
      expert_d_ff=D_FF,
      moe_layer_interval=1,
      router="top_k",
      dispatch=dispatch,
      capacity_factor=1.25,
      eval_capacity_factor=2.0,
      min_capacity=1,
      renormalize=False,
      second_expert_policy="all",
      router_jitter=0.0,
      expert_dropout=0.0,
      num_shared_experts=0,
      group_size=None if dispatch == "dropless" else GROUP,
      dense_moe_hybrid=False,
      qk_norm=True,
      rope_base=10_000.0,
      tie_embeddings=False,
      dtype="float32",
    )
  )


def mesh_config(data, expert) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, expert=expert))


def make_mesh(data, expert):
  return parallel.make_mesh(mesh_config(data, expert), jax.devices()[: data * expert])


def batch_tokens():
  return jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, VOCAB, jnp.int32)


def split_model(dispatch):
  model = TransformerLM(model_config(dispatch), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def loss_and_grad_fn(graphdef):
  def loss_fn(params, rest, tokens):
    model = nnx.merge(graphdef, params, rest)
    logits, aux = model(tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))
    loss = ce + LB_WEIGHT * aux["lb_loss"] + Z_WEIGHT * aux["z_loss"]
    return loss, {k: aux[k] for k in ("lb_loss", "z_loss", "dropped_fraction")}

  return jax.value_and_grad(loss_fn, has_aux=True)


_REFERENCE = {}


def reference(dispatch):
  """Loss, metrics and gradients on one device, no mesh (computed once per dispatch)."""
  if dispatch not in _REFERENCE:
    graphdef, params, rest = split_model(dispatch)
    (loss, metrics), grads = jax.jit(loss_and_grad_fn(graphdef))(params, rest, batch_tokens())
    _REFERENCE[dispatch] = jax.device_get((loss, metrics, grads))
  return _REFERENCE[dispatch]


def flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


# ----------------------------------------------------------------------------- the equivalence


@pytest.mark.parametrize("dispatch", ["sort", "dropless"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_train_step_matches_one_device(dispatch, shape):
  data, expert = shape
  ref_loss, ref_metrics, ref_grads = reference(dispatch)
  graphdef, params, rest = split_model(dispatch)
  mesh = make_mesh(data, expert)
  param_sh, rest_sh = parallel.param_shardings(params, mesh), parallel.param_shardings(rest, mesh)
  replicated = parallel.replicated(mesh)
  step = jax.jit(
    loss_and_grad_fn(graphdef),
    in_shardings=(param_sh, rest_sh, parallel.batch_sharding(mesh)),
    out_shardings=((replicated, replicated), param_sh),
  )
  tokens = batch_tokens()
  with jax.set_mesh(mesh):
    compiled = step.lower(params, rest, tokens).compile()  # one compile
    (loss, metrics), grads = compiled(
      jax.device_put(params, param_sh),
      jax.device_put(rest, rest_sh),
      parallel.shard_batch(tokens, mesh),
    )

  # Same function: loss, metrics, gradients.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  if dispatch == "sort":
    assert ref_metrics["dropped_fraction"] > 0, "the capacity test should exercise dropping"
  got, want = flat(grads), flat(ref_grads)
  assert got.keys() == want.keys()
  for path, ref in want.items():
    scale = np.max(np.abs(ref))
    assert scale > 0, path
    err = np.max(np.abs(got[path] - ref)) / scale
    assert err < GRAD_TOL, f"{path}: gradient differs by {err:.2e} of its max"

  # Shardings: expert weights (and their gradients) are split over the expert axis.
  for path, sharding in flat_shardings(grads).items():
    expected = P("expert", None, None) if "experts" in path else P()
    assert normalize(sharding.spec) == normalize(expected), path
  w_in = grads["layers"][0]["moe"]["experts"]["w_in"][...]
  assert {s.data.shape for s in w_in.addressable_shards} == {(E // expert, D_MODEL, D_FF)}

  # The compiled HLO: all-to-alls of the expected size, no all-gather of expert weights.
  hlo = compiled.as_text()
  a2a = parallel.all_to_all_bytes(hlo)
  local_tokens = BATCH * SEQ // (data * expert)
  num_moe_layers, bytes_per = 2, 4
  if expert == 1:
    assert a2a == 0
  elif dispatch == "sort":
    # The minimum: 2 (dispatch, combine) x 2 (forward, backward) x k·cf·tokens·d per layer;
    # here capacity = cf·group·k/E exactly, so the buffers hold no rounding slack.
    capacity = math.ceil(1.25 * GROUP * K / E)
    assert capacity == 1.25 * GROUP * K / E
    assert a2a == num_moe_layers * 2 * 2 * K * 1.25 * local_tokens * D_MODEL * bytes_per
  else:
    # Static worst-case blocks: min(n, E/k) times the balanced exchange, plus expert ids.
    block = local_tokens * min(K, E // expert)
    rows = expert * block
    # Forward: rows out, their expert ids (int32), rows back; backward: two row exchanges.
    per_layer = 4 * rows * D_MODEL * bytes_per + rows * 4
    assert a2a == num_moe_layers * per_layer
    assert a2a >= min(expert, E // K) * num_moe_layers * 2 * 2 * K * local_tokens * D_MODEL * 4
  weight_elements = E // expert * D_MODEL * D_FF
  for dtype, dims in parallel.collective_shapes(hlo, "all-gather"):
    assert math.prod(dims) < weight_elements, f"all-gather of {dtype}{list(dims)}"


def normalize(spec):
  return tuple(spec) + (None,) * (3 - len(tuple(spec)))


def flat_shardings(grads):
  return {
    jax.tree_util.keystr(p): v.sharding for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]
  }


# ----------------------------------------------------------------------------- the layer


def make_layer(**kwargs):
  defaults = dict(
    d_model=16,
    d_ff=16,
    num_experts=8,
    top_k=2,
    group_size=8,
    min_capacity=1,
    capacity_factor=1.0,
    rngs=nnx.Rngs(0),
  )
  defaults.update(kwargs)
  layer = MoeLayer(**defaults)
  layer.router_kernel[...] = jax.random.normal(jax.random.key(7), layer.router_kernel.shape)
  return layer


def layer_loss(layer, x):
  y, aux = layer(x)
  return jnp.sum(jnp.sin(y)) + aux["lb_loss"] + aux["z_loss"], aux["dropped_fraction"]


def layer_value_and_grad(layer):
  """A (not yet jitted) function of (state, x) -> (loss, dropped fraction, grads), and the state."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def f(params, x):
    (value, dropped), grads = jax.value_and_grad(
      lambda p, x: layer_loss(nnx.merge(graphdef, p, rest), x), argnums=(0, 1), has_aux=True
    )(params, x)
    return value, dropped, grads

  return f, params


@pytest.mark.parametrize(
  "router,dispatch", [("top_k", "einsum"), ("expert_choice", "sort"), ("expert_choice", "einsum")]
)
def test_layer_dispatch_forms_match_under_expert_parallelism(router, dispatch):
  layer = make_layer(router=router, dispatch=dispatch, capacity_factor=0.5)
  x = jax.random.normal(jax.random.key(0), (8, 8, 16))  # 8 tokens (one group) per device
  step, state = layer_value_and_grad(layer)
  ref_value, ref_dropped, ref_grads = jax.jit(step)(state, x)
  assert 0 < ref_dropped < 1
  with jax.set_mesh(make_mesh(2, 4)):
    compiled = jax.jit(step).lower(state, x).compile()
    hlo = compiled.as_text()
    value, dropped, grads = compiled(state, x)
  assert "all-to-all" in hlo
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dropped, ref_dropped, rtol=1e-6)
  for path, ref in flat(ref_grads).items():
    np.testing.assert_allclose(
      flat(grads)[path], ref, rtol=1e-4, atol=1e-5 * np.max(np.abs(ref)), err_msg=path
    )


def test_explicit_mesh_attribute_turns_expert_parallelism_on_and_off():
  x = jax.random.normal(jax.random.key(0), (8, 8, 16))
  mesh = make_mesh(1, 8)
  layer = make_layer(dispatch="sort")
  ref, _ = layer(x)
  parallel.use_expert_parallel(layer, mesh)  # no ambient mesh needed
  fn = jax.jit(lambda x: layer(x)[0])
  assert "all-to-all" in fn.lower(x).compile().as_text()
  np.testing.assert_allclose(fn(x), ref, rtol=1e-5, atol=1e-6)
  parallel.use_expert_parallel(layer, None)  # never, even under a mesh
  with jax.set_mesh(mesh):
    assert "all-to-all" not in jax.jit(lambda x: layer(x)[0]).lower(x).compile().as_text()


def test_expert_dropout_runs_under_expert_parallelism():
  layer = make_layer(
    dispatch="dropless",
    group_size=None,
    expert_dropout=0.5,
    rngs=nnx.Rngs(params=0, dropout=1, router=2),
  )
  x = jax.random.normal(jax.random.key(0), (8, 4, 16))
  apply = nnx.jit(lambda m, x: m(x)[0])
  with jax.set_mesh(make_mesh(2, 4)):
    y1, y2 = apply(layer, x), apply(layer, x)
    layer.eval()
    y_eval = apply(layer, x)
  assert bool(jnp.all(jnp.isfinite(y1))) and not np.allclose(y1, y2)  # a fresh mask each call
  np.testing.assert_allclose(y_eval, apply(layer, x), rtol=1e-5, atol=1e-6)  # eval: no dropout


def test_layer_errors_under_expert_parallelism():
  x = jax.random.normal(jax.random.key(0), (8, 4, 16))  # 4 tokens per device on 2x4
  with jax.set_mesh(make_mesh(2, 4)):
    with pytest.raises(ValueError, match="needs group_size"):
      make_layer(dispatch="sort", group_size=None)(x)
    with pytest.raises(ValueError, match="multiple of group_size=8"):
      make_layer(dispatch="sort", group_size=8)(x)
    with pytest.raises(ValueError, match="do not split"):
      make_layer(dispatch="dropless", group_size=None)(x[:4, :1])


# ----------------------------------------------------------------------------- mesh


def test_make_mesh_layout_and_axis_types():
  mesh = parallel.make_mesh(mesh_config(-1, 4))
  assert mesh.axis_names == ("data", "expert")
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  devices = jax.devices()[::-1]
  mesh = parallel.make_mesh(mesh_config(2, -1), devices)
  assert [d.id for d in mesh.devices[0]] == [d.id for d in devices[:4]]  # expert innermost
  # Auto axes: a plain jit propagates input shardings; no type-level sharding.
  x = jax.device_put(jnp.ones((8, 4)), parallel.batch_sharding(mesh))
  assert x.sharding.spec == P(("data", "expert"))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: x.reshape(32) * 2)(x)
    assert jax.typeof(y).sharding.spec == P(None)  # Auto: not in the type


@pytest.mark.parametrize(
  "config,message",
  [
    (dict(data=2, expert=2), "multiply to 4, but there are 8 devices"),
    (dict(data=-1, expert=-1), "at most one axis may be -1"),
    (dict(data=3, expert=-1), "do not divide the 8 devices"),
    (dict(data=0, expert=8), "must be a positive int or -1"),
    (dict(data=1, expert=8, tensor=1), "unknown axes"),
  ],
)
def test_mesh_config_errors(config, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(ml_collections.ConfigDict(config))


def test_validate_mesh():
  mesh = parallel.make_mesh(mesh_config(2, 4))
  parallel.validate_mesh(mesh, num_experts=8, global_batch_size=16, seq_len=16, group_size=32)
  parallel.validate_mesh(mesh, num_experts=0, global_batch_size=8)  # dense: any expert axis
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the mesh's expert axis"):
    parallel.validate_mesh(mesh, num_experts=6, global_batch_size=16)
  with pytest.raises(ValueError, match="global batch size 12 is not divisible"):
    parallel.validate_mesh(mesh, num_experts=8, global_batch_size=12)
  with pytest.raises(ValueError, match="multiple of group_size=48"):
    parallel.validate_mesh(mesh, num_experts=8, global_batch_size=16, seq_len=16, group_size=48)


# ----------------------------------------------------------------------------- shardings


def test_param_shardings_names_every_param_and_follows_optimizer_state():
  model = TransformerLM(model_config("sort"), rngs=nnx.Rngs(0))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      assert var.get_metadata().get("out_sharding"), path
  mesh = parallel.make_mesh(mesh_config(2, 4))
  shardings = parallel.param_shardings(model, mesh)
  specs = {
    jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
  }
  assert specs["['layers'][0]['moe']['experts']['w_in'].value"] == P("expert", None, None)
  assert specs["['embed']['embedding'].value"] == P(None, None)
  assert specs["['layers'][1]['moe']['router_kernel'].value"] == P(None, None)
  assert sum(s == P("expert", None, None) for s in specs.values()) == 6
  assert all(s == P("expert", None, None) or all(a is None for a in s) for s in specs.values())

  # nnx.Optimizer copies the names to its state.
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  opt_specs = [
    (jax.tree_util.keystr(p), s.spec)
    for p, s in jax.tree_util.tree_flatten_with_path(
      parallel.param_shardings(nnx.state(optimizer), mesh)
    )[0]
  ]
  expert_specs = [s for p, s in opt_specs if "experts" in p]
  assert len(expert_specs) == 12 and all(s == P("expert", None, None) for s in expert_specs)

  # Raw optax state over pure arrays: matched to the parameters by path.
  params = nnx.state(model, nnx.Param)
  opt_state = optax.adamw(1e-3).init(nnx.to_pure_dict(params))
  opt_sh = parallel.tree_shardings(opt_state, mesh, params)
  leaves = jax.tree_util.tree_flatten_with_path(opt_sh)[0]
  assert len(leaves) == len(jax.tree.leaves(opt_state))
  for path, sharding in leaves:
    expected = P("expert", None, None) if "experts" in jax.tree_util.keystr(path) else P()
    assert normalize(sharding.spec) == normalize(expected), jax.tree_util.keystr(path)
  placed = jax.device_put(opt_state, opt_sh)
  assert jax.tree.leaves(placed)[0].sharding is not None


def test_param_shardings_rejects_unnamed_params_and_bad_shapes():
  mesh = parallel.make_mesh(mesh_config(1, 8))

  class Bare(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((3, 3)))

  with pytest.raises(ValueError, match="has no logical axis names"):
    parallel.param_shardings(Bare(), mesh)

  class Odd(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((6, 3)), **parallel.logical("expert", "embed"))

  with pytest.raises(ValueError, match="not divisible by mesh axes expert of size 8"):
    parallel.param_shardings(Odd(), mesh)
  assert parallel.logical_to_mesh(("batch", "embed"), mesh) == P(("data", "expert"), None)


# ----------------------------------------------------------------------------- HLO accounting


def test_all_to_all_bytes_of_a_known_program():
  mesh = jax.make_mesh((4,), ("expert",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])

  def body(a, b):
    return (
      jax.lax.all_to_all(a, "expert", 0, 0, tiled=True),
      jax.lax.all_to_all(b, "expert", 1, 0, tiled=True),
    )

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
  a = jnp.ones((4 * 8, 6), jnp.float32)  # per device f32[8, 6]: 192 bytes
  b = jnp.ones((4 * 4, 12), jnp.int32)  # per device s32[4, 12]: 192 bytes
  hlo = fn.lower(a, b).compile().as_text()  # (XLA:CPU would send bf16 as f32: not used here)
  assert parallel.all_to_all_bytes(hlo) == 8 * 6 * 4 + 4 * 12 * 4
  text = (
    "  %x = f32[2,3]{1,0} all-to-all(f32[2,3]{1,0} %p), dimensions={0}\n"
    "  %t = (bf16[4]{0}, s32[5]{0}) all-to-all(bf16[4]{0} %a, s32[5]{0} %b)\n"
    "  %g = f32[8]{0} all-gather(f32[2]{0} %p), dimensions={0}, metadata={op_name=\"all-to-all\"}\n"
  )
  assert parallel.all_to_all_bytes(text) == 24 + 8 + 20
  assert parallel.collective_shapes(text, "all-gather") == [("f32", (8,))]
