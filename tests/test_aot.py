"""The train step compiled ahead of time for real TPU slices (libtpu, no TPU), read back:
the forms the model picks for TPU devices, the expert-parallel exchanges, FSDP shardings,
the memory report; the slice names; the pod recipes; the command line."""

import json
import re
import subprocess
import sys

import pytest

from experiments import pod_table
from moejax import aot
from moejax.config import load_config
from moejax.models.transformer import moe_layer_indices
from moejax.moe import block_ffn
from moejax.parallel import sharding, tpu_slices

pytestmark = pytest.mark.skipif(not tpu_slices.has_libtpu(), reason="needs libtpu (the tpu extra)")

SMOKE = "configs/mixtral.py:smoke"  # 2 MoE layers, 8 experts top-2, dropless


def compile_for(topology: str, **overrides):
  config = load_config(SMOKE, {"model.remat": "none", **overrides})
  _, name = tpu_slices.parse_slice(topology)
  mesh = aot.slice_mesh(config, tpu_slices.slice_devices(name))
  compiled, _ = aot.compile_train_step(config, mesh)
  return config, compiled, mesh


@pytest.fixture(scope="module")
def dropless_ep():
  """One compile shared by the assertions: dropless experts, 4-way expert parallel, v5e 2x2."""
  config, compiled, mesh = compile_for("v5e-4", **{"mesh.expert": 4, "mesh.data": 1})
  return config, compiled.as_text()


def test_the_tpu_program_has_the_tpu_forms(dropless_ep):
  """Built on a TPU mesh from this CPU host, the layer runs `ragged_dot` experts and the
  ragged all-to-all, not the CPU block loop."""
  _, text = dropless_ep
  assert "ragged-dot" in text  # XLA:TPU names its grouped-matmul fusions ragged-dot-*
  assert block_ffn.SCOPE not in text


def test_forcing_the_block_loop_shows_in_the_tpu_program():
  """The negative control of the test above: the CPU form, forced, is visible."""
  _, compiled, _ = compile_for(
    "v5e-4", **{"mesh.expert": 4, "mesh.data": 1, "model.expert_impl": "block_loop"}
  )
  assert block_ffn.SCOPE in compiled.as_text()


def test_expert_parallel_exchanges_per_layer(dropless_ep):
  """Per MoE layer, round 0: rows out to the expert devices and back, forward and
  backward. The later rounds' loop (its trip count known only at run time): rows out and
  back forward; rows, their cotangents, and the rows' cotangents back in the backward."""
  config, text = dropless_ep
  layers = len(moe_layer_indices(config.model))
  found = aot.hlo.collectives(text, unknown_trips=0)
  assert found["ragged-all-to-all"]["count"] == 4 * layers
  found = aot.hlo.collectives(text, unknown_trips=1)
  assert found["ragged-all-to-all"]["count"] == (4 + 5) * layers
  found = aot.hlo.collectives(text, unknown_trips=3)
  assert found["ragged-all-to-all"]["count"] == (4 + 3 * 5) * layers


def test_einsum_dispatch_uses_dense_all_to_alls():
  config, compiled, _ = compile_for(
    "v5e-4", **{"mesh.expert": 4, "mesh.data": 1, "model.dispatch": "auto"}
  )
  found = aot.hlo.collectives(compiled.as_text())
  assert "ragged-all-to-all" not in found
  assert found["all-to-all"]["count"] == 4 * len(moe_layer_indices(config.model))


def test_fsdp_shards_parameters_and_optimizer_state():
  """fsdp 4 on a v5p 2x2x1: each device holds a quarter of the parameters and of the
  optimizer state (the smoke model's dimensions all divide by 4), and the step gathers
  weights and reduce-scatters gradients."""
  config, compiled, mesh = compile_for("v5p-8", **{"mesh.fsdp": 4, "mesh.data": 1})
  alone = aot.state_bytes_per_device(config, None)
  sharded = aot.state_bytes_per_device(config, mesh)
  assert sharded["params"] == pytest.approx(alone["params"] / 4, rel=0.02)
  assert sharded["optimizer"] == pytest.approx(alone["optimizer"] / 4, rel=0.02)
  found = aot.hlo.collectives(compiled.as_text())
  assert found["all-gather"]["count"] > 0
  assert "reduce-scatter" in found or "all-reduce" in found


