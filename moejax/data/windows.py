"""Pretraining batches from token stores: seeded windows, each global batch a pure function
of (seed, batch index), each process reading only its own rows from memory maps.

A window is `seq_len + 1` consecutive tokens of a store's flat stream, starting at a
multiple of `seq_len` (consecutive windows share one token, so every token of the region is
a target once). The windows of a region are visited in a seeded permutation, reshuffled
every epoch (grain's `MapDataset.shuffle(...).repeat()`, which permutes indices without
materialising them).

Rows of a batch:
    inputs, targets   int32 `[rows, seq_len]`, targets = inputs shifted by one token
    segment_ids       int32 `[rows, seq_len]`, 1, 2, ... for the documents the window
                      meets, in order (the EOS ending a document belongs to it)
    positions         int32 `[rows, seq_len]`, each token's place in its document's part
                      of the window: 0 at the window's start and after every document end
    loss_mask         int32 `[rows, seq_len]`, 1 for every target (windows hold no padding;
                      the target after a document's EOS is the next document's first
                      token, its prediction from a document's end)
Without document masking, rows have no `segment_ids` and `positions`: the model reads each
row as one sequence.
Segment ids and positions come from the document ends with `np.searchsorted`, vectorised.

A mixture draws each global batch's rows from several stores by weight: with cumulative
weights W_j, source j supplies the rows `floor(t·W_j) - floor(t·W_{j-1})` summed to row
t, so after any number of batches every source has supplied its share to within one row,
and how many rows of each source came before batch b is known without replaying the
batches. A seeded permutation per batch then mixes the rows, so that every process gets
its share of every source.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np

from moejax.data.store import TokenStore


@dataclasses.dataclass(frozen=True)
class Region:
  """The tokens `[begin, end)` of `store`, cut into windows of `seq_len + 1`."""

  store: TokenStore
  begin: int
  end: int
  seq_len: int

  @property
  def num_windows(self) -> int:
    return max(0, (self.end - self.begin - 1) // self.seq_len)

  def rows(self, windows: np.ndarray, document_masking: bool) -> dict[str, np.ndarray]:
    """The batch rows (see the module docstring) of window indices `windows` `[rows]`."""
    seq = self.seq_len
    starts = self.begin + np.asarray(windows, np.int64) * seq  # [rows]
    tokens = np.asarray(self.store.tokens[starts[:, None] + np.arange(seq + 1)], np.int32)
    rows = len(starts)
    ones = np.ones((rows, seq), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones}
    if not document_masking:
      return batch
    ends = self.store.document_ends
    first = np.searchsorted(ends, starts, side="right")  # the document of each first input
    last = np.searchsorted(ends, starts + seq - 1, side="right")  # ... and of the last
    counts = last - first  # document ends inside each window's inputs
    total = int(counts.sum())
    row_of = np.repeat(np.arange(rows), counts)
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    offsets = np.asarray(ends[np.repeat(first, counts) + within]) - starts[row_of]  # [total]
    marks = np.zeros((rows, seq), np.int32)
    marks[row_of, offsets] = 1  # 1 at the first token of every later document
    batch["segment_ids"] = 1 + np.cumsum(marks, axis=1, dtype=np.int32)
    place = np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq))
    batch["positions"] = place - np.maximum.accumulate(np.where(marks > 0, place, 0), axis=1)
    return batch


def split_regions(store: TokenStore, seq_len: int, eval_fraction: float) -> tuple[Region, Region]:
  """(train, eval) regions of one store: the last `eval_fraction` of its tokens, from a
  document boundary, is held out (no document is in both)."""
  if not 0 < eval_fraction < 1:
    raise ValueError(f"data.eval_fraction={eval_fraction} must be in (0, 1).")
  target = (1 - eval_fraction) * store.num_tokens
  last = min(int(np.searchsorted(store.document_ends, target)), len(store) - 1)
  cut = int(store.document_ends[last])
  return Region(store, 0, cut, seq_len), Region(store, cut, store.num_tokens, seq_len)


def whole_region(store: TokenStore, seq_len: int) -> Region:
  return Region(store, 0, store.num_tokens, seq_len)


def _cumulative(weights: list[float]) -> np.ndarray:
  if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(
      f"data.mixture weights {weights} must be finite, >= 0 and sum to a positive number."
    )
  cumulative = np.cumsum(np.asarray(weights, np.float64)) / sum(weights)
  cumulative[-1] = 1.0
  return np.concatenate([[0.0], cumulative])


class MixtureBatches:
  """Global batch b of a weighted mixture of regions, as a pure function of (seed, b)."""

  def __init__(
    self,
    regions: list[Region],
    weights: list[float],
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    document_masking: bool = True,
  ):
    self.cumulative = _cumulative(weights)
    for region, weight in zip(regions, weights, strict=True):
      if weight > 0 and region.num_windows == 0:
        raise ValueError(
          f"token store {region.store.directory} has fewer than seq_len + 1 = "
          f"{region.seq_len + 1} tokens in this split: no window fits."
        )
    self.regions, self.global_batch_size = regions, global_batch_size
    self.seed, self.shuffle, self.document_masking = seed, shuffle, document_masking
    # Window order per region: a seeded permutation, reshuffled each epoch.
    self.orders = [
      grain.MapDataset.range(max(r.num_windows, 1)).shuffle(seed=seed + 7919 * j).repeat()
      if shuffle
      else grain.MapDataset.range(max(r.num_windows, 1)).repeat()
      for j, r in enumerate(regions)
    ]

  def _rows_before(self, t: int) -> np.ndarray:
    """int64 `[sources]`: rows each source supplied to the first `t` rows of the run."""
    quota = np.floor(t * self.cumulative).astype(np.int64)
    return np.diff(quota)

  def batches_within(self, limit: int) -> int:
    """How many of the first `limit` global batches draw no window twice."""
    sizes = np.array([r.num_windows for r in self.regions])
    count = limit
    while count > 0 and np.any(self._rows_before(count * self.global_batch_size) > sizes):
      count -= 1
    return count

  def rows(self, b: int, row_slice: slice) -> dict[str, np.ndarray]:
    """Rows `row_slice` of global batch b."""
    B = self.global_batch_size
    before, after = self._rows_before(b * B), self._rows_before((b + 1) * B)
    source = np.repeat(np.arange(len(self.regions)), after - before)  # [B], by source
    ordinal = np.concatenate([np.arange(s, e) for s, e in zip(before, after, strict=True)])  # [B]
    if self.shuffle:
      mix = np.random.default_rng([self.seed, b]).permutation(B)
      source, ordinal = source[mix], ordinal[mix]
    source, ordinal = source[row_slice], ordinal[row_slice]
    parts, where = [], []
    for j in np.unique(source):
      picked = np.flatnonzero(source == j)
      windows = np.array([self.orders[j][int(o)] for o in ordinal[picked]], np.int64)
      parts.append(self.regions[j].rows(windows, self.document_masking))
      where.append(picked)
    order = np.argsort(np.concatenate(where), kind="stable")
    return {key: np.concatenate([p[key] for p in parts])[order] for key in parts[0]}


def process_rows(global_batch_size: int, shard_index: int, shard_count: int) -> slice:
  """This process's rows of every global batch: the `shard_index`-th of `shard_count`
  consecutive blocks."""
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
  if global_batch_size < 1 or global_batch_size % shard_count:
    raise ValueError(
      f"train.batch_size (global_batch_size={global_batch_size}) must be a positive multiple "
      f"of the processes (shard_count={shard_count})."
    )
  size = global_batch_size // shard_count
  return slice(shard_index * size, (shard_index + 1) * size)


def train_iterator(
  batches: MixtureBatches, rows: slice, *, threads: int = 2
) -> grain.DatasetIterator:
  """This process's rows of global batches 0, 1, 2, ..., prefetched by `threads` threads.
  Checkpointable: `get_state()` is the next batch index, and `set_state` resumes there."""
  dataset = grain.MapDataset.range(0, 1 << 62).map(lambda b: batches.rows(int(b), rows))
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(
  batches: MixtureBatches,
  rows: slice,
  num_batches: int,
  token_bytes: np.ndarray,
  *,
  eos_id: int,
  count_document_starts: bool = True,
) -> list[dict[str, np.ndarray]]:
  """This process's rows of the first `num_batches` global batches of an unshuffled
  mixture, each with `target_bytes` `[rows, seq_len]`: the UTF-8 bytes each target carries.
  Without `count_document_starts`, `loss_mask` leaves out the targets after an EOS (the
  next document's first token), as packed training does."""
  out = []
  for b in range(num_batches):
    batch = batches.rows(b, rows)
    batch["target_bytes"] = token_bytes[batch["targets"]]
    if not count_document_starts:
      batch["loss_mask"] = (batch["inputs"] != eos_id).astype(np.int32)
    out.append(batch)
  return out
