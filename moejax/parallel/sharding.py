"""The mesh, the logical axis rules and the shardings of parameters, optimizer state and batches.

The mesh
--------
`make_mesh(config.mesh)` builds a 3-D mesh `('data', 'fsdp', 'expert')`, data outermost
and expert innermost: devices that exchange tokens every MoE layer (the all-to-all) are
neighbours in device order (same host, same NVLink/ICI island), while the data axis
carries only the once-per-step gradient all-reduce. Every axis shards the batch (GShard:
in expert parallelism the expert axis is also a data axis). The expert axis also shards
the expert weights, so each device holds E/n of every MoE layer's experts. The fsdp axis
and the expert axis together shard every parameter that is not an expert weight, and its
optimizer state, along the parameter's largest dimension that no other axis shards and that they divide (ZeRO-3,
Rajbhandari et al. 2020; PyTorch FSDP; MaxText puts its expert axis in the dense layers'
sharding the same way): XLA gathers a weight where a layer uses it and reduce-scatters
its gradient, so the memory of non-expert parameters and their optimizer state falls as
1/(fsdp · expert), and no gradient is all-reduced across the expert axis. Expert weights
hold `expert` on their expert dimension and `fsdp` on their largest other one. The data
axis stays pure data parallelism: it carries only the gradient reduction, the traffic
that can cross slices.

Axis types: the mesh axes are `AxisType.Auto` (not `jax.make_mesh`'s default
`Explicit`). Shardings are given where they matter (jit `in_shardings`/`out_shardings`,
`jax.device_put`, the `shard_map` specs) and XLA propagates the rest; the model code
needs no sharding-in-types annotations.

The mesh is a value: the model is built with it (`TransformerLM(config, mesh=mesh)`), and
its MoE layers run expert-parallel on it (`moejax.moe.expert_parallel`). Nothing reads an
ambient mesh. The same model built without a mesh is the single-device program.

Logical axes
------------
Every parameter carries logical axis names in its Flax NNX metadata (`out_sharding`, set
with `logical(...)` where the parameter is created, with `eager_sharding=False` so that
building a model never needs a mesh). `LOGICAL_AXIS_RULES` — the one table here — maps
logical names to mesh axes. Metadata rather than a table of parameter paths: the names
sit beside the parameter they describe (a new parameter cannot silently miss a rule;
`param_shardings` rejects a parameter without names), and `nnx.Optimizer` copies them to
its state, so optimizer state follows the parameters with the same call. For pytrees
that lost the metadata (raw optax state over pure arrays), `tree_shardings` matches
leaves to parameters by path suffix and shape.

How a train step uses this::

    mesh = sharding.make_mesh(config.mesh)
    sharding.validate_mesh(mesh, num_experts=E, global_batch_size=B)
    model = TransformerLM(config.model, mesh=mesh, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)                 # or (model, optimizer) states
    state_sh = sharding.param_shardings(state, mesh)   # NamedShardings, same tree
    state = jax.device_put(state, state_sh)
    step = jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)))
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, EXPERT = "data", "fsdp", "expert"
MESH_AXES = (DATA, FSDP, EXPERT)  # outermost first
BATCH_AXES = (DATA, FSDP, EXPERT)  # the mesh axes that shard the batch, in this order
ZERO_AXES = (FSDP, EXPERT)  # the mesh axes that shard parameters and optimizer state
AXIS_TYPES = (AxisType.Auto,) * len(MESH_AXES)

# The one table from logical axis names to mesh axes (None = replicated). Mesh axes that a
# mesh lacks are dropped.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", BATCH_AXES),  # activations: [batch, ...]
  ("expert", EXPERT),  # stacked expert weights [expert, ...]
  ("vocab", None),
  ("embed", None),
  ("mlp", None),
  ("heads", None),  # q / o projections, heads·head_dim
  ("kv_heads", None),  # k / v projections, kv_heads·head_dim
  ("head_dim", None),  # QK-norm scales
  ("q_lora", None),  # MLA's query latent
  ("kv_lora", None),  # MLA's key-value latent
  ("layers", None),  # the stacked axis of scanned layers: never sharded
)


def logical(*names: str | None) -> dict[str, Any]:
  """Variable metadata naming a parameter's logical axes: `nnx.Param(v, **logical('embed', 'mlp'))`.

  Eager sharding is off: the names are logical, and building a model needs no mesh.
  """
  return {"out_sharding": tuple(names), "eager_sharding": False}


# ----------------------------------------------------------------------------- the mesh


# Across slices (over the data-center network, DCN) only `data` and `fsdp` may be split:
# the gradient reduction and the weight gathers can wait on DCN once per layer or step,
# the expert all-to-all of every MoE layer cannot.
DCN_KEYS = {DATA: "dcn_data", FSDP: "dcn_fsdp"}


def _config_value(mesh_config, key: str, default: int):
  if hasattr(mesh_config, "get"):
    return mesh_config.get(key, default)
  return getattr(mesh_config, key, default)


def _resolve(sizes: dict[str, Any], total: int, what: str) -> dict[str, int]:
  """`sizes` (`{config key: int or -1}`) with their product checked against `total`
  `what`s, a -1 resolved to the rest."""
  for key, value in sizes.items():
    if (
      not isinstance(value, (int, np.integer))
      or isinstance(value, bool)
      or (value < 1 and value != -1)
    ):
      raise ValueError(f"config.mesh.{key}={value!r} must be a positive int or -1 (the rest).")
  sizes = {key: int(value) for key, value in sizes.items()}
  free = [key for key, value in sizes.items() if value == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one of {tuple(sizes)} may be -1, got {free}.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if total % fixed:
      raise ValueError(
        f"config.mesh: the fixed sizes of {tuple(sizes)} (product {fixed}) do not divide "
        f"the {total} {what}, so {free[0]}=-1 has no size."
      )
    sizes[free[0]] = total // fixed
  elif fixed != total:
    raise ValueError(f"config.mesh: {sizes} multiply to {fixed}, but there are {total} {what}.")
  return sizes


def slice_shapes(
  mesh_config, num_devices: int, num_slices: int = 1
) -> tuple[dict[str, int], dict[str, int]]:
  """(the mesh within a slice, `{'data': d, 'fsdp': f, 'expert': e}` over its
  `num_devices / num_slices` devices; the split across slices, the same axes with
  `expert` 1) from `config.mesh`: `data`, `fsdp`, `expert` within a slice, `dcn_data`
  (default -1) and `dcn_fsdp` (default 1) across slices. A -1 takes the rest."""
  known = set(MESH_AXES) | set(DCN_KEYS.values())
  unknown = sorted(set(mesh_config.keys() if hasattr(mesh_config, "keys") else ()) - known)
  if unknown:
    raise ValueError(f"config.mesh has unknown keys {unknown}; supported: {sorted(known)}.")
  if num_slices < 1 or num_devices % num_slices:
    raise ValueError(
      f"hardware.num_slices={num_slices} must be a positive divisor of the {num_devices} devices."
    )
  across = {
    key: _config_value(mesh_config, key, -1 if axis == DATA else 1)
    for axis, key in DCN_KEYS.items()
  }
  across = _resolve(across, num_slices, "slices (hardware.num_slices)")
  within = _resolve(
    {axis: _config_value(mesh_config, axis, 1) for axis in MESH_AXES},
    num_devices // num_slices,
    "devices" if num_slices == 1 else "devices per slice",
  )
  dcn = {axis: across[DCN_KEYS[axis]] if axis in DCN_KEYS else 1 for axis in MESH_AXES}
  return within, dcn


def mesh_shape(mesh_config, num_devices: int, num_slices: int = 1) -> dict[str, int]:
  """`{'data': d, 'fsdp': f, 'expert': e}`, each axis's whole size (within a slice times
  across slices, `slice_shapes`), from `config.mesh` over `num_devices` devices."""
  within, across = slice_shapes(mesh_config, num_devices, num_slices)
  return {axis: within[axis] * across[axis] for axis in MESH_AXES}


def make_mesh(
  mesh_config,
  devices: Sequence[jax.Device] | None = None,
  *,
  keep_order: bool = False,
  num_slices: int = 1,
) -> jax.sharding.Mesh:
  """The `('data', 'fsdp', 'expert')` mesh of `config.mesh` over `devices` (default: all),
  axes `Auto`.

  The device order comes from `jax.make_mesh` (topology-aware: on TPU the innermost axes
  get the nearest chips; an axis size that is no product of whole torus dimensions, such
  as 8 on a 4x4x4 slice, splits one); with `keep_order` the devices are used in the order given,
  expert axis fastest.

  With `num_slices` > 1 (`hardware.num_slices`) the mesh is a hybrid one
  (`mesh_utils.create_hybrid_device_mesh`): each slice holds the `data`, `fsdp`, `expert`
  sizes of `config.mesh`, and `dcn_data` and `dcn_fsdp` stack slices along `data` and
  `fsdp`. A slice is a TPU slice (`device.slice_index`) or, on devices without one (CPU,
  GPU hosts), a process: its host's devices, the network between the hosts being the DCN.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_slices > 1:
    return _hybrid_mesh(mesh_config, devices, num_slices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  if not keep_order:
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=AXIS_TYPES, devices=devices)
    except NotImplementedError:  # an axis that is no product of whole torus dimensions
      from jax.experimental import mesh_utils

      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return jax.sharding.Mesh(grid, MESH_AXES, axis_types=AXIS_TYPES)
  return jax.sharding.Mesh(
    np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=AXIS_TYPES
  )


