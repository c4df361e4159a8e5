"""Fine-tuning batches from a token store: whole documents packed into rows by grain's
first-fit or best-fit packers, padding the rest.

Each process takes every `shard_count`-th document of a seeded permutation of the store's
training documents (reshuffled each epoch), packs them into rows of `seq_len + 1` tokens
(a document with its EOS never crosses a row), and batches its own rows; no process reads
another's documents. The iterator's state (grain's, a small dict) differs per process: the
checkpoint keeps one entry per process (`moejax.training.data_position`).

Rows of a batch, as from `moejax.data.windows`:
    inputs, targets   int32 `[rows, seq_len]`, targets = inputs shifted by one token
    segment_ids       int32 `[rows, seq_len]`: 1, 2, ... per packed document; 0 padding
    positions         int32 `[rows, seq_len]`: each token's place in its document
    loss_mask         int32 `[rows, seq_len]`: 1 where the target is the next token of the
                      same document (no loss on padding, nor across a document's end)
"""

from __future__ import annotations

import grain
import numpy as np

from moejax.data.store import TokenStore

PACKERS = {
  "first_fit": grain.experimental.FirstFitPackIterDataset,
  "best_fit": grain.experimental.BestFitPackIterDataset,
}


class Documents:
  """Documents `[first, stop)` of `store`, each with its EOS: int32 `[length]`."""

  def __init__(self, store: TokenStore, first: int, stop: int):
    self.store, self.first, self.stop = store, first, stop

  def __len__(self) -> int:
    return self.stop - self.first

  def __getitem__(self, i: int) -> np.ndarray:
    return self.store.document(self.first + int(i), with_eos=True)

  def longest(self, chunk: int = 1 << 20) -> int:
    """The most tokens of a document with its EOS, read `chunk` document ends at a time."""
    ends, longest = self.store.document_ends, 0
    for begin in range(self.first, self.stop, chunk):
      stop = min(begin + chunk, self.stop)
      previous = int(ends[begin - 1]) if begin else 0
      block = np.asarray(ends[begin:stop], np.int64)
      longest = max(longest, int(np.max(np.diff(block, prepend=previous))))
    return longest


def documents_before(store: TokenStore, token: int) -> int:
  """How many documents of `store` end at or before token offset `token` (a boundary)."""
  return int(np.searchsorted(store.document_ends, token, side="right"))


def process_documents(
  num_documents: int, seed: int, shard_index: int, shard_count: int
) -> grain.MapDataset:
  """The document indices process `shard_index` packs, in order, forever: every
  `shard_count`-th of a seeded permutation reshuffled each epoch."""
  order = grain.MapDataset.range(num_documents).shuffle(seed=seed).repeat()
  return order[shard_index::shard_count]


def rows_of(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed rows `[..., seq_len + 1]` (`tokens`, `tokens_segment_ids`,
  `tokens_positions`) as a model batch (see the module docstring)."""
  tokens, segments = packed["tokens"], packed["tokens_segment_ids"]
  same = (segments[..., 1:] == segments[..., :-1]) & (segments[..., :-1] > 0)
  return {
    "inputs": tokens[..., :-1].astype(np.int32),
    "targets": tokens[..., 1:].astype(np.int32),
    "segment_ids": segments[..., :-1].astype(np.int32),
    "positions": packed["tokens_positions"][..., :-1].astype(np.int32),
    "loss_mask": same.astype(np.int32),
  }


def train_iterator(
  documents: Documents,
  *,
  packing: str,
  seq_len: int,
  batch_size: int,
  seed: int,
  pad_id: int,
  shard_index: int = 0,
  shard_count: int = 1,
  threads: int = 2,
) -> grain.DatasetIterator:
  """This process's packed batches `[batch_size, seq_len]`, forever. A document longer than
  `seq_len + 1` tokens with its EOS is refused in one line (packing keeps documents whole)."""
  longest = documents.longest()
  if longest > seq_len + 1:
    raise ValueError(
      f"data.packing={packing}: a document of {longest} tokens (with its EOS) does not fit "
      f"train.seq_len={seq_len} + 1; packing keeps documents whole: raise train.seq_len, or "
      "use data.packing=window."
    )
  if len(documents) < shard_count:
    raise ValueError(f"{len(documents)} documents cannot feed {shard_count} processes.")
  mine = process_documents(len(documents), seed, shard_index, shard_count)
  mine = mine.map(lambda i: {"tokens": documents[i]})
  # Reading a document is a memory-map slice: a short queue (grain measures its depth per
  # element, so a long one costs more than it saves).
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=16)
  packed = PACKERS[packing](
    mine.to_iter_dataset(options),
    length_struct={"tokens": seq_len + 1},
    num_packing_bins=batch_size,
    seed=seed,
    padding_struct={"tokens": pad_id},
  )
  return iter(packed.batch(batch_size, drop_remainder=True).map(rows_of))
