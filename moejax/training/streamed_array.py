"""An array written to an Orbax checkpoint block by block, never whole in host memory.

An import stacks each run of identical layers into one moejax parameter (an expert
weight is `[repeats, experts, d_model, d_ff]`, the first axis one row per layer). Built
whole, every such parameter would be in memory at once before Orbax writes the tree. A
`StreamedArray` instead names the array's shape and dtype and a function that makes each
block of rows of its first axis on demand; `StreamedArrayHandler` writes the blocks one
after another as the chunks of the stored array (Orbax splits a block over its data-file
size target, 2 GiB on local disk, further), so memory holds one block at a time. Read
back, it is an ordinary NumPy array of the checkpoint (the handler records itself as one).

Needs Orbax's `NumpyHandler` write path of orbax-checkpoint 0.12 (`pyproject.toml` pins it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorstore as ts
from orbax.checkpoint import multihost, type_handlers
from orbax.checkpoint.future import CommitFutureAwaitingContractedSignals


@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """An array of `shape` and `dtype` whose rows `[start, stop)` of the first axis are
  `make_block(start, stop)`; `block_rows` rows per block (all rows when 0)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  make_block: Callable[[int, int], np.ndarray]
  block_rows: int = 0

  def block_shape(self) -> tuple[int, ...]:
    """The shape of a full block (the stored chunk)."""
    if not self.shape or not self.block_rows:
      return self.shape
    return (self.block_rows, *self.shape[1:])

  def blocks(self):
    """(index into the array, block), in order."""
    if not self.shape or not self.block_rows:
      yield ..., self.make_block(0, self.shape[0] if self.shape else 0)
      return
    for start in range(0, self.shape[0], self.block_rows):
      stop = min(start + self.block_rows, self.shape[0])
      yield slice(start, stop), self.make_block(start, stop)


class StreamedArrayHandler(type_handlers.NumpyHandler):
  """Orbax's NumPy-array handler for `StreamedArray`s: each array is stored chunked by its
  blocks, and the arrays and their blocks are written one at a time."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def serialize(self, values: Sequence[StreamedArray], infos, args=None):
    args = args or [type_handlers.SaveArgs()] * len(values)
    return [
      CommitFutureAwaitingContractedSignals(
        self._write_in_turn(values, infos, args), name="streamed_array_handler"
      )
    ]

  async def _write_in_turn(self, values, infos, args) -> None:
    """Writes `values` one after another, each block by block, from process 0 only (host
    arrays are the same on every process)."""
    if multihost.process_index() != 0:
      return
    for value, info, arg in zip(values, infos, args, strict=True):
      await info.await_path_creation()
      spec = type_handlers.get_json_tspec_write(
        info=info,
        arg=arg,
        global_shape=value.shape,
        local_shape=value.block_shape(),  # the chunk: one block
        dtype=np.dtype(value.dtype),
        use_ocdbt=info.is_ocdbt_checkpoint,
        process_index=(
          (self._override_ocdbt_process_id or multihost.process_index())
          if info.is_ocdbt_checkpoint
          else None
        ),
        metadata_key=self._metadata_key,
      )
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
      for index, block in value.blocks():
        if block.shape != store[index].shape:
          raise ValueError(
            f"{info.name}: a block of shape {block.shape} for rows {index} of {value.shape}."
          )
        # The block is not touched again, so TensorStore may write from it without a copy.
        await store[index].write(block, can_reference_source_data_indefinitely=True)
        del block  # before the next block is made