def slice_of(device: jax.Device) -> int:
  """The slice `device` belongs to: its TPU slice, or else its process (`make_mesh`)."""
  return device.slice_index if device.platform == "tpu" else device.process_index


def _hybrid_mesh(mesh_config, devices: list, num_slices: int) -> jax.sharding.Mesh:
  from jax.experimental import mesh_utils

  within, across = slice_shapes(mesh_config, len(devices), num_slices)
  found = len({slice_of(d) for d in devices})
  if found != num_slices:
    raise ValueError(
      f"hardware.num_slices={num_slices}, but the {len(devices)} devices form {found} "
      "slice(s) (TPU slices; elsewhere one per process)."
    )
  grid = mesh_utils.create_hybrid_device_mesh(
    tuple(within[a] for a in MESH_AXES),
    tuple(across[a] for a in MESH_AXES),
    devices,
    process_is_granule=devices[0].platform != "tpu",
    allow_split_physical_axes=True,
  )
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=AXIS_TYPES)


def axis_size(mesh, name: str) -> int:
  """Size of mesh axis `name`, 1 if the mesh (a Mesh, AbstractMesh or None) lacks it."""
  if mesh is None:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)).get(name, 1)


def mesh_platform(mesh) -> str:
  """The platform ('cpu', 'gpu', 'tpu') of `mesh`'s devices, or of this process's default
  devices when `mesh` is None: what the MoE forms are chosen for, once, when a model is
  built. A mesh over TPU devices from `jax.experimental.topologies` is 'tpu' on any host."""
  if mesh is None or not hasattr(mesh, "devices"):
    return jax.devices()[0].platform
  return np.asarray(mesh.devices).flat[0].platform