def test_report_on_v5e_4():
  config = load_config(SMOKE, {"mesh.expert": 4, "mesh.data": 1})
  result = aot.report(config, "v5e-4")
  for key in (
    "topology",
    "num_devices",
    "device_kind",
    "mesh",
    "hbm_bytes",
    "bytes_per_device",
    "fits",
    "param_count",
    "collectives",
    "flops_per_device",
    "model_flops",
    "roofline_step_seconds",
    "roofline_mfu",
    "compile_seconds",
  ):
    assert key in result
  assert result["topology"] == "v5e:2x2" and result["num_devices"] == 4
  assert result["mesh"] == {"data": 1, "fsdp": 1, "expert": 4}
  used = result["bytes_per_device"]
  assert (
    used["total"] == used["arguments"] + used["outputs"] - used["aliased"] + used["temporaries"]
  )
  # The donated state is at least the parameters and optimizer state a device holds.
  assert (
    used["arguments"] >= result["param_bytes_per_device"] + result["optimizer_bytes_per_device"]
  )
  assert result["fits"] and result["hbm_bytes"] == 16 * 10**9
  assert 0 < result["roofline_mfu"] <= 1
  # Dropless's later rounds are counted apart: 5 ragged exchanges per MoE layer and round.
  extra = result["collectives_per_extra_round"]
  assert set(extra) == {"ragged-all-to-all"}
  assert extra["ragged-all-to-all"]["count"] == 5 * len(moe_layer_indices(config.model))


def test_remat_policies_on_v5e_4():
  """The compute bound counts what each policy recomputes (the traced step against the
  same step keeping everything), and offloading moves the FFN's saved activations to host
  memory: XLA:TPU compiles it, and the report says how many bytes live there."""
  reports = {
    remat: aot.report(
      load_config(SMOKE, {"mesh.expert": 4, "mesh.data": 1, "model.remat": remat}), "v5e-4"
    )
    for remat in ("full", "attention_ffn", "offload_ffn")
  }
  full, kept, offloaded = (reports[r] for r in ("full", "attention_ffn", "offload_ffn"))
  assert full["recomputed_flops"] > kept["recomputed_flops"] > 0
  assert offloaded["recomputed_flops"] == kept["recomputed_flops"]
  assert full["roofline_seconds"]["compute"] > kept["roofline_seconds"]["compute"]
  assert kept["host_bytes_per_device"] == 0 < offloaded["host_bytes_per_device"]
  assert all(r["fits"] and r["remat"] in reports for r in reports.values())


def test_two_slices_on_v5e_4():
  """2 x v5e 2x2 joined along `data` (a hybrid mesh over the slices' devices): the only
  traffic between slices is the gradient reduction, at least every parameter shard a
  device holds (float32), and the expert exchanges stay inside a slice. The roofline
  gains a DCN term."""
  config = load_config(SMOKE, {"mesh.expert": 4, "mesh.data": 1, "hardware.num_slices": 2})
  result = aot.report(config, "v5e-4")
  assert result["num_slices"] == 2 and result["num_devices"] == 8
  assert result["mesh"] == {"data": 2, "fsdp": 1, "expert": 4}
  across = result["dcn_collectives"]
  assert set(across) == {"dcn-all-reduce"}
  params = result["param_bytes_per_device"]
  assert params <= across["dcn-all-reduce"]["bytes"] < 2 * params  # tiles pad it
  assert "ragged-all-to-all" in result["collectives"]
  assert result["roofline_seconds"]["dcn"] > 0
  row = pod_table.table_row("mixtral_x2", result | {"slice": "v5e-4"})
  assert "| 2 × v5e-4 (8) |" in row and "| remat none |" not in row


def test_pod_table_rows_on_several_slices():
  """`NAME_xN` is the pod recipe on N slices, each slice keeping the recipe's batch."""
  assert pod_table.split_row("deepseek_v3") == ("deepseek_v3", 1)
  assert pod_table.split_row("deepseek_v3_x2") == ("deepseek_v3", 2)
  config = pod_table.row_config("mixtral_x2")
  assert config.hardware.num_slices == 2 and config.train.batch_size == 2 * 256


