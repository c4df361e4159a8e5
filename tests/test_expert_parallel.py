"""Expert parallelism against one device: the same model, loss, metrics and gradients on 5
meshes, and the all-to-alls the compiled step holds (the dropless exchange's bookkeeping
is in `test_dropless_exchange.py`).

The model tests compile one train step (loss and gradients) per (dispatch, mesh) and
check on it: the loss, the MoE metrics and every gradient equal the single-device ones;
the compiled HLO has all-to-alls (with an expert axis) of the expected size and no
all-gather of expert weights; the outputs carry the parameter shardings. The model is
built with its mesh; nothing reads an ambient mesh.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from moejax.config import load_config
from moejax.models.transformer import TransformerLM
from moejax.moe import MoeConfig, MoeLayer
from moejax.parallel import hlo, sharding
from moejax.training import steps

VOCAB, BATCH, SEQ, D_MODEL, E, K, D_FF = 260, 8, 16, 32, 8, 2, 32
GROUP = 16
LB_WEIGHT, Z_WEIGHT = 0.01, 1e-3
MESHES = [(1, 1), (8, 1), (2, 4), (1, 8), (4, 2)]
# Without an expert axis no row is exchanged: those meshes run once, on 'sort'.
CASES = [
  (dispatch, shape)
  for shape in MESHES
  for dispatch in ("sort", "dropless", "deepseek")
  if shape[1] > 1 or dispatch == "sort"
]
# Gradients: max |g - g_ref| / max |g_ref| per parameter (the sharded step sums over the
# batch in another order). Measured: about 1.5e-6 (sort) and 1e-6 (dropless).
GRAD_TOL = 1e-5


# The DeepSeek-V3 router on dropless dispatch: sigmoid scores, a selection bias (set to
# values that change the choices), group-limited top-2 (4 groups of 2, the best 2 groups),
# normalised gates scaled by 2.5.
DEEPSEEK = {
  "model.score_fn": "sigmoid",
  "model.renormalize": True,
  "model.routed_scaling_factor": 2.5,
  "model.bias_update_rate": 0.01,
  "model.num_expert_groups": 4,
  "model.topk_groups": 2,
}


def model_config(dispatch: str) -> ml_collections.ConfigDict:
  """2 MoE layers of 8 experts (hidden 32), top-2, d_model 32, GQA 4/2 heads, QK-norm;
  `dispatch` 'sort', 'dropless', or 'deepseek' (dropless with the `DEEPSEEK` router)."""
  router = DEEPSEEK if dispatch == "deepseek" else {}
  dispatch = "dropless" if dispatch == "deepseek" else dispatch
  overrides = {
    **router,
    "model.d_model": D_MODEL,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.d_ff": 64,
    "model.num_experts": E,
    "model.top_k": K,
    "model.expert_d_ff": D_FF,
    "model.qk_norm": "head",
    "model.scan_layers": True,  # the loop over layers (tiny.py unrolls it)
    "model.dispatch": dispatch,
    "model.min_capacity": 1,
    "model.group_size": None if dispatch == "dropless" else GROUP,
    # A round receives a device's own rows: the skewed routers below need several rounds
    # on every expert-parallel mesh, and dropless must still drop nothing.
    "model.dropless_buffer_factor": 1.0,
    "model.router_bias": router is not DEEPSEEK and dispatch == "dropless",
  }
  config = load_config("configs/tiny.py:smoke", overrides).model
  assert (config.vocab_size, config.num_layers, config.moe_layer_interval) == (VOCAB, 2, 1)
  return config


def mesh_config(data, expert, fsdp=1) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, expert=expert))


def make_mesh(data, expert, fsdp=1):
  return sharding.make_mesh(
    mesh_config(data, expert, fsdp), jax.devices()[: data * fsdp * expert], keep_order=True
  )


def batch_tokens():
  return jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, VOCAB, jnp.int32)


def split_model(dispatch, mesh=None):
  """The test model; dropless routers are skewed on purpose: most tokens choose expert 0
  first (a router bias of 3 on its logit, or DeepSeek's selection bias of 1)."""
  model = TransformerLM(model_config(dispatch), mesh=mesh, rngs=nnx.Rngs(0))
  moe = model.stacks[0].period.blocks[0].moe
  if moe.selection_bias is not None:  # [layers, E], the same on every mesh
    bias = jnp.linspace(-0.2, 0.2, 2 * E).reshape(2, E)[:, ::-1]
    moe.selection_bias[...] = bias.at[:, 0].set(1.0)
  if moe.router_bias is not None:
    moe.router_bias[...] = jnp.zeros((2, E)).at[:, 0].set(3.0)
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


@pytest.mark.parametrize(
  "dispatch,shape", CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c))
)
def test_sharded_train_step_matches_one_device(dispatch, shape):
  data, expert = shape
  ref_loss, ref_metrics, ref_grads = reference(dispatch)
  mesh = make_mesh(data, expert)
  graphdef, params, rest = split_model(dispatch, mesh)
  param_sh, rest_sh = sharding.param_shardings(params, mesh), sharding.param_shardings(rest, mesh)
  replicated = sharding.replicated(mesh)
  step = jax.jit(
    loss_and_grad_fn(graphdef),
    in_shardings=(param_sh, rest_sh, sharding.batch_sharding(mesh)),
    out_shardings=((replicated, replicated), param_sh),
  )
  tokens = batch_tokens()
  compiled = step.lower(params, rest, tokens).compile()  # one compile, no ambient mesh
  (loss, metrics), grads = compiled(
    jax.device_put(params, param_sh),
    jax.device_put(rest, rest_sh),
    sharding.shard_batch(tokens, mesh),
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
  for path, grad_sharding in flat_shardings(grads).items():
    # Weights of the 2 scanned MoE layers: [layers, experts, ...], the layers axis whole;
    # every other parameter ZeRO-sharded over the expert axis (all its dimensions here
    # divide by 8 but the vocabulary's 260).
    if "experts" in path:
      assert normalize(grad_sharding.spec) == normalize(P(None, "expert", None, None)), path
    else:
      assert mesh_axes(grad_sharding.spec) == ({"expert"} if expert > 1 else set()), path
  w_in = grads["stacks"][0]["period"]["blocks"][0]["moe"]["experts"]["w_in"][...]
  assert {s.data.shape for s in w_in.addressable_shards} == {(2, E // expert, D_MODEL, D_FF)}

  # The compiled HLO: all-to-alls of the expected size, no all-gather of expert weights.
  hlo_text = compiled.as_text()
  a2a = moe_all_to_all_bytes(hlo_text)
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
    # Static blocks: the most one device sends another in a round (a round's buffer is
    # the factor 1.0 times a device's own k·tokens rows).
    most = local_tokens * min(K, E // expert)
    buffer = min(K * local_tokens, expert * most)
    rows = expert * min(most, buffer)
    # Round 0: rows out and results back, forward; the same two the other way, backward.
    # The later rounds' loop (held once in the HLO) when a stream can outgrow a buffer:
    # two forward; rows, their cotangents, and the rows' cotangents back in the backward.
    # (The experts of each received row follow from the all-gathered per-expert counts.)
    exchanges = 4 + (5 if buffer < expert * most else 0)
    assert a2a == num_moe_layers * exchanges * rows * D_MODEL * bytes_per
    assert a2a >= min(expert, E // K) * num_moe_layers * 2 * 2 * K * local_tokens * D_MODEL * 4
  # Non-expert weights are gathered where they are used (ZeRO over the expert axis);
  # expert weights ([.., experts, d_model, d_ff], any number of experts) never are.
  for dtype, dims in hlo.collective_shapes(hlo_text, "all-gather"):
    expert_like = len(dims) >= 3 and dims[-2:] == (D_MODEL, D_FF) and dims[-3] in (E, E // expert)
    assert not expert_like, f"all-gather of {dtype}{list(dims)}"


def moe_all_to_all_bytes(hlo_text: str) -> int:
  """The all-to-all bytes of the MoE exchanges (the ones inside `shard_map`). The others
  reshard the embedding lookup of a table ZeRO-sharded over the expert axis on d_model
  (when the vocabulary does not divide): XLA's choice, activations-sized."""
  lines = hlo_text.splitlines()
  kept = [x for x in lines if "all-to-all(" not in x or "shard_map" in x]
  return hlo.all_to_all_bytes("\n".join(kept))


def sharded_step(dispatch, mesh):
  """The loss-and-gradient step of the test model built with `mesh`, compiled once and run
  on the test batch: (compiled, (loss, metrics), grads)."""
  graphdef, params, rest = split_model(dispatch, mesh)
  param_sh, rest_sh = sharding.param_shardings(params, mesh), sharding.param_shardings(rest, mesh)
  replicated = sharding.replicated(mesh)
  step = jax.jit(
    loss_and_grad_fn(graphdef),
    in_shardings=(param_sh, rest_sh, sharding.batch_sharding(mesh)),
    out_shardings=((replicated, replicated), param_sh),
  )
  compiled = step.lower(params, rest, batch_tokens()).compile()
  outputs = compiled(
    jax.device_put(params, param_sh),
    jax.device_put(rest, rest_sh),
    sharding.shard_batch(batch_tokens(), mesh),
  )
  return compiled, *outputs


# (data, fsdp, expert): FSDP alone, FSDP beside expert parallelism, all three axes.
FSDP_MESHES = [(1, 8, 1), (1, 2, 4), (2, 2, 2)]


@pytest.mark.parametrize("dispatch", ["sort", "dropless"])
@pytest.mark.parametrize("shape", FSDP_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_fsdp_train_step_matches_one_device(dispatch, shape):
  data, fsdp, expert = shape
  ref_loss, ref_metrics, ref_grads = reference(dispatch)
  compiled, (loss, metrics), grads = sharded_step(dispatch, make_mesh(data, expert, fsdp))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
  got = flat(grads)
  for path, ref in flat(ref_grads).items():
    err = np.max(np.abs(got[path] - ref)) / np.max(np.abs(ref))
    assert err < GRAD_TOL, f"{path}: gradient differs by {err:.2e} of its max"
  # Every parameter (and so its gradient) is split fsdp ways on some dimension; expert
  # weights keep the expert axis on their first dimension.
  for path, grad_sharding in flat_shardings(grads).items():
    spec = normalize(grad_sharding.spec)
    assert "fsdp" in mesh_axes(spec), path
    assert (spec[1] == "expert") == ("experts" in path), path
    # ZeRO over fsdp and expert together: non-expert parameters use both axes.
    assert ("expert" in mesh_axes(spec)) == (expert > 1 or "experts" in path), path
  assert "all-gather" in compiled.as_text()  # each weight gathered where a layer uses it


def test_fsdp_divides_parameter_and_optimizer_memory(fast_compile):
  """Per-device argument bytes of the compiled train step (parameters, Adam moments, the
  batch), read from XLA's memory analysis, fall as 1/n with the fsdp axis."""
  per_device = {}
  for n in (1, 2, 4, 8):
    config = load_config("configs/tiny.py:smoke", {"mesh.data": 1, "mesh.fsdp": n})
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:n], keep_order=True)
    graphdef, state, state_sh = steps.init_state(config, mesh)
    step, _ = steps.make_steps(graphdef, config.model)
    batch = jax.ShapeDtypeStruct(
      (config.train.batch_size, config.train.seq_len),
      jnp.int32,
      sharding=sharding.batch_sharding(mesh),
    )
    compiled = (
      jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)))
      .lower(state, {"inputs": batch, "targets": batch})
      .compile()
    )
    per_device[n] = compiled.memory_analysis().argument_size_in_bytes
  for n in (2, 4, 8):
    assert per_device[1] / n <= per_device[n] <= 1.05 * per_device[1] / n, (n, per_device)


def mesh_axes(spec) -> set:
  """The mesh axes a PartitionSpec uses, on any dimension."""
  return {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}


def normalize(spec):
  return tuple(spec) + (None,) * (4 - len(tuple(spec)))


def flat_shardings(grads):
  return {
    jax.tree_util.keystr(p): v.sharding for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]
  }


# ----------------------------------------------------------------------------- the layer


def make_layer(*, mesh=None, rngs=None, **overrides):
  defaults = dict(
    num_experts=8, d_ff=16, top_k=2, group_size=8, min_capacity=1, capacity_factor=1.0
  )
  config = MoeConfig(**{**defaults, **overrides})
  layer = MoeLayer(config, d_model=16, mesh=mesh, rngs=rngs or nnx.Rngs(0))
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
  x = jax.random.normal(jax.random.key(0), (8, 8, 16))  # 8 tokens (one group) per device
  step, state = layer_value_and_grad(
    make_layer(router=router, dispatch=dispatch, capacity_factor=0.5)
  )
  ref_value, ref_dropped, ref_grads = jax.jit(step)(state, x)
  assert 0 < ref_dropped < 1
  layer = make_layer(router=router, dispatch=dispatch, capacity_factor=0.5, mesh=make_mesh(2, 4))
  step, state = layer_value_and_grad(layer)
  compiled = jax.jit(step).lower(state, x).compile()
  value, dropped, grads = compiled(state, x)
  assert "all-to-all" in compiled.as_text()
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(dropped, ref_dropped, rtol=1e-6)
  for path, ref in flat(ref_grads).items():
    np.testing.assert_allclose(
      flat(grads)[path], ref, rtol=1e-4, atol=1e-5 * np.max(np.abs(ref)), err_msg=path
    )


def test_the_mesh_a_layer_is_built_with_decides_expert_parallelism():
  x = jax.random.normal(jax.random.key(0), (8, 8, 16))
  mesh = make_mesh(1, 8)
  single = make_layer(dispatch="sort")
  ref, _ = single(x)
  sharded = make_layer(dispatch="sort", mesh=mesh)
  fn = jax.jit(lambda x: sharded(x)[0])
  assert "all-to-all" in fn.lower(x).compile().as_text()
  np.testing.assert_allclose(fn(x), ref, rtol=1e-5, atol=1e-6)
  with jax.set_mesh(mesh):  # an ambient mesh changes nothing: the layer has none
    assert "all-to-all" not in jax.jit(lambda x: single(x)[0]).lower(x).compile().as_text()


def test_layer_errors_under_expert_parallelism():
  x = jax.random.normal(jax.random.key(0), (8, 4, 16))  # 4 tokens per device on 2x4
  mesh = make_mesh(2, 4)
  with pytest.raises(ValueError, match="multiple of group_size=8"):
    make_layer(dispatch="sort", group_size=8, mesh=mesh)(x)
  with pytest.raises(ValueError, match="do not split"):
    make_layer(dispatch="dropless", group_size=None, mesh=mesh)(x[:4, :1])
  # The default routing group is one sequence: whole on every device, on any mesh.
  ref, _ = make_layer(dispatch="sort", group_size=None)(x)
  y, _ = make_layer(dispatch="sort", group_size=None, mesh=mesh)(x)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
