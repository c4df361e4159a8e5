"""The layout planner (`moejax.plan`): its candidates counted by hand, its pruning, and a
small plan compiled for a TPU slice (libtpu, no TPU) and ranked."""

import pytest

from moejax import plan
from moejax.config import load_config
from moejax.parallel import tpu_slices

pytestmark = pytest.mark.skipif(not tpu_slices.has_libtpu(), reason="needs libtpu (the tpu extra)")


def test_candidate_meshes_by_hand():
  """4 devices, 8 experts: expert 1 (fsdp 1, 2, 4), expert 2 (fsdp 1, 2), expert 4."""
  meshes = {(m["data"], m["fsdp"], m["expert"]) for m in plan.candidate_meshes(8, 4)}
  assert meshes == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
  assert {m["expert"] for m in plan.candidate_meshes(0, 4)} == {1}  # a dense model
  assert {m["expert"] for m in plan.candidate_meshes(6, 8)} == {1, 2}  # 4 and 8 do not divide 6


def test_pruning_needs_no_compile():
  """A batch the meshes cannot split, and state larger than HBM, are refused analytically."""
  devices = tpu_slices.slice_devices("v5e:2x2")
  config = load_config("configs/mixtral.py:smoke", {"train.batch_size": 2})
  kept, pruned = plan.prune(config, devices, hbm_bytes=16 * 10**9, num_experts=8)
  assert not kept and len(pruned) == 6 and all("batch" in why for _, why in pruned)
  config = load_config("configs/mixtral.py:smoke", {"train.batch_size": 8})
  kept, pruned = plan.prune(config, devices, hbm_bytes=1000, num_experts=8)
  assert not kept and all("parameters and optimizer state alone" in why for _, why in pruned)
  kept, _ = plan.prune(config, devices, hbm_bytes=16 * 10**9, num_experts=8)
  states = [state for _, state in kept]
  assert len(kept) == 6 and states == sorted(states)  # least state per device first


def test_a_small_plan_is_compiled_and_ranked():
  """The dense smoke model on a v5e 2x2: three meshes (fsdp 1, 2, 4), one policy each as
  it fits; ranked by the roofline bound. No budget: nothing is compiled."""
  config = load_config("configs/dense.py:smoke", {"train.batch_size": 8})
  result = plan.plan(config, "v5e-4", remats=("attention_ffn",), budget_seconds=600, log=str)
  ranked = result["ranked"]
  assert sorted(r["plan_mesh"]["fsdp"] for r in ranked) == [1, 2, 4]
  assert all(r["fits"] and r["remat"] == "attention_ffn" for r in ranked)
  assert ranked == plan.rank(list(reversed(ranked)))
  bounds = [r["roofline_step_seconds"] for r in ranked]
  assert bounds == sorted(bounds)
  assert "| 1 |" in plan.format_table(result)
  none = plan.plan(config, "v5e-4", remats=("full",), budget_seconds=0, log=str)
  assert none["ranked"] == [] and len(none["not_compiled"]) == 3
  with pytest.raises(ValueError, match="--remat=everything: allowed are"):
    plan.plan(config, "v5e-4", remats=("everything",))