@pytest.mark.parametrize(
  "name, topology",
  [
    ("v5e-4", "v5e:2x2"),
    ("v5e-256", "v5e:16x16"),
    ("v6e-64", "v6e:8x8"),
    ("v5p-8", "v5p:2x2x1"),
    ("v5p-128", "v5p:4x4x4"),
    ("v5p-1024", "v5p:8x8x8"),
    ("v4-128", "v4:4x4x4"),
    ("v5p:4x4x8", "v5p:4x4x8"),
  ],
)
def test_gcloud_names(name, topology):
  assert tpu_slices.parse_slice(name)[1] == topology


@pytest.mark.parametrize("name", ["v5p-6", "v5e-3", "v9-8", "tpu", "v5e:2x2x2", ""])
def test_wrong_slice_names(name):
  with pytest.raises(ValueError, match="--topology="):
    tpu_slices.parse_slice(name)


def test_without_libtpu_the_install_line(monkeypatch):
  monkeypatch.setattr(tpu_slices, "has_libtpu", lambda: False)
  with pytest.raises(ValueError, match=r"pip install -e '\.\[tpu\]'"):
    tpu_slices.slice_devices("v5e:2x2")


POD_CONFIGS = [
  "arctic",
  "deepseek_v2_lite",
  "deepseek_v3",
  "dense",
  "glam",
  "mixtral",
  "olmoe",
  "qwen2_moe",
  "qwen3_moe",
  "st_moe",
  "switch_base",
]


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_every_pod_recipe_names_a_slice_its_mesh_fits(name):
  """Each pod variant names its slice, its mesh fills the slice's devices and fits the
  model and batch, routing groups with a capacity are one sequence, and it computes in
  bfloat16."""
  config = load_config(f"configs/{name}.py:pod")
  generation, topology = tpu_slices.parse_slice(config.hardware.topology)
  devices = tpu_slices.num_chips(topology) * (2 if generation == "v4" else 1)
  sizes = sharding.mesh_shape(config.mesh, devices)
  assert config.train.batch_size % devices == 0
  if config.model.num_experts:
    assert config.model.num_experts % sizes["expert"] == 0
  capacity = config.model.num_experts and config.model.dispatch != "dropless"
  assert config.model.group_size == (config.train.seq_len if capacity else None)
  assert config.model.dtype == "bfloat16"


def test_command_line(tmp_path):
  out = tmp_path / "report.json"
  command = [sys.executable, "-m", "moejax.aot", f"--config={SMOKE}", "--topology=v5e-4"]
  overrides = ["--config.mesh.expert=4", "--config.mesh.data=1", f"--json={out}"]
  done = subprocess.run(command + overrides, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "fits" in done.stdout and json.loads(out.read_text())["num_devices"] == 4
  wrong = subprocess.run(
    command[:-1] + ["--topology=v5e-3"], capture_output=True, text=True, timeout=600
  )
  assert wrong.returncode == 2
  assert wrong.stderr.strip().splitlines()[-1].startswith("error: --topology='v5e-3'")
  # A mesh that does not fit the slice lists the sizes that do, and libtpu's host probe
  # line stays out of the output.
  unfit = subprocess.run(
    command + ["--config.mesh.expert=3"], capture_output=True, text=True, timeout=600
  )
  assert unfit.returncode == 2
  assert unfit.stderr.splitlines() == [unfit.stderr.strip()], unfit.stderr
  assert "Sizes that fit the 4 devices: " in unfit.stderr
  assert "--config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.expert=4" in unfit.stderr


def test_tpu_programs_attend_with_the_splash_kernel():
  """At a sequence of 128 the TPU program's attention is the splash kernel, with the
  documents as its segment ids: its forward, and its dq and dk/dv kernels in the backward
  (named in the program's Mosaic calls). With 'xla' there is none."""
  kernels, exchanges = {}, {}
  for kernel in ("auto", "xla"):
    overrides = {"train.seq_len": 128, "model.attention_kernel": kernel}
    _, compiled, _ = compile_for("v5e-4", **overrides, **{"mesh.expert": 4, "mesh.data": 1})
    text = compiled.as_text()
    kernels[kernel] = set(re.findall(r"splash_mha_(\w+?)_segmented", text))
    exchanges[kernel] = aot.hlo.collectives(text, unknown_trips=0)["ragged-all-to-all"]
  assert kernels == {"auto": {"fwd", "dq", "dkv"}, "xla": set()}
  # The kernels' multi-line configs hide no collective from the count: the same exchanges.
  assert exchanges["auto"] == exchanges["xla"]
