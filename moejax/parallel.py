"""Expert parallelism: the mesh, logical axis rules, shardings, and the `shard_map` all-to-all MoE.

The mesh
--------
`make_mesh(config.mesh)` builds a 2-D mesh `('data', 'expert')`, data outermost and expert
innermost: devices that exchange tokens every MoE layer (the all-to-all, the heavy
collective) are neighbours in device order (same host, same NVLink/ICI island), while the
data axis carries only the once-per-step gradient all-reduce. Both axes shard the batch
(GShard: in expert parallelism the expert axis is also a data axis); the expert axis
also shards the expert weights, so each device holds E/n of every MoE layer's experts and
a replica of everything else.

Axis types: the mesh axes are `AxisType.Auto` (not `jax.make_mesh`'s default
`Explicit`). Shardings are then given where they matter (jit `in_shardings`/
`out_shardings`, `jax.device_put`, the `shard_map` specs) and XLA propagates the rest;
the model code needs no sharding-in-types annotations (with Explicit axes, reshapes that
merge a sharded batch axis, scatters and top-k over sharded tokens would each need an
explicit `out_sharding`).

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

    mesh = parallel.make_mesh(config.mesh)
    parallel.validate_mesh(mesh, num_experts=E, global_batch_size=B, seq_len=L, group_size=g)
    graphdef, state = nnx.split(model)                 # or (model, optimizer) states
    state_sh = parallel.param_shardings(state, mesh)   # NamedShardings, same tree
    state = jax.device_put(state, state_sh)
    batch_sh = parallel.batch_sharding(mesh)           # tokens [batch, seq]
    step = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, parallel.replicated(mesh)))
    with jax.set_mesh(mesh):                           # turns expert parallelism on
      state, metrics = step(state, parallel.shard_batch(batch, mesh))

Expert parallelism is on for a `MoeLayer` when its mesh — the ambient one
(`jax.set_mesh`), or one set with `use_expert_parallel(model, mesh)` — has an `expert`
axis of size > 1; then its dispatch runs through `capacity_expert_parallel` or
`dropless_expert_parallel` below, inside `jax.shard_map`: each device routes and
dispatches its own tokens and reaches the experts by `all_to_all`. The routing groups
never depend on the mesh: with expert parallelism a device's token count must be a
multiple of `group_size`, so the sharded program computes the same function as the
single-device one. On a mesh with data axes only, the same per-device code runs with no
exchange whenever it computes the same function (always for dropless; for capacity when
each device holds whole groups); otherwise XLA partitions the single-device program.
Router logits, top-k (per device, `per_device`), the auxiliary losses and the metrics are
computed outside the `shard_map` over the global batch, exactly as on one device.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA, EXPERT = "data", "expert"
MESH_AXES = (DATA, EXPERT)  # outermost first
BATCH_AXES = (DATA, EXPERT)  # the mesh axes that shard the batch, in this order
AXIS_TYPES = (AxisType.Auto, AxisType.Auto)

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
)


def logical(*names: str | None) -> dict[str, Any]:
  """Variable metadata naming a parameter's logical axes: `nnx.Param(v, **logical('embed', 'mlp'))`.

  Eager sharding is off: the names are logical, and building a model needs no mesh.
  """
  return {"out_sharding": tuple(names), "eager_sharding": False}


# ----------------------------------------------------------------------------- the mesh


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """`{'data': d, 'expert': e}` from `config.mesh`, with a -1 resolved to the rest of the devices."""
  keys = set(mesh_config.keys()) if hasattr(mesh_config, "keys") else set()
  unknown = sorted(keys - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; supported axes: {MESH_AXES}.")
  sizes = {}
  for name in MESH_AXES:
    value = (
      mesh_config.get(name, 1) if hasattr(mesh_config, "get") else getattr(mesh_config, name, 1)
    )
    if (
      not isinstance(value, (int, np.integer))
      or isinstance(value, bool)
      or (value < 1 and value != -1)
    ):
      raise ValueError(f"config.mesh.{name}={value!r} must be a positive int or -1 (the rest).")
    sizes[name] = int(value)
  free = [name for name, value in sizes.items() if value == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {free}.")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh: the fixed axes (product {fixed}) do not divide the "
        f"{num_devices} devices, so {free[0]}=-1 has no size."
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f"config.mesh: axis sizes {sizes} multiply to {fixed}, but there are {num_devices} devices."
    )
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The `('data', 'expert')` mesh of `config.mesh` over `devices` (default: all), axes `Auto`.

  With `devices=None` the device order comes from `jax.make_mesh` (topology-aware);
  given devices are used in the order given, expert axis fastest.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=AXIS_TYPES)
  return jax.sharding.Mesh(
    np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=AXIS_TYPES
  )


def axis_size(mesh, name: str) -> int:
  """Size of mesh axis `name`, 1 if the mesh (a Mesh, AbstractMesh or None) lacks it."""
  if mesh is None:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1)


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
  spec, used = [], set()
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
        f"parameter {path} has no logical axis names (create it with `**parallel.logical(...)`)."
      )
    return NamedSharding(mesh, P())
  shape = getattr(value, "shape", ())
  if len(names) != len(shape):
    raise ValueError(f"{path}: logical axes {tuple(names)} do not match its shape {shape}.")
  spec = logical_to_mesh(names, mesh)
  for dim, axes in zip(shape, spec):
    size = math.prod(axis_size(mesh, a) for a in ((axes,) if isinstance(axes, str) else axes or ()))
    if dim % size:
      raise ValueError(
        f"{path}: dimension {dim} (axes {tuple(names)}) is not divisible by mesh "
        f"axes {axes} of size {size}."
      )
  return NamedSharding(mesh, spec)


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


# ----------------------------------------------------------------------------- turning EP on

AUTO = "auto"


def use_expert_parallel(model, mesh) -> None:
  """Sets the mesh of every `MoeLayer` in `model`: a Mesh, `'auto'` (the default: the
  ambient mesh of `jax.set_mesh`) or None (never expert-parallel, e.g. for decoding with
  a batch smaller than the mesh)."""
  for _, module in nnx.iter_graph(model):
    if hasattr(module, "expert_mesh") and isinstance(module, nnx.Module):
      module.expert_mesh = mesh


def layer_mesh(setting):
  """The mesh a MoE layer runs on (None: no mesh). `setting` as in `use_expert_parallel`."""
  if setting is None:
    return None
  mesh = (
    jax.sharding.get_abstract_mesh() if isinstance(setting, str) and setting == AUTO else setting
  )
  return mesh if mesh is not None and mesh.axis_names else None


def active_expert_mesh(setting):
  """The mesh a MoE layer runs expert-parallel on, or None. `setting` as in `use_expert_parallel`."""
  mesh = layer_mesh(setting)
  return mesh if axis_size(mesh, EXPERT) > 1 else None


def per_device(fn: Callable, mesh, *args):
  """`fn(*args)` on each device's share of the leading (token) axis of every arg and output.

  For per-token functions that XLA's partitioner would otherwise gather (top-k is one: it
  all-gathers a batch-sharded operand). Without a mesh, with one batch shard, or with a
  token count the shards don't divide, it is plain `fn(*args)`.
  """
  shards = num_batch_shards(mesh) if mesh is not None else 1
  rows = jax.tree.leaves(args)[0].shape[0]
  if shards == 1 or rows % shards:
    return fn(*args)
  batch = P(batch_axes(mesh))
  return jax.shard_map(fn, mesh=mesh, in_specs=(batch,) * len(args), out_specs=batch)(*args)


def local_token_count(mesh, num_tokens: int) -> int:
  """Tokens per device when `num_tokens` are sharded over the batch axes (error if uneven)."""
  shards = num_batch_shards(mesh)
  if num_tokens % shards:
    raise ValueError(
      f"expert parallelism: {num_tokens} tokens (batch·seq) do not split over "
      f"the batch-sharding mesh axes {batch_axes(mesh)} (product {shards})."
    )
  return num_tokens // shards


def _device_dropout(dropout: nnx.Dropout, key, mesh):
  """Expert dropout inside `shard_map`: a key folded with the device's position, or None."""
  if key is None:
    return None
  index = jnp.int32(0)
  for name in batch_axes(mesh):
    index = index * axis_size(mesh, name) + jax.lax.axis_index(name)
  device_key = jax.random.fold_in(key, index)
  return lambda h: dropout(h, rngs=device_key)