def varying_axes(x) -> frozenset:
  """The manual mesh axes along which `x` differs between devices inside `jax.shard_map`
  (empty outside)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, "manual_axis_type", None)
  return frozenset(axis_type.varying if axis_type is not None else getattr(aval, "vma", ()))


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes that shard the batch (data, then expert), those the mesh has."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def num_batch_shards(mesh) -> int:
  return math.prod(axis_size(mesh, a) for a in batch_axes(mesh))


def validate_mesh(
  mesh,
  *,
  num_experts: int,
  global_batch_size: int,
  seq_len: int | None = None,
  group_size: int | None = None,
) -> None:
  """One-line ValueErrors for a mesh that cannot run this model and batch.

  Checks that the expert axis divides `num_experts` (0 = dense: any size), that the
  batch-sharding axes divide `global_batch_size`, and, given `seq_len` and `group_size`,
  that every device's tokens (batch/shards · seq_len) are whole routing groups.
  """
  experts = axis_size(mesh, EXPERT)
  if num_experts and num_experts % experts:
    raise ValueError(
      f"num_experts={num_experts} is not divisible by the mesh's expert axis ({experts})."
    )
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the "
      f"batch-sharding mesh axes {batch_axes(mesh)} (product {shards})."
    )
  if seq_len is not None and group_size is not None and experts > 1 and num_experts:
    local_tokens = global_batch_size // shards * seq_len
    if local_tokens % group_size:
      raise ValueError(
        f"with expert parallelism each device's {local_tokens} tokens "
        f"(batch {global_batch_size}/{shards} x seq {seq_len}) must be a "
        f"multiple of group_size={group_size}."
      )


# ----------------------------------------------------------------------------- shardings


def logical_to_mesh(names: Sequence[str | None], mesh, rules=LOGICAL_AXIS_RULES) -> P:
  """The PartitionSpec of logical axis `names` under `rules`, keeping the mesh axes `mesh` has."""
  table = dict(rules)
  spec: list[str | tuple[str, ...] | None] = []
  used: set[str] = set()
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES.")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh.axis_names)
    if used & set(axes):
      raise ValueError(
        f"logical axes {tuple(names)} map mesh axis {sorted(used & set(axes))} twice."
      )
    used |= set(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def _variable_sharding(var: nnx.Variable, mesh, path: str, require_names: bool) -> NamedSharding:
  value = var.get_value()
  names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
  if not names:
    if require_names and isinstance(var, nnx.Param):
      raise ValueError(
        f"parameter {path} has no logical axis names (create it with `**sharding.logical(...)`)."
      )
    return NamedSharding(mesh, P())
  shape = getattr(value, "shape", ())
  if len(names) != len(shape):
    raise ValueError(f"{path}: logical axes {tuple(names)} do not match its shape {shape}.")
  zero = {a: axis_size(mesh, a) for a in ZERO_AXES}
  spec = with_fsdp(logical_to_mesh(names, mesh), names, shape, zero)
  for dim, axes in zip(shape, spec, strict=True):
    size = math.prod(axis_size(mesh, a) for a in ((axes,) if isinstance(axes, str) else axes or ()))
    if dim % size:
      raise ValueError(
        f"{path}: dimension {dim} (axes {tuple(names)}) is not divisible by mesh "
        f"axes {axes} of size {size}."
      )
  return NamedSharding(mesh, spec)


def with_fsdp(spec: P, names, shape, zero_axes: dict[str, int]) -> P:
  """`spec` with the ZeRO axes on the largest dimension that `spec` leaves unsharded, that
  is not a stacked-layers axis, and that they divide (ties: the first).

  `zero_axes` are `{axis: size}` in `ZERO_AXES` order; those of size 1 and those `spec`
  already uses are left out (expert weights keep `expert` on their expert dimension).
  The rest shard one dimension together when some dimension divides by their product,
  else the first alone that does (fsdp before expert); the parameter stays whole when
  none does.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in ((e,) if isinstance(e, str) else e or ())}
  axes = [a for a, size in zero_axes.items() if size > 1 and a not in used]
  free = lambda n: [
    i
    for i, (dim, entry, name) in enumerate(zip(shape, entries, names, strict=True))
    if entry is None and name != "layers" and dim % n == 0
  ]
  choices = ([tuple(axes)] if len(axes) > 1 else []) + [(a,) for a in axes]
  for choice in choices:
    dims = free(math.prod(zero_axes[a] for a in choice))
    if dims:
      entries[max(dims, key=lambda i: (shape[i], -i))] = choice[0] if len(choice) == 1 else choice
      break
  return P(*entries)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path)


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def param_shardings(model_or_state, mesh, *, require_names: bool = True):
  """NamedShardings for an NNX state: the same tree, each Variable's value replaced by its sharding.

  Accepts a Module (uses `nnx.state(module)`), an `nnx.State`, or any pytree holding
  `nnx.Variable`s (e.g. `nnx.state(optimizer)`, whose optimizer state carries the
  parameters' names). A Variable's logical names (metadata `out_sharding`) are mapped by
  `LOGICAL_AXIS_RULES`; Variables without names (RNG keys, counters, step) and plain
  arrays are replicated. With `require_names` an `nnx.Param` without names is an error.
  The result works as `jax.jit` `in_shardings`/`out_shardings` and for `jax.device_put`.
  """
  tree = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

  def one(path, x):
    if isinstance(x, nnx.Variable) and not hasattr(x.get_value(), "shape"):
      return x  # no array: optax's placeholder for another partition's leaf (Muon)
    if isinstance(x, nnx.Variable):
      return x.replace(_variable_sharding(x, mesh, _path_str(path), require_names))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _leaf_keys(path) -> tuple[str, ...]:
  keys = tuple(_key_str(k) for k in path)
  while keys and keys[-1] in ("value", "raw_value", "_raw_value"):
    keys = keys[:-1]
  return keys


