"""The MoE layer benchmark (`experiments/benchmarks/moe_layer.py`): its smoke preset runs
in-process and its table holds what the module docstring says. The other benchmark scripts'
smoke runs, too. They compile with most XLA optimisations off (conftest.fast_compile_module): the
tests check what the rows hold and how they are computed, not how fast the programs run."""

import csv
import math

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.benchmarks import moe_layer
from moejax.config import load_config
from moejax.moe import MoeConfig, MoeLayer

pytestmark = pytest.mark.usefixtures("fast_compile_module")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, fast_compile_module):
  out = tmp_path_factory.mktemp("bench") / "smoke.csv"
  assert moe_layer.main(["--preset=smoke", f"--out={out}"]) == 0
  with open(out, newline="") as fh:
    reader = csv.DictReader(fh)
    return reader.fieldnames, list(reader)


def _row(rows, name):
  (row,) = [r for r in rows if r["name"] == name]
  return row


def test_smoke_has_a_row_per_dispatch_with_finite_positive_times(smoke):
  columns, rows = smoke
  assert tuple(columns) == moe_layer.COLUMNS
  names = [r["name"] for r in rows]
  assert names == ["matmul", "dense", "moe/einsum", "moe/sort", "moe/dropless", "moe/einsum/g48"]
  for r in rows:
    median, lo, hi = float(r["median_ms"]), float(r["min_ms"]), float(r["max_ms"])
    assert math.isfinite(median) and 0 < lo <= median <= hi, r
    assert float(r["mfu"]) > 0 and float(r["gflop_per_s"]) > 0
    assert int(r["reps"]) == 1
  for dispatch in ("einsum", "sort", "dropless"):
    r = _row(rows, f"moe/{dispatch}")
    assert (r["dispatch"], r["num_experts"], r["tokens"]) == (dispatch, "8", "96")


def test_mfu_and_ratio_are_recomputed_from_the_row(smoke):
  _, rows = smoke
  n = 128  # the smoke matmul size
  matmul, dense, sort = _row(rows, "matmul"), _row(rows, "dense"), _row(rows, "moe/sort")
  rate = 2 * n**3 / (float(matmul["median_ms"]) / 1e3)  # FLOP/s of the matmul
  T, d, f, E, k = 96, 16, 40, 8, 2
  active = 3 * (3 * 2 * T * k * d * f + 2 * T * d * E)  # experts + router, fwd+bwd
  seconds = float(sort["median_ms"]) / 1e3
  assert float(sort["active_gflop"]) == pytest.approx(active / 1e9, rel=1e-5)
  assert float(sort["mfu"]) == pytest.approx(active / seconds / rate, rel=1e-4)
  assert float(sort["vs_dense"]) == pytest.approx(
    seconds * 1e3 / float(dense["median_ms"]), rel=1e-4
  )
  assert float(dense["active_gflop"]) == pytest.approx(3 * 3 * 2 * T * d * k * f / 1e9, rel=1e-5)
  assert float(matmul["mfu"]) == pytest.approx(1.0)


def test_only_the_einsum_rows_hold_a_tokens_experts_capacity_tensor(smoke):
  _, rows = smoke
  assert _row(rows, "moe/einsum")["tec_shape"] == "f32[96,8,24]"  # C = ceil(96·2/8)
  assert _row(rows, "moe/einsum/g48")["tec_tensor"] == "yes"
  assert _row(rows, "moe/sort")["tec_tensor"] == "no"
  assert _row(rows, "moe/dropless")["tec_tensor"] == "no"