def dropout_key(experts) -> jax.Array | None:
  """A fresh key for expert dropout, or None when it is off (rate 0 or deterministic)."""
  dropout = experts.dropout
  if dropout.rate == 0.0 or dropout.deterministic:
    return None
  return dropout.rngs()


# ----------------------------------------------------------------------------- capacity EP


def capacity_expert_parallel(
  mesh, body: Callable, tokens: jax.Array, route, experts, key: jax.Array | None = None
):
  """Runs a capacity-dispatch MoE with the experts sharded over the `expert` mesh axis (if any).

  Each device runs `body` on its own tokens (a whole number of routing groups):
  `body(tokens [t, d], route (leaves [t, ...]), expert_fn) -> (out [t, d], stats [t, ...])`,
  where `body` routes its groups, builds buffers `[groups, E, C, d]`, and calls
  `expert_fn(buffers) -> [groups, E, C, d]`. Here `expert_fn` is: all-to-all over the
  expert axis (each device receives, from every device, the slots of its E/n experts:
  `[n·groups, E/n, C, d]`), the local experts (`Experts.apply_batched`), and the all-to-all
  back. Expert weights stay sharded (`P('expert')`); gradients flow through the shard_map.

  Args:
    mesh: a Mesh or AbstractMesh with an `expert` axis.
    tokens: `[tokens, d_model]`, sharded over the batch axes.
    route: a pytree of `[tokens, ...]` routing arrays (same sharding).
    experts: the `moejax.experts.Experts` module (its weights are read here).
    key: expert-dropout key or None.
  """
  n = axis_size(mesh, EXPERT)
  weights = experts.weights()
  batch = P(batch_axes(mesh))
  # n = 1 (data axes only): every device runs all experts on its own groups, no exchange.
  exchange = lambda a, split, concat: (
    jax.lax.all_to_all(a, EXPERT, split, concat, tiled=True) if n > 1 else a
  )

  def shard_body(tokens, route, weights, key):
    dropout = _device_dropout(experts.dropout, key, mesh)

    def expert_fn(buffers):
      groups, num_experts, capacity, d = buffers.shape
      local = num_experts // n
      received = exchange(buffers, 1, 0)  # [n·G, E/n, C, d]
      x = jnp.transpose(received, (1, 0, 2, 3)).reshape(local, n * groups * capacity, d)
      y = experts.apply_batched(x, weights, dropout)
      y = jnp.transpose(y.reshape(local, n * groups, capacity, d), (1, 0, 2, 3))
      return exchange(y, 0, 1)  # [G, E, C, d]

    return body(tokens, route, expert_fn)

  expert_spec = P(EXPERT) if n > 1 else P()
  fn = jax.shard_map(
    shard_body, mesh=mesh, in_specs=(batch, batch, expert_spec, P()), out_specs=batch
  )
  return fn(tokens, route, weights, key)


