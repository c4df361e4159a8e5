"""`StreamedArray`: an array an Orbax checkpoint gets block by block (what an import
writes), against the same array saved whole."""

from __future__ import annotations

import weakref

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from moejax.config import base_config
from moejax.training import checkpoint as checkpoint_lib
from moejax.training.streamed_array import StreamedArray


class Blocks:
  """Makes rows of `full`, recording each call and checking that no block it made
  before is still alive (the handler holds one block at a time)."""

  def __init__(self):
    self.calls: list[tuple[str, int, int]] = []
    self.alive: list[weakref.ref] = []

  def maker(self, name: str, full: np.ndarray):
    def make(start: int, stop: int) -> np.ndarray:
      assert all(ref() is None for ref in self.alive), "an earlier block is still in memory"
      self.calls.append((name, start, stop))
      block = full[start:stop].copy()
      self.alive.append(weakref.ref(block))
      return block

    return make


def test_blocks_are_written_one_at_a_time_as_chunks_and_read_back_whole(tmp_path):
  rng = np.random.default_rng(0)
  stacked = rng.normal(size=(5, 3, 4)).astype(np.float32)
  other = rng.normal(size=(3, 2)).astype(np.float32)
  blocks = Blocks()
  tree = {
    "stacked": StreamedArray(stacked.shape, stacked.dtype, blocks.maker("s", stacked), 2),
    "whole": StreamedArray(other.shape, other.dtype, blocks.maker("w", other)),
    "plain": np.arange(3.0),
  }
  checkpoints = checkpoint_lib.Checkpointer(tmp_path, keep=1)
  checkpoints.save_model(0, tree, base_config())
  checkpoints.close()
  stacked_calls = [call for call in blocks.calls if call[0] == "s"]
  assert stacked_calls == [("s", 0, 2), ("s", 2, 4), ("s", 4, 5)]  # in order, the last short
  assert [call for call in blocks.calls if call[0] == "w"] == [("w", 0, 3)]

  reader = ocp.CheckpointManager(
    tmp_path / "checkpoints", item_handlers={"state": ocp.PyTreeCheckpointHandler()}
  )
  state = reader.restore(0, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]["0"]
  reader.close()
  np.testing.assert_array_equal(state["stacked"], stacked)
  np.testing.assert_array_equal(state["whole"], other)
  np.testing.assert_array_equal(state["plain"], np.arange(3.0))

  # Stored as one chunk per block (so no chunk waits in memory for a later block).
  stored = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{tmp_path}/checkpoints/0/state"})
  chunks = [k.decode() for k in stored.result().list().result() if k.startswith(b"0.stacked/")]
  metadata = (".zarray", "zarr.json")
  assert len([k for k in chunks if not k.endswith(metadata)]) == 3, chunks


def test_a_block_of_the_wrong_shape_is_refused(tmp_path):
  bad = StreamedArray((2, 3), np.dtype(np.float32), lambda a, b: np.zeros((1, 4), np.float32), 1)
  checkpoints = checkpoint_lib.Checkpointer(tmp_path, keep=1)
  with pytest.raises(ValueError, match=r"a block of shape \(1, 4\) for rows"):
    checkpoints.save_model(0, {"bad": bad}, base_config())
  checkpoints.close()
  assert checkpoint_lib.Checkpointer(tmp_path, keep=1).steps() == []
