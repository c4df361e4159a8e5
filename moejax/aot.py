"""Compile the training step for TPU slices on any host, and say whether it fits.

`python -m moejax.aot --config=configs/NAME.py:pod [--topology=v5p-128] [--num_slices=N]
[--json=PATH] [--config.KEY=VALUE ...]`

With the `libtpu` wheel (`pip install -e '.[tpu]'`), `get_topology_desc` gives the
devices of N slices of a topology, and the train step (`jit_train_step`, what
`moejax.main` runs) is lowered and compiled for them from abstract shapes: nothing is
allocated, no TPU is needed. XLA reports per device the bytes of arguments, outputs and
temporaries (`memory_analysis()`), its FLOPs (`cost_analysis()`, a loop's body once:
reported, not used) and the collectives (`moejax.parallel.hlo.collectives`: loops as
often as they run; dropless's later exchange rounds, run only under a skewed router,
apart in `collectives_per_extra_round`; between slices, `dcn-*`). The slice is named as
gcloud does (`v5p-128`) or as a topology (`v5p:4x4x4`), by default the config's
`hardware.topology`; its numbers are the chip's published ones (`tpu_slices.CHIPS`).

The roofline bounds the step time from below by the largest of: the compute time at
peak bf16 (the model's FLOPs plus the matmuls the remat policy recomputes, counted from
the traced step against the same step keeping everything, `moejax.parallel.program_flops`;
shared evenly by the devices), the collectives' bytes at half the chip's bidirectional
ICI bandwidth, and across slices the bytes sent between them at its DCN bandwidth, as if
nothing overlapped. The MFU it implies, the model FLOPs (`moejax.models.flops`) over that
time at peak, is an upper bound on what the slices could reach with this program.

Exit codes: 0 compiled (fits or not: `fits` says), 2 a wrong command or no libtpu, 1 a
failed compile.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

# Compiling for a TPU from a host without one: no metadata server to ask, CPU for the
# rest, and no lock on libtpu (it holds one per host, for the process that drives the
# chips; compiling needs none, and tests compile from several processes at once).
for _key, _value in (
  ("JAX_PLATFORMS", "cpu"),
  ("TPU_ACCELERATOR_TYPE", "none"),
  ("TPU_WORKER_HOSTNAMES", "localhost"),
  ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
):
  os.environ.setdefault(_key, _value)

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax import data as data_lib
from moejax.models import flops
from moejax.parallel import hlo, program_flops, sharding
from moejax.parallel.tpu_slices import CHIPS, num_chips, parse_slice, slice_devices
from moejax.training.run_plan import check_mesh, make_run_mesh
from moejax.training.steps import build, make_steps
from moejax.training.train import jit_train_step, no_nonfinite_tally

GIB = 2**30


def abstract_train_inputs(config: ml_collections.ConfigDict, mesh):
  """(graphdef, state shardings, the train step's arguments as shardings-carrying
  `jax.ShapeDtypeStruct`s): what `jit_train_step` is lowered with, nothing allocated.
  The batch is a token store's (`data_lib.batch_keys`): with document masking, the
  program masks attention per document, as a pod run on real text does."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(config, mesh)[:2]))
  shardings = sharding.param_shardings(abstract, mesh)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  replicated, by_batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  tally = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
    for k, v in no_nonfinite_tally().items()
  }
  tokens = (config.train.batch_size, config.train.seq_len)
  batch = {
    key: jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=by_batch)
    for key in data_lib.batch_keys(config.data)
  }
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  return graphdef, shardings, (state, tally, batch, step)


