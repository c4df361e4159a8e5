"""The mesh, its validation, and the shardings of parameters and optimizer state (`moejax.parallel.sharding`)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from moejax.config import load_config
from moejax.models.transformer import TransformerLM
from moejax.parallel import sharding


def mesh_config(data, expert) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, expert=expert))


def normalize(spec):
  return tuple(spec) + (None,) * (4 - len(tuple(spec)))


def model_config():
  """The smoke model: 2 MoE layers of 8 experts, QK-norm."""
  return load_config("configs/tiny.py:smoke", {"model.qk_norm": "head"}).model


# ----------------------------------------------------------------------------- mesh


def test_make_mesh_layout_and_axis_types():
  mesh = sharding.make_mesh(mesh_config(-1, 4))
  assert mesh.axis_names == ("data", "fsdp", "expert")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  devices = jax.devices()[::-1]
  mesh = sharding.make_mesh(mesh_config(2, -1), devices, keep_order=True)
  assert [d.id for d in mesh.devices[0, 0]] == [d.id for d in devices[:4]]  # expert innermost
  # Auto axes: a plain jit propagates input shardings; no type-level sharding.
  x = jax.device_put(jnp.ones((8, 4)), sharding.batch_sharding(mesh))
  assert x.sharding.spec == P(("data", "fsdp", "expert"))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: x.reshape(32) * 2)(x)
    assert jax.typeof(y).sharding.spec == P(None)  # Auto: not in the type


@pytest.mark.parametrize(
  "config,message",
  [
    (dict(data=2, expert=2), "multiply to 4, but there are 8 devices"),
    (dict(data=-1, expert=-1), "at most one of"),
    (dict(data=3, expert=-1), "do not divide the 8 devices"),
    (dict(data=0, expert=8), "must be a positive int or -1"),
    (dict(data=1, expert=8, tensor=1), "unknown keys"),
    (dict(data=1, expert=8, dcn_data=2), "multiply to 2, but there are 1 slices"),
    (dict(data=2, fsdp=2, expert=4), "multiply to 16, but there are 8 devices"),
  ],
)
def test_mesh_config_errors(config, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(ml_collections.ConfigDict(config))


def test_slices_multiply_the_data_and_fsdp_axes():
  """Within a slice `data`, `fsdp`, `expert`; across slices `dcn_data`, `dcn_fsdp` (the
  expert axis never leaves a slice)."""
  config = ml_collections.ConfigDict(dict(data=-1, fsdp=2, expert=4, dcn_fsdp=2))
  within, across = sharding.slice_shapes(config, 64, num_slices=4)
  assert within == {"data": 2, "fsdp": 2, "expert": 4}
  assert across == {"data": 2, "fsdp": 2, "expert": 1}
  assert sharding.mesh_shape(config, 64, num_slices=4) == {"data": 4, "fsdp": 4, "expert": 4}
  with pytest.raises(ValueError, match="must be a positive divisor of the 8 devices"):
    sharding.slice_shapes(config, 8, num_slices=3)


def test_slices_must_be_there():
  """One process of CPU devices is one slice: asking for two is one line."""
  with pytest.raises(ValueError, match="num_slices=2, but the 8 devices form 1 slice"):
    sharding.make_mesh(mesh_config(-1, 4), num_slices=2)


def test_mesh_platform_is_the_devices_platform():
  assert sharding.mesh_platform(sharding.make_mesh(mesh_config(2, 4))) == "cpu"
  assert sharding.mesh_platform(None) == jax.devices()[0].platform


def test_validate_mesh():
  mesh = sharding.make_mesh(mesh_config(2, 4))
  sharding.validate_mesh(mesh, num_experts=8, global_batch_size=16, seq_len=16, group_size=32)
  sharding.validate_mesh(mesh, num_experts=0, global_batch_size=8)  # dense: any expert axis
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the mesh's expert axis"):
    sharding.validate_mesh(mesh, num_experts=6, global_batch_size=16)
  with pytest.raises(ValueError, match="global batch size 12 is not divisible"):
    sharding.validate_mesh(mesh, num_experts=8, global_batch_size=12)
  with pytest.raises(ValueError, match="multiple of group_size=48"):
    sharding.validate_mesh(mesh, num_experts=8, global_batch_size=16, seq_len=16, group_size=48)


# ----------------------------------------------------------------------------- shardings


def test_param_shardings_names_every_param_and_follows_optimizer_state():
  model = TransformerLM(model_config(), rngs=nnx.Rngs(0))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      assert var.get_metadata().get("out_sharding"), path
  mesh = sharding.make_mesh(mesh_config(2, 4))
  shardings = sharding.param_shardings(model, mesh)
  specs = {
    jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
  }
  # The 2 MoE layers are one scanned stack: weights [layers, ...], the layers axis whole.
  moe = "['stacks'][0]['period']['blocks'][0]['moe']"
  expert_spec = P(None, "expert", None, None)
  assert specs[moe + "['experts']['w_in'].value"] == expert_spec
  # Every other parameter is ZeRO-sharded over the expert axis too (fsdp is 1 here), on
  # its largest dimension that 4 divides: the vocabulary of 260, the router's d_model.
  assert specs["['embed']['embedding'].value"] == P("expert", None)
  assert specs[moe + "['router_kernel'].value"] == P(None, "expert", None)
  assert sum(s == expert_spec for s in specs.values()) == 3
  params = {p: s for p, s in specs.items() if "rng" not in p}  # RNG state is replicated
  assert all(s == expert_spec or list(s).count("expert") == 1 for s in params.values())

  # nnx.Optimizer copies the names to its state.
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  opt_specs = [
    (jax.tree_util.keystr(p), s.spec)
    for p, s in jax.tree_util.tree_flatten_with_path(
      sharding.param_shardings(nnx.state(optimizer), mesh)
    )[0]
  ]
  expert_specs = [s for p, s in opt_specs if "experts" in p]
  assert len(expert_specs) == 6 and all(s == expert_spec for s in expert_specs)

  # Raw optax state over pure arrays: matched to the parameters by path.
  params = nnx.state(model, nnx.Param)
  opt_state = optax.adamw(1e-3).init(nnx.to_pure_dict(params))
  opt_sh = sharding.tree_shardings(opt_state, mesh, params)
  leaves = jax.tree_util.tree_flatten_with_path(opt_sh)[0]
  assert len(leaves) == len(jax.tree.leaves(opt_state))
  by_suffix = {p.replace(".value", ""): s for p, s in specs.items()}
  for path, leaf_sharding in leaves:
    name = jax.tree_util.keystr(path)
    param = [s for p, s in by_suffix.items() if name.endswith(p)]
    expected = param[0] if param else P()  # the step counts: replicated
    assert normalize(leaf_sharding.spec) == normalize(expected), name
  placed = jax.device_put(opt_state, opt_sh)
  assert jax.tree.leaves(placed)[0].sharding is not None


def test_param_shardings_rejects_unnamed_params_and_bad_shapes():
  mesh = sharding.make_mesh(mesh_config(1, 8))

  class Bare(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((3, 3)))

  with pytest.raises(ValueError, match="has no logical axis names"):
    sharding.param_shardings(Bare(), mesh)

  class Odd(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((6, 3)), **sharding.logical("expert", "embed"))

  with pytest.raises(ValueError, match="not divisible by mesh axes expert of size 8"):
    sharding.param_shardings(Odd(), mesh)
  assert sharding.logical_to_mesh(("batch", "embed"), mesh) == P(("data", "fsdp", "expert"), None)


def test_fsdp_takes_the_largest_free_divisible_dimension():
  with_fsdp = sharding.with_fsdp
  zero = lambda fsdp, expert=1: {"fsdp": fsdp, "expert": expert}
  # Experts already on the expert axis: fsdp takes the larger of the other two.
  assert with_fsdp(
    P("expert", None, None), ("expert", "embed", "mlp"), (8, 32, 64), zero(4, 8)
  ) == P("expert", None, "fsdp")
  assert with_fsdp(P(None, None), ("vocab", "embed"), (260, 32), zero(4)) == P("fsdp", None)
  assert with_fsdp(P(None, None), ("vocab", "embed"), (260, 32), zero(8)) == P(
    None, "fsdp"
  )  # 260 % 8
  assert with_fsdp(P(None, None, None), ("layers", "embed", "mlp"), (64, 4, 4), zero(8)) == P(
    None, None, None
  )  # the stacked-layers axis is never sharded; nothing else divides
  assert with_fsdp(P(None), ("embed",), (32,), zero(1)) == P(None)
  # A non-expert weight: fsdp and expert together on one dimension (ZeRO over both) ...
  assert with_fsdp(P(None, None), ("embed", "mlp"), (32, 64), zero(2, 4)) == P(
    None, ("fsdp", "expert")
  )
  assert with_fsdp(P(None), ("embed",), (32,), zero(1, 8)) == P("expert")
  # ... else the first alone that divides a dimension: 12 % 8, 12 % 2 == 0; then expert.
  assert with_fsdp(P(None), ("embed",), (12,), zero(2, 4)) == P("fsdp")
  assert with_fsdp(P(None), ("embed",), (12,), zero(8, 4)) == P("expert")


@pytest.mark.parametrize(
  "name", ["deepseek_v3", "deepseek_v2_lite", "qwen2_moe", "arctic", "glam", "switch_base"]
)
def test_every_parameter_of_every_family_has_a_sharding(name):
  """Every logical axis a config's parameters name has a rule (on an fsdp 8 mesh)."""
  from moejax.training.steps import build

  config = load_config(f"configs/{name}.py:smoke", {"mesh.fsdp": 8, "mesh.data": 1})
  mesh = sharding.make_mesh(config.mesh)
  _, abstract = nnx.split(nnx.eval_shape(lambda: build(config, mesh)[:2]))
  sharding.param_shardings(abstract, mesh)
