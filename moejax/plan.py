"""Rank the layouts of a config on a TPU slice: meshes x remat policies, each compiled.

`python -m moejax.plan --config=configs/NAME.py:pod [--topology=v5p-128] [--num_slices=N]
[--remat=attention_ffn,ffn,attention,full] [--budget_minutes=30] [--json=PATH]`

The candidates are every mesh of a slice, `expert x fsdp x data` devices with `expert`
dividing the experts (1 for a dense model; across slices `data` stacks them,
`mesh.dcn_data`), each with the remat policies of `--remat`, most kept first.

1. **Pruned without compiling:** a mesh the model or batch refuses (`check_mesh`), and one
   whose parameters and optimizer state alone overflow a device's HBM
   (`moejax.aot.state_bytes_per_device`, analytic).
2. **Compiled** (`moejax.aot.report`), meshes with the least state per device first: for
   each mesh, the policies in order until one fits; a policy that keeps less only
   recomputes more, so the rest are not tried. XLA:TPU refuses an overflowing program in
   seconds, so the misses are cheap. Compiling stops when `--budget_minutes` is spent
   (the compile under way finishes); what was not reached is listed.
3. **Ranked:** the programs that fit, by their roofline bound (compute, ICI and DCN
   terms, `moejax.aot`; at equal bounds, the smaller communication term first, then the
   smaller memory), then those that do not.

One compile takes 10 s to a few minutes on a 2-core host. Exit codes: 0 planned (even if
nothing fits: the table says so), 2 a wrong command, 1 a failed compile.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from moejax import aot
from moejax.models.remat import POLICIES
from moejax.parallel import tpu_slices

GIB = 2**30
DEFAULT_REMATS = ("attention_ffn", "ffn", "attention", "full")


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(num_experts: int, devices_per_slice: int) -> list[dict[str, int]]:
  """Every `{'data', 'fsdp', 'expert'}` of one slice's devices with `expert` dividing
  `num_experts` (only 1 without experts)."""
  meshes = []
  for expert in divisors(devices_per_slice):
    if expert > 1 and (not num_experts or num_experts % expert):
      continue
    for fsdp in divisors(devices_per_slice // expert):
      data = devices_per_slice // expert // fsdp
      meshes.append({"data": data, "fsdp": fsdp, "expert": expert})
  return meshes


def with_layout(config: ml_collections.ConfigDict, mesh: dict[str, int], remat: str):
  """`config` on `mesh` (each slice's sizes; slices along `data`) with `remat`."""
  config = config.copy_and_resolve_references()
  config.mesh.update(mesh)
  config.mesh.dcn_data, config.mesh.dcn_fsdp = -1, 1
  config.model.remat = remat
  return config


def prune(config, devices, hbm_bytes: int, num_experts: int) -> tuple[list, list]:
  """(`(mesh, mesh object, state bytes per device)` of the meshes worth compiling, least
  state first; `(mesh, why)` of the others)."""
  kept, pruned = [], []
  per_slice = len(devices) // config.hardware.num_slices
  for sizes in candidate_meshes(num_experts, per_slice):
    layout = with_layout(config, sizes, config.model.remat)
    try:
      mesh = aot.slice_mesh(layout, devices)
    except ValueError as error:
      pruned.append((sizes, " ".join(str(error).split())))
      continue
    state = aot.state_bytes_per_device(layout, mesh)
    state_bytes = state["params"] + state["optimizer"]
    if state_bytes > hbm_bytes:
      pruned.append((sizes, f"parameters and optimizer state alone: {state_bytes / GIB:.1f} GiB"))
      continue
    kept.append((sizes, state_bytes))
  return sorted(kept, key=lambda item: item[1]), pruned


def plan(
  config: ml_collections.ConfigDict,
  topology: str,
  remats: tuple[str, ...] = DEFAULT_REMATS,
  budget_seconds: float = 1800,
  log=print,
) -> dict[str, Any]:
  """Compiles the candidates of the module docstring and returns `{'ranked': reports
  (fitting first, by bound), 'pruned': [(mesh, why)], 'not_compiled': [mesh]}`."""
  unknown = [r for r in remats if r not in POLICIES]
  if unknown or not remats:
    raise ValueError(f"--remat={','.join(remats)}: allowed are {', '.join(POLICIES)}.")
  generation, topology_name = tpu_slices.parse_slice(topology)
  devices = tpu_slices.slice_devices(topology_name, config.hardware.num_slices)
  chips = tpu_slices.num_chips(topology_name) * config.hardware.num_slices
  hbm = tpu_slices.CHIPS[generation].hbm_bytes // max(1, len(devices) // chips)
  num_experts = config.model.num_experts
  kept, pruned = prune(config, devices, hbm, num_experts)
  log(f"{len(kept)} meshes to compile, {len(pruned)} pruned; policies {', '.join(remats)}")
  start, reports, not_compiled = time.perf_counter(), [], []
  for sizes, _ in kept:
    if time.perf_counter() - start > budget_seconds:
      not_compiled.append(sizes)
      continue
    for remat in remats:
      report = aot.report(with_layout(config, sizes, remat), topology)
      report["plan_mesh"] = sizes
      reports.append(report)
      log(summary_line(report))
      if report["fits"]:
        break
  return {"ranked": rank(reports), "pruned": pruned, "not_compiled": not_compiled}


def rank(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The reports that fit first, by roofline bound; between equal bounds, the one with
  the smaller communication terms (more of them left to hide), then the less memory."""

  def key(r):
    bounds = r.get("roofline_seconds", {})
    communication = max((v for k, v in bounds.items() if k != "compute"), default=0.0)
    step = r.get("roofline_step_seconds", float("inf"))
    return (not r["fits"], round(step, 6), communication, r["bytes_per_device"]["total"])

  return sorted(reports, key=key)


def mesh_text(sizes: dict[str, int]) -> str:
  return " × ".join(f"{k} {v}" for k, v in sizes.items() if v > 1) or "one device"


def summary_line(r: dict[str, Any]) -> str:
  """One candidate: mesh, policy, memory, terms, bound."""
  used = r["bytes_per_device"]["total"] / GIB
  head = f"{mesh_text(r['plan_mesh'])}, remat {r['remat']}: "
  if "error" in r:
    return head + f"does not fit ({r['error']})"
  terms = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in r["roofline_seconds"].items())
  return head + (
    f"{used:.1f} GiB{'' if r['fits'] else ' (does NOT fit)'}; ms {terms}; "
    f"step ≥ {r['roofline_step_seconds'] * 1e3:.3g} ms, MFU ≤ {r['roofline_mfu']:.0%}"
  )


def format_table(result: dict[str, Any]) -> str:
  """The ranked candidates as a Markdown table, then what was pruned or not reached."""
  lines = [
    "| rank | mesh | remat | fits | GiB per device | roofline ms: compute / ICI (/ DCN) "
    "| step ≥ ms | MFU ≤ |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for rank, r in enumerate(result["ranked"], 1):
    used = r["bytes_per_device"]["total"] / GIB
    if "error" in r:
      cells = f"no | ≥ {used:.1f} | — | — | —"
    else:
      terms = " / ".join(f"{v * 1e3:.3g}" for v in r["roofline_seconds"].values())
      cells = (
        f"{'yes' if r['fits'] else 'no'} | {used:.1f} | {terms} "
        f"| {r['roofline_step_seconds'] * 1e3:.3g} ({r['roofline_bottleneck']}) "
        f"| {r['roofline_mfu']:.0%}"
      )
    lines.append(f"| {rank} | {mesh_text(r['plan_mesh'])} | {r['remat']} | {cells} |")
  for sizes, why in result["pruned"]:
    lines.append(f"pruned: {mesh_text(sizes)}: {why}")
  if result["not_compiled"]:
    meshes = "; ".join(mesh_text(m) for m in result["not_compiled"])
    lines.append(f"not compiled (budget spent): {meshes}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  topology = aot.command_slice(config, _TOPOLOGY.value, _NUM_SLICES.value)
  result = plan(config, topology, tuple(_REMAT.value), _BUDGET.value * 60)
  print(format_table(result))
  if _JSON.value:
    aot.write_json(_JSON.value, result)


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from moejax.config.flags import ConfigFlag
  from moejax.runtime import cli

  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/NAME.py[:ARG].", lock_config=True
  )
  _TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice (v5p-128, v5e:4x8); default: the config's hardware.topology."
  )
  _NUM_SLICES = flags.DEFINE_integer(
    "num_slices", None, "Slices joined along data; default: hardware.num_slices.", lower_bound=1
  )
  _REMAT = flags.DEFINE_list(
    "remat", list(DEFAULT_REMATS), "Remat policies to try per mesh, most kept first."
  )
  _BUDGET = flags.DEFINE_float(
    "budget_minutes", 30, "Stop starting compiles after this long.", lower_bound=0
  )
  _JSON = flags.DEFINE_string("json", None, "Also write the ranked reports as JSON here.")
  flags.mark_flag_as_required("config")
  cli.run(main, config_flag=ConfigFlag("config"))