def slice_mesh(config: ml_collections.ConfigDict, devices) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices`, checked against the model and batch (a
  one-line ValueError when it does not fit them, without `make_run_mesh`'s list of the
  sizes that would: the planner, trying candidates, records why each one failed)."""
  return check_mesh(
    sharding.make_mesh(config.mesh, devices, num_slices=config.hardware.num_slices), config
  )


def trace_train_step(config: ml_collections.ConfigDict, mesh) -> jax.stages.Traced:
  """The train step of `config` on `mesh`, traced from abstract inputs (not lowered)."""
  graphdef, shardings, arguments = abstract_train_inputs(config, mesh)
  train_step, _ = make_steps(graphdef, config.model)
  return jit_train_step(train_step, mesh, shardings).trace(*arguments)


def recomputed_flops(config: ml_collections.ConfigDict, mesh, matmul_flops: float) -> float:
  """The matmul FLOPs per step that `config.model.remat` recomputes: the step's count
  (`matmul_flops`) less that of the same step keeping everything (`remat='none'`, traced
  only). The grouped expert matmuls count their whole buffers, so a policy that
  recomputes a dropless FFN is charged its padding too."""
  if config.model.remat == "none":
    return 0.0
  stored = config.copy_and_resolve_references()
  stored.model.remat = "none"
  return matmul_flops - program_flops.matmul_flops(trace_train_step(stored, mesh).jaxpr)


def compile_train_step(config: ml_collections.ConfigDict, mesh) -> tuple[Any, dict]:
  """Lowers and compiles the train step of `config` on `mesh`.

  Returns (compiled, `{'lower_seconds', 'compile_seconds', 'matmul_flops'}`), the last
  the step's matmul FLOPs over all devices, counted from its jaxpr
  (`moejax.parallel.program_flops`). The model is built on that
  mesh, so its MoE forms are the ones for the devices' platform (a TPU mesh gets the TPU
  program on any host). XLA:TPU refuses to compile a program whose temporaries exceed
  HBM: `OutOfMemory` then says how much it needed.
  """
  start = time.perf_counter()
  traced = trace_train_step(config, mesh)
  matmul_flops = program_flops.matmul_flops(traced.jaxpr)
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    needed = _TEMPORARIES_NEEDED.search(str(error))
    if "RESOURCE_EXHAUSTED" not in str(error) or not needed:
      raise
    raise OutOfMemory(float(needed.group(1)) * GIB, time.perf_counter() - lowered_at) from None
  timings = {
    "lower_seconds": lowered_at - start,
    "compile_seconds": time.perf_counter() - lowered_at,
    "matmul_flops": matmul_flops,
  }
  return compiled, timings


# XLA:TPU's message: "the total memory required for HLO temporaries (106.82G) exceeds ...".
_TEMPORARIES_NEEDED = re.compile(r"HLO temporaries \(([0-9.]+)G\)")


class OutOfMemory(Exception):
  """The compiler found that the step's temporaries alone exceed a device's HBM."""

  def __init__(self, temporaries_bytes: float, compile_seconds: float):
    super().__init__(f"the step's temporaries need {temporaries_bytes / GIB:.1f} GiB per device")
    self.temporaries_bytes, self.compile_seconds = int(temporaries_bytes), compile_seconds


def state_bytes_per_device(config: ml_collections.ConfigDict, mesh) -> dict[str, int]:
  """`{'params', 'optimizer'}`: the bytes of the model's parameters and of the optimizer
  state that one device holds in the train state's shardings on `mesh` (None: all of it)."""
  _, abstract = nnx.split(nnx.eval_shape(lambda: build(config, mesh)[:2]))
  is_variable = lambda x: isinstance(x, nnx.Variable)
  leaves = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_variable)[0]
  shardings = [None] * len(leaves)
  if mesh is not None:
    shardings = jax.tree.leaves(sharding.param_shardings(abstract, mesh), is_leaf=is_variable)
  # Muon's optimizer state holds placeholders (no array) for the other partition's leaves.
  kept = [
    (leaf, s)
    for leaf, s in zip(leaves, shardings, strict=True)
    if hasattr(leaf[1].get_value(), "shape")
  ]
  leaves = [leaf for leaf, _ in kept]
  shard_shapes = [
    v.shape if s is None else s.get_value().shard_shape(v.shape) for (_, v), s in kept
  ]
  totals = {"params": 0, "optimizer": 0}
  for (path, variable), shape in zip(leaves, shard_shapes, strict=True):
    which = (
      "optimizer" if path[0].key == 1 else "params" if isinstance(variable, nnx.Param) else None
    )
    if which is not None:  # RNG streams and counters (a few bytes) are left out
      totals[which] += math.prod(shape) * jnp.dtype(variable.dtype).itemsize
  return totals


def model_flops_per_step(config: ml_collections.ConfigDict) -> float:
  """Training FLOPs of one step by the model's arithmetic: 3 × the forward FLOPs per token
  (`moejax.models.flops`: 2 · active matmul parameters plus attention) × tokens per step."""
  tc = config.train
  forward = flops.flops_per_token(config.model, tc.seq_len)["active"]
  return 3.0 * forward * tc.batch_size * tc.seq_len


def report(config: ml_collections.ConfigDict, topology: str) -> dict[str, Any]:
  """Compiles the train step of `config` for the slice `topology` and returns what it
  costs per device (the keys of the module docstring's `--json`)."""
  generation, topology_name = parse_slice(topology)
  chip = CHIPS[generation]
  num_slices = config.hardware.num_slices
  if num_slices > 1 and chip.dcn_bytes_per_second is None:
    raise ValueError(
      f"hardware.num_slices={num_slices}: no published DCN bandwidth for {generation} "
      f"(multi-slice reports: {', '.join(g for g, c in CHIPS.items() if c.dcn_bytes_per_second)})."
    )
  devices = slice_devices(topology_name, num_slices)
  mesh = make_run_mesh(config, devices)  # a mesh that does not fit lists the sizes that do
  chips = num_chips(topology_name) * num_slices
  devices_per_chip = max(1, len(devices) // chips)  # v4: one per core
  hbm = chip.hbm_bytes // devices_per_chip
  state_bytes = state_bytes_per_device(config, mesh)
  params = flops.count_params(config.model)
  result = {
    "topology": topology_name,
    "num_slices": num_slices,
    "num_devices": len(devices),
    "device_kind": devices[0].device_kind,
    "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.axis_sizes), strict=True)),
    "dtype": config.model.dtype,
    "remat": config.model.remat,
    "tokens_per_step": config.train.batch_size * config.train.seq_len,
    "hbm_bytes": int(hbm),
    "param_count": int(params["total"]),
    "active_param_count": int(params["active"]),
    "param_bytes_per_device": state_bytes["params"],
    "optimizer_bytes_per_device": state_bytes["optimizer"],
    "model_flops": model_flops_per_step(config),
  }
  try:
    compiled, timings = compile_train_step(config, mesh)
  except OutOfMemory as error:  # nothing else to read: no program was made
    used = {"temporaries": error.temporaries_bytes}
    used["total"] = used["temporaries"] + state_bytes["params"] + state_bytes["optimizer"]
    return result | {
      "bytes_per_device": used,
      "fits": False,
      "margin_bytes": int(hbm - used["total"]),
      "compile_seconds": error.compile_seconds,
      "error": str(error),
    }
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Loops whose trip count is known only at run time (dropless's later exchange rounds,
  # taken only when a skewed router overfills a receive buffer) count zero times: the
  # step of a balanced router. What each such trip adds is reported beside it.
  hlo_text = compiled.as_text()
  collectives = hlo.collectives(hlo_text, unknown_trips=0)
  once = hlo.collectives(hlo_text, unknown_trips=1)
  per_extra_round = {
    op: {k: once[op][k] - collectives.get(op, {}).get(k, 0) for k in ("count", "bytes")}
    for op in once
    if once[op] != collectives.get(op)
  }
  used = {
    "arguments": int(memory.argument_size_in_bytes),
    "outputs": int(memory.output_size_in_bytes),
    "temporaries": int(memory.temp_size_in_bytes),
    "aliased": int(memory.alias_size_in_bytes),
  }
  # What a policy offloads (`model.remat='offload_ffn'`) lives in host memory, not HBM.
  host_bytes = int(getattr(memory, "host_temp_size_in_bytes", 0))
  # Donated state is both an argument and an output: count it once.
  used["total"] = used["arguments"] + used["outputs"] - used["aliased"] + used["temporaries"]
  flops_per_device = float(cost.get("flops", 0.0))
  model_flops = result["model_flops"]
  # XLA's cost analysis counts a loop's body once, so for scanned layers its FLOPs fall
  # short. The compute bound is the model's arithmetic plus what the remat policy
  # recomputes, counted from the traced programs.
  recomputed = recomputed_flops(config, mesh, timings["matmul_flops"])
  program_flops = (model_flops + recomputed) / len(devices)
  # Between slices, over the data-center network: the multi-slice runtime's transfers.
  dcn = {op: c for op, c in collectives.items() if op.startswith(hlo.DCN_PREFIX)}
  dcn_bytes = sum(c["bytes"] for c in dcn.values())
  ici_bytes = sum(c["bytes"] for c in collectives.values()) - dcn_bytes
  per_device_peak = chip.peak_bf16_flops / devices_per_chip
  bounds = {
    "compute": program_flops / per_device_peak,
    "ici": ici_bytes / (chip.ici_bytes_per_second / 2 / devices_per_chip),
  }
  if num_slices > 1:
    bounds["dcn"] = dcn_bytes / (chip.dcn_bytes_per_second / devices_per_chip)
  step_seconds = max(bounds.values())
  return result | {
    "bytes_per_device": used,
    "fits": used["total"] <= hbm,
    "margin_bytes": int(hbm - used["total"]),
    "host_bytes_per_device": host_bytes,
    "collectives": collectives,
    "collectives_per_extra_round": per_extra_round,
    "dcn_collectives": dcn,
    "flops_per_device": flops_per_device,
    "recomputed_flops": recomputed,
    "program_flops_per_device": program_flops,
    "roofline_seconds": bounds,
    "roofline_bottleneck": max(bounds, key=lambda term: bounds[term]),
    "roofline_step_seconds": step_seconds,
    "roofline_mfu": model_flops / len(devices) / per_device_peak / step_seconds,
    "lower_seconds": timings["lower_seconds"],
    "compile_seconds": timings["compile_seconds"],
  }


def format_report(result: dict[str, Any]) -> str:
  """The report as a few lines of text."""
  gib = lambda b: f"{b / GIB:.2f} GiB"
  listing = lambda ops: (
    ", ".join(f"{op} {c['count']}x {gib(c['bytes'])}" for op, c in ops.items()) or "none"
  )
  used = result["bytes_per_device"]
  mesh = ", ".join(f"{k}={v}" for k, v in result["mesh"].items())
  slices = f"{result['num_slices']} x " if result["num_slices"] > 1 else ""
  lines = [
    f"{slices}{result['topology']}: {result['num_devices']} x {result['device_kind']}; mesh {mesh}; "
    f"{result['dtype']}, remat {result['remat']}; {result['tokens_per_step']:,} tokens per step",
    f"state per device: parameters {gib(result['param_bytes_per_device'])}, optimizer "
    f"{gib(result['optimizer_bytes_per_device'])} ({result['param_count']:,} parameters, "
    f"{result['active_param_count']:,} active per token)",
  ]
  if "error" in result:  # the compiler refused: out of HBM
    return "\n".join(
      lines
      + [
        f"memory per device: does NOT fit {gib(result['hbm_bytes'])} HBM: {result['error']} "
        f"(at least {gib(used['total'])} with the state)",
        f"compile gave up after {result['compile_seconds']:.1f} s",
      ]
    )
  lines += [
    f"memory per device: {gib(used['total'])} of {gib(result['hbm_bytes'])} HBM "
    f"({'fits' if result['fits'] else 'does NOT fit'}, margin {gib(result['margin_bytes'])}): "
    f"arguments {gib(used['arguments'])}, outputs {gib(used['outputs'])} "
    f"({gib(used['aliased'])} of them donated arguments), temporaries {gib(used['temporaries'])}",
    f"collectives per step per device: {listing(result['collectives'])}",
  ]
  if result["num_slices"] > 1:
    lines.append(
      f"of which across the {result['num_slices']} slices (DCN): "
      + listing(result["dcn_collectives"])
    )
  if result.get("collectives_per_extra_round"):
    lines.append(
      "each further dropless exchange round (under a skewed router) adds: "
      + listing(result["collectives_per_extra_round"])
    )
  lines += [
    f"FLOPs per device per step: {result['flops_per_device']:.3e} (XLA, loop bodies once), "
    f"{result['program_flops_per_device']:.3e} (the model's, plus "
    f"{result['recomputed_flops'] / result['num_devices']:.3e} recomputed by remat "
    f"{result['remat']}); model FLOPs per step {result['model_flops']:.3e} "
    "(6·N_active·tokens + attention)",
    "roofline per step: "
    + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["roofline_seconds"].items())
    + f" -> at least {result['roofline_step_seconds'] * 1e3:.1f} ms "
    f"({result['roofline_bottleneck']}-bound), MFU at most {result['roofline_mfu']:.1%}",
    f"lowered in {result['lower_seconds']:.1f} s, compiled in {result['compile_seconds']:.1f} s",
  ]
  return "\n".join(lines)


def command_slice(config: ml_collections.ConfigDict, topology: str | None, num_slices) -> str:
  """`--topology`, else the config's slice (one line if neither); `--num_slices`, if given,
  goes to `config.hardware`."""
  if num_slices is not None:
    config.hardware.num_slices = num_slices
  if not (topology or config.hardware.topology):
    allowed = ", ".join(f"{g}-N" for g in CHIPS)
    raise ValueError(f"--topology is required: the config names no slice; allowed: {allowed}.")
  return topology or config.hardware.topology


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  topology = command_slice(config, _TOPOLOGY.value, _NUM_SLICES.value)
  result = report(config, topology)
  print(format_report(result))
  if _JSON.value:
    write_json(_JSON.value, result)


def write_json(path: str, result: dict[str, Any]) -> None:
  """`result` as one JSON object at `path`, atomically; says whether it replaced a file."""
  from etils import epath

  from moejax.training import workdir as workdir_lib

  target = epath.Path(path)
  existed = target.exists()
  text = json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"
  workdir_lib.write_text_atomically(target, text)
  print(f"{'replaced' if existed else 'wrote'} {target}")


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from moejax.config.flags import ConfigFlag
  from moejax.runtime import cli

  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, configs/NAME.py[:ARG], or a run, import or upcycle directory (its saved config).",
    lock_config=True,
  )
  _TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice (v5p-128, v5e:4x8); default: the config's hardware.topology."
  )
  _JSON = flags.DEFINE_string("json", None, "Also write the report as one JSON object here.")
  _NUM_SLICES = flags.DEFINE_integer(
    "num_slices", None, "Slices joined by DCN; default: hardware.num_slices.", lower_bound=1
  )
  flags.mark_flag_as_required("config")
  cli.run(main, config_flag=ConfigFlag("config"))