def tree_shardings(tree, mesh, params):
  """Shardings for any pytree whose leaves mirror parameters (e.g. raw optax state).

  A leaf gets the sharding of the parameter (from `params`: a Module or state holding
  `nnx.Param`s) whose path is the longest suffix of the leaf's path and whose shape
  matches; other leaves (counts, scalars) are replicated. Returns a tree of
  NamedShardings with `tree`'s structure (plain leaves, no Variables).
  """
  state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
  flat, _ = jax.tree_util.tree_flatten_with_path(
    param_shardings(state, mesh, require_names=False),
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  shapes = {_leaf_keys(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  for path, sharding in flat:
    keys = _leaf_keys(path)
    by_path[keys] = (shapes.get(keys), sharding)

  def one(path, leaf):
    keys = _leaf_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == np.shape(leaf):
        return hit[1]
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Sharding of a batch array `[batch, ...]`: the batch over the data and expert axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def on_batch_axes(x: jax.Array, mesh) -> jax.Array:
  """`x` `[batch, ...]` held sharded over the batch axes only (unchanged without a mesh).

  Where a ZeRO-sharded weight meets the activations (the embedding lookup, the logits),
  XLA could otherwise shard the result like the weight (the logits over the vocabulary)
  and reshard it by all-to-all; pinned, the weight is gathered instead, as FSDP means."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def shard_batch(batch, mesh):
  """Puts every `[batch, ...]` leaf of `batch` on the mesh with `batch_sharding`.

  In one process `batch` is the global batch; with several processes each passes its
  own rows (`jax.make_array_from_process_local_data`).
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