def test_row_factor_counts_capacity_slots_and_dropless_blocks_by_hand():
  T, d, E, k = 96, 16, 8, 2
  x = jax.random.normal(jax.random.key(0), (T, d))
  sort = MoeLayer(
    MoeConfig(num_experts=E, d_ff=8, top_k=k, dispatch="sort", group_size=48),
    d_model=d,
    rngs=nnx.Rngs(0),
  )
  assert moe_layer.row_factor(sort, x, 13) == 2 * E * 13 / (T * k)  # 2 groups of E·C slots
  layer = MoeLayer(
    MoeConfig(num_experts=E, d_ff=8, top_k=k, dispatch="dropless"), d_model=d, rngs=nnx.Rngs(0)
  )
  logits = np.asarray(x, np.float64) @ np.asarray(layer.router_kernel[...], np.float64)
  top = np.argsort(-logits, axis=1)[:, :k]
  counts = np.bincount(top.reshape(-1), minlength=E)
  block, step = 16, 2  # T·k / E = 24 -> blocks of 16; remainders in eighths of 2 rows
  rows = sum(c // block * block + -(-(c % block) // step) * step for c in counts)
  assert moe_layer.row_factor(layer, x, None) == rows / (T * k)


def test_csv_is_never_overwritten(tmp_path):
  table = [{c: 1.5 for c in moe_layer.COLUMNS}]
  path = str(tmp_path / "r.csv")
  assert moe_layer.write_rows(table, moe_layer.COLUMNS, path) == path
  assert moe_layer.write_rows(table, moe_layer.COLUMNS, path) == str(tmp_path / "r-1.csv")
  assert moe_layer.write_rows(table, moe_layer.COLUMNS, path) == str(tmp_path / "r-2.csv")
  with open(path) as fh:
    assert fh.readline().strip() == ",".join(moe_layer.COLUMNS)


def test_flags_fill_from_the_preset_and_override():
  args = moe_layer.parse_flags(["--preset=smoke", "--num_experts=4,8", "--reps=3"])
  assert args.num_experts == (4, 8) and args.reps == 3 and args.d_model == 16
  default = moe_layer.parse_flags([])
  assert (default.batch * default.seq_len, default.d_model, default.d_ff) == (4096, 512, 1024)
  assert default.num_experts == (16, 64) and default.reps >= 5 and default.capacity_factor == 1.0
  with pytest.raises(SystemExit):
    moe_layer.parse_flags(["--dispatches=einsum,scatter"])


def test_results_keep_rows_of_the_same_name_apart():
  """Rows that differ only in E share a name; each keeps its own median."""
  row = lambda name, E, times, flops: moe_layer.Row(
    name, "fwdbwd", None, (), flops, num_experts=E, times=times
  )
  rows = [
    moe_layer.Row("matmul", "fwd", None, (), 8e9, times=[2.0, 1.0, 3.0]),
    row("dense", "", [1.0], 4e9),
    row("moe/sort", 16, [0.5, 0.7, 0.6], 6e9),
    row("moe/sort", 64, [3.0, 2.0, 4.0], 6e9),
  ]
  table = moe_layer.results(rows)
  e16, e64 = table[2], table[3]
  assert (e16["median_ms"], e64["median_ms"]) == (pytest.approx(600), pytest.approx(3000))
  assert (e16["vs_dense"], e64["vs_dense"]) == (pytest.approx(0.6), pytest.approx(3.0))
  # rate 8e9 / 2 s = 4 GFLOP/s; 6 GFLOP in 0.6 s = 10 GFLOP/s -> MFU 2.5.
  assert e16["mfu"] == pytest.approx(2.5) and e64["mfu"] == pytest.approx(0.5)


def test_all_to_all_script_reads_the_minimum_off_a_real_train_step():
  from experiments.benchmarks import all_to_all

  config = load_config("configs/tiny.py")
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 2, 32, 2, 2
  config.model.d_ff, config.model.expert_d_ff = 64, 32
  config.train.batch_size, config.train.seq_len = 8, 32
  config.mesh.data, config.mesh.expert = 2, 4
  config.model.capacity_factor, config.model.group_size = 1.0, 32
  result = all_to_all.measure(config)
  # Hand count: 2 MoE layers × (dispatch + combine) × (forward + backward) × 32 tokens
  # per device × k=2 × d_model 32 × 4 bytes.
  assert result["minimum_bytes"] == 2 * 2 * 2 * 32 * 2 * 32 * 4
  assert result["measured_bytes"] == result["minimum_bytes"]


def test_train_step_benchmark_smoke_reports_throughput_share_and_memory(tmp_path):
  from experiments.benchmarks import train_step
  from moejax.models.transformer import expert_d_ff_of

  args = train_step.parse_flags(
    ["--config=configs/tiny.py:smoke", "--reps=2", "--warmup=1", f"--out={tmp_path / 'ts.csv'}"]
  )
  rows, path = train_step.run(args)
  assert path == str(tmp_path / "ts.csv")
  by_name = {r["name"]: r for r in rows}
  assert list(by_name) == ["step", "moe_layers", "dense_step"]
  step, moe, dense = by_name["step"], by_name["moe_layers"], by_name["dense_step"]
  tokens = step["batch"] * step["seq_len"]
  assert step["tokens_per_s"] == pytest.approx(tokens / (step["median_ms"] / 1e3))
  assert moe["share_of_step"] == pytest.approx(moe["median_ms"] / step["median_ms"])
  assert step["vs_dense"] == pytest.approx(step["median_ms"] / dense["median_ms"])
  for r in rows:
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert r["peak_mib"] >= r["temp_mib"] > 0
  # The dense baseline replaces each MoE layer by an FFN of the same active width.
  config = load_config("configs/tiny.py:smoke")
  dense_config = train_step.dense_equivalent(config)
  assert dense_config.model.num_experts == 0
  assert dense_config.model.d_ff == config.model.top_k * expert_d_ff_of(config.model)
  with open(path, newline="") as fh:
    assert len(list(csv.DictReader(fh))) == 3


def test_expert_matmuls_smoke_rows_and_hand_counted_flops(tmp_path):
  from experiments.benchmarks import expert_matmuls

  args = expert_matmuls.parse_flags(["--preset=smoke", f"--out={tmp_path / 'e.csv'}"])
  table, path = expert_matmuls.run(args, log=lambda *_: None)
  assert path == str(tmp_path / "e.csv")
  rows = {r["name"]: r for r in table}
  assert list(rows) == [
    "matmul",
    "batched",
    "block_ffn",
    "x@w",
    "dy@wᵀ",
    "xᵀ@dy",
    "fresh [E,d,f]×3",
  ]
  assert rows["fresh [E,d,f]×3"]["gflop"] == 0 and rows["fresh [E,d,f]×3"]["median_ms"] > 0
  E, C, d, f = 4, 64 * 2 // 4, 16, 32  # the smoke preset
  one = 2 * E * C * d * f
  for name, matmuls in [("batched", 9), ("block_ffn", 9), ("x@w", 1), ("dy@wᵀ", 1), ("xᵀ@dy", 1)]:
    r = rows[name]
    assert (r["num_experts"], r["capacity"]) == (E, C)
    assert r["gflop"] == pytest.approx(matmuls * one / 1e9)
    assert r["gflop_per_s"] == pytest.approx(r["gflop"] / (r["median_ms"] / 1e3))
  assert rows["matmul"]["mfu"] == pytest.approx(1.0)


def test_gpu_checks_run_tiny_on_a_cpu(tmp_path):
  """`make bench-gpu`'s script at shapes a CPU runs in seconds: every row, and MFU
  recomputed from the row's own time and the hand-counted expert FLOPs."""
  from experiments.benchmarks import gpu

  flags = ["--tiny", "--shapes=mixtral", "--reps=2", f"--out={tmp_path / 'g.csv'}"]
  rows, path = gpu.run(gpu.parse_flags(flags))
  assert path == str(tmp_path / "g.csv")
  by_name = {r["name"]: r for r in rows}
  layers = [f"layer/mixtral/{d}" for d in gpu.DISPATCHES]
  assert list(by_name) == ["matmul", *layers, "attention/xla", "train_step/mixtral"]
  assert by_name["attention/xla"]["max_abs_diff"] == 0.0  # on a CPU 'auto' is 'xla' too
  attention = 3 * 2 * (2 * 4 * 256 * 256 / 2) * 2 * 64  # fwd+bwd, q·k and p·v, causal half
  seconds = by_name["attention/xla"]["seconds"]
  assert by_name["attention/xla"]["tflops"] * 1e12 == pytest.approx(attention / seconds)
  rate = by_name["matmul"]["tflops"] * 1e12
  d, f, _, k = (4096 // 64, 14336 // 64, 8, 2)  # the tiny Mixtral shape, 64 tokens
  useful = 3 * 3 * 2 * 64 * k * d * f
  mixtral = by_name["layer/mixtral/dropless"]
  assert mixtral["tflops"] * 1e12 == pytest.approx(useful / mixtral["seconds"])
  assert mixtral["mfu"] == pytest.approx(useful / mixtral["seconds"] / rate)
  assert by_name["train_step/mixtral"]["tokens_per_sec"] > 0
  with open(path, newline="") as fh:
    assert len(list(csv.DictReader(fh))) == len(rows)