# ----------------------------------------------------------------------------- dropless EP


def dropless_expert_parallel(
  mesh, tokens: jax.Array, choice, experts, key: jax.Array | None = None
) -> jax.Array:
  """Dropless token-choice MoE with the experts sharded over the `expert` mesh axis (if any).

  Every device sorts its own assignments by expert and sends each expert-device a
  fixed-size block of B = t·min(k, E/n) rows (t its tokens) — the most one device's
  tokens can ever send to one device, since a token picks an expert at most once — so no
  assignment is dropped, whatever the routing. Padding rows are zero and marked. After
  the all-to-all each device sorts the n·B received rows by local expert, runs a grouped
  matmul, and sends the rows back; each token sums its gated rows. The exchange moves
  min(n, E/k) times the bytes of a balanced exchange: the price of static shapes.
  (`jax.lax.ragged_all_to_all` would move only the real rows into the same worst-case
  receive buffer, but XLA:CPU does not implement it.)

  Args:
    mesh: a Mesh or AbstractMesh with an `expert` axis.
    tokens: `[tokens, d_model]`, sharded over the batch axes.
    choice: `TokenChoice` with `[tokens, k]` fields (same sharding).
    experts: the `Experts` module.
    key: expert-dropout key or None.

  Returns:
    `[tokens, d_model]` in the experts' compute dtype.
  """
  from moejax import dispatch as dispatch_lib  # parallel is imported by moe: keep it light.

  n = axis_size(mesh, EXPERT)
  num_experts = experts.num_experts
  local = num_experts // n
  weights = experts.weights()
  batch = P(batch_axes(mesh))
  # With no expert axis (n = 1) the exchange is the identity and every device runs all
  # experts on its own tokens: dropless is per token, so data parallelism needs no
  # communication at all.
  exchange = (lambda a: jax.lax.all_to_all(a, EXPERT, 0, 0, tiled=True)) if n > 1 else (lambda a: a)

  def shard_body(x, choice, weights, key):
    dropout = _device_dropout(experts.dropout, key, mesh)
    t, d = x.shape
    k = choice.expert_indices.shape[1]
    block = t * min(k, local)
    expert_of, gates, valid, token_of = dispatch_lib.assignment_lists(choice)  # [t·k]
    order, positions, counts = dispatch_lib.sort_by_expert(expert_of, valid, num_experts)
    starts = jnp.cumsum(counts) - counts
    dest = expert_of // local
    rank = starts[expert_of] + positions - starts[dest * local]
    slot = jnp.where(valid, dest * block + rank, n * block)  # [t·k]
    assignments = expert_of.shape[0]
    slot_assignment = (
      jnp.full((n * block,), assignments, jnp.int32)
      .at[slot]
      .set(jnp.arange(assignments, dtype=jnp.int32), mode="drop")
    )
    rows = jnp.concatenate([x.astype(experts.dtype), jnp.zeros((1, d), experts.dtype)])
    token_padded = jnp.concatenate([token_of, jnp.array([t], jnp.int32)])
    send = rows[token_padded[slot_assignment]]  # [n·B, d]
    send_expert = (
      jnp.full((n * block,), local, jnp.int32).at[slot].set(expert_of % local, mode="drop")
    )

    received = exchange(send.reshape(n, block, d))
    received_expert = exchange(send_expert.reshape(n, block))
    received, received_expert = received.reshape(n * block, d), received_expert.reshape(-1)
    local_order = jnp.argsort(received_expert, stable=True)
    group_sizes = jnp.zeros((local + 1,), jnp.int32).at[received_expert].add(1)[:local]
    y = experts.apply_grouped(received[local_order], group_sizes, weights, dropout)
    y = jnp.zeros_like(y).at[local_order].set(y)
    back = exchange(y.reshape(n, block, d))

    back = jnp.concatenate([back.reshape(n * block, d), jnp.zeros((1, d), back.dtype)])
    out_rows = back[slot]  # [t·k, d]
    weight = jnp.where(valid, gates, 0.0).astype(out_rows.dtype)
    # Added in expert order, as the single-device `dispatch.dropless` does.
    return (
      jnp.zeros((t, d), out_rows.dtype)
      .at[token_of[order]]
      .add(out_rows[order] * weight[order][:, None])
    )

  expert_spec = P(EXPERT) if n > 1 else P()
  fn = jax.shard_map(
    shard_body, mesh=mesh, in_specs=(batch, batch, expert_spec, P()), out_specs=batch
  )
  return fn(tokens, choice, weights, key)


