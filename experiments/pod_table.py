"""The pod table: every config's `pod` recipe compiled for its own TPU slice.

`python -m experiments.pod_table [--configs=mixtral,olmoe,mixtral_x2] [--out=docs/pods.md]
[--nocompile]`

For each `configs/NAME.py` with a `pod` variant, `moejax.aot.report` compiles the train
step for the slice the config names (`hardware.topology`) and the JSON report is written
to `docs/results/pods/NAME.json`; then the Markdown table of all the reports there is
written to `--out` (`--nocompile` only rewrites the table). A dropless config on an expert
axis is compiled a second time with the opt-in bounded exchange
(`model.dropless_overflow='drop'`), and the report keeps that program's memory
(`dropless_drop`) beside the default's. The rows `NAME_xN` (`MULTI_SLICE`) put the recipe
on N slices joined along `data` (`hardware.num_slices`), each slice keeping the recipe's
256 sequences. Needs libtpu (`pip install -e '.[tpu]'`); no TPU.
"""

from __future__ import annotations

import json
import sys

from absl import app
from etils import epath

from moejax import aot
from moejax.config import load_config, packaged_config_names
from moejax.training import workdir as workdir_lib

# The recipes also compiled across slices: slices joined along data, as MaxText's largest
# MoE runs are (its dcn_data_parallelism), each slice with the recipe's batch.
MULTI_SLICE = {"deepseek_v3": 2, "mixtral": 2}

GIB = 2**30


def split_row(row: str) -> tuple[str, int]:
  """(config name, slices) of a table row: `NAME` is one slice, `NAME_xN` N slices."""
  name, _, slices = row.rpartition("_x")
  return (name, int(slices)) if name and slices.isdigit() else (row, 1)


def row_config(row: str):
  """The config of a table row: `configs/NAME.py:pod`, on N slices with N times the
  batch for `NAME_xN`."""
  name, slices = split_row(row)
  config = load_config(f"configs/{name}.py:pod")
  config.hardware.num_slices = slices
  config.train.batch_size *= slices
  return config


def pod_configs() -> list[str]:
  """The rows: every config that has a `pod` variant naming its slice, then the
  multi-slice rows (`MULTI_SLICE`)."""
  names = []
  for name in packaged_config_names():
    try:
      config = load_config(f"configs/{name}.py:pod")
    except ValueError:  # no pod variant (tiny)
      continue
    if config.hardware.topology:
      names.append(name)
  return names + [f"{name}_x{slices}" for name, slices in MULTI_SLICE.items() if name in names]


def dropless_opt_in(config) -> dict | None:
  """The memory and collectives of `config`'s step with `dropless_overflow='drop'` (one
  bounded exchange round), for a dropless config on an expert axis; else None."""
  if config.model.dispatch != "dropless" or config.mesh.expert <= 1:
    return None
  if config.hardware.num_slices > 1:  # the single-slice row shows it
    return None
  config = config.copy_and_resolve_references()
  config.model.dropless_overflow = "drop"
  report = aot.report(config, config.hardware.topology)
  return {k: report[k] for k in ("bytes_per_device", "fits", "collectives") if k in report}


def _dropless_cell(r: dict) -> str:
  """'rounds / drop' GiB per device of a dropless config, else '—'."""
  if "dropless_drop" not in r:
    return "—"
  rounds = r["bytes_per_device"]["total"] / GIB
  return f"{rounds:.1f} / {r['dropless_drop']['bytes_per_device']['total'] / GIB:.1f}"