# ----------------------------------------------------------------------------- HLO accounting

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 1,
  "u4": 1,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def collective_shapes(hlo_text: str, opcode: str) -> list[tuple[str, tuple[int, ...]]]:
  """`(dtype, dims)` of the result arrays of every `opcode` op (e.g. 'all-to-all',
  'all-gather') in HLO text; a tuple-shaped result lists each element. `-start` forms
  of async collectives are included, `-done` forms are not."""
  pattern = re.compile(r"=\s+(\([^()]*\)|[^\s(]+)\s+" + re.escape(opcode) + r"(?:-start)?\(")
  shapes = []
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if match:
      for dtype, dims in _SHAPE.findall(match.group(1)):
        shapes.append((dtype, tuple(int(v) for v in dims.split(",") if v)))
  return shapes


def all_to_all_bytes(hlo_text: str) -> int:
  """Bytes of all all-to-all results in (per-device, compiled) HLO text.

  An all-to-all's result has the size of its input: each device sends that many bytes
  (1/n of which it keeps). Summed over the ops of a train step it is the all-to-all
  traffic per device per step, to set against the minimum for capacity dispatch,
  2 (dispatch, combine) · 2 (forward, backward) · k · capacity_factor · tokens · d_model
  · bytes per element per MoE layer, tokens being a device's tokens.
  """
  total = 0
  for dtype, dims in collective_shapes(hlo_text, "all-to-all"):
    if dtype not in _DTYPE_BYTES:
      raise ValueError(f"unknown HLO element type {dtype!r} in an all-to-all.")
    total += _DTYPE_BYTES[dtype] * math.prod(dims)
  return total