def table_row(name: str, r: dict) -> str:
  mesh = " × ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "—"
  slices = r.get("num_slices", 1)  # reports from before multi-slice meshes have none
  where = f"{slices} × {r['slice']}" if slices > 1 else r["slice"]
  head = (
    f"| {name} | {r['param_count'] / 1e9:.1f}B / {r['active_param_count'] / 1e9:.2f}B "
    f"| {where} ({r['num_devices']}) | {mesh} | {r['remat']} "
  )
  used = r["bytes_per_device"]["total"] / GIB
  if "error" in r:  # out of HBM: the compiler made no program
    return head + (
      f"| ≥ {used:.1f} / {r['hbm_bytes'] / GIB:.0f} | **no** | {r['model_flops'] / r['num_devices']:.2e} "
      f"| — | — | — | — | {_dropless_cell(r)} | {r['compile_seconds']:.0f} |"
    )
  host = r.get("host_bytes_per_device", 0) / GIB
  used_cell = f"{used:.1f} / {r['hbm_bytes'] / GIB:.0f}" + (f" (+{host:.1f} host)" if host else "")
  collectives = ", ".join(f"{op} {c['bytes'] / GIB:.1f}" for op, c in r["collectives"].items())
  bounds = r["roofline_seconds"]
  terms = " / ".join(f"{bounds[k] * 1e3:.0f}" for k in ("compute", "ici", "dcn") if k in bounds)
  return head + (
    f"| {used_cell} | {'yes' if r['fits'] else '**no**'} "
    f"| {r['model_flops'] / r['num_devices']:.2e} | {collectives or '—'} "
    f"| {terms} "
    f"| {r['roofline_step_seconds'] * 1e3:.0f} ({r['roofline_bottleneck']}) "
    f"| {r['roofline_mfu']:.0%} | {_dropless_cell(r)} | {r['compile_seconds']:.0f} |"
  )


HEADER = """\
| config | params total / active | slice (devices) | mesh | remat | GiB per device / HBM | fits | model FLOPs per device | collectives GiB per device | roofline ms: compute / ICI (/ DCN) | step ≥ ms (bound) | MFU ≤ | dropless GiB: rounds / drop | compile s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"""


def main(argv) -> None:
  del argv
  results = epath.Path(_RESULTS.value)
  results.mkdir(parents=True, exist_ok=True)
  names = (_CONFIGS.value or pod_configs()) if _COMPILE.value else []
  for name in names:
    config = row_config(name)
    print(f"{name}: compiling for {config.hardware.topology} ...", flush=True)
    report = aot.report(config, config.hardware.topology)
    report["config"], report["slice"] = (
      f"configs/{split_row(name)[0]}.py:pod",
      config.hardware.topology,
    )
    opt_in = dropless_opt_in(config)
    if opt_in is not None:
      report["dropless_drop"] = opt_in
      print(
        f"{name}: with dropless_overflow='drop': {opt_in['bytes_per_device']['total'] / GIB:.2f} GiB per device",
        flush=True,
      )
    print(aot.format_report(report), flush=True)
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    workdir_lib.write_text_atomically(results / f"{name}.json", text)
  rows = []
  for path in sorted(results.glob("*.json")):
    rows.append(table_row(path.stem, json.loads(path.read_text())))
  out = epath.Path(_OUT.value)
  template = out.read_text() if out.exists() else "<!-- pod table -->\n"
  begin, end = "<!-- pod table -->", "<!-- end pod table -->"
  table = f"{begin}\n{HEADER}\n" + "\n".join(rows) + f"\n{end}"
  if begin not in template:
    sys.exit(f"error: {out} has no '{begin}' marker to put the table after.")
  head, _, rest = template.partition(begin)
  _, _, tail = rest.partition(end)
  workdir_lib.write_text_atomically(out, head + table + tail)
  print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
  from absl import flags

  _CONFIGS = flags.DEFINE_list("configs", None, "Configs to compile (default: every pod config).")
  _OUT = flags.DEFINE_string("out", "docs/pods.md", "The Markdown table to write.")
  _RESULTS = flags.DEFINE_string("results", "docs/results/pods", "Where each config's JSON goes.")
  _COMPILE = flags.DEFINE_bool(
    "compile", True, "Compile the rows; --nocompile rewrites the table from the JSON reports."
  )
  app.run(main)
