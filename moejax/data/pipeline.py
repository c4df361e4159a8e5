"""Train and eval batches for a run: from token stores (`moejax.data.windows`), or packed
byte windows of a TFDS split held in memory (the embedded corpora's original path).

A batch holds `inputs` and `targets` int32 `[batch, seq_len]` (targets = inputs shifted by
one token); batches from token stores add `segment_ids`, `positions` and `loss_mask`, and
every eval batch has `target_bytes`, the UTF-8 bytes each target token carries (for bits
per byte). Global batch `t` is split into `shard_count` consecutive blocks of
`global_batch_size // shard_count` rows; process `shard_index` gets block `shard_index`.
"""

import grain
import ml_collections
import numpy as np

from moejax.data import token_data
from moejax.data.packing import pack_documents, split_inputs_targets
from moejax.data.shakespeare import NAME as SHAKESPEARE_NAME
from moejax.data.sources import check_dataset, load_split
from moejax.data.windows import process_rows

# Elements are cheap slices of an in-memory array: two threads and a short
# prefetch queue are plenty (grain's defaults are 16 threads, 500 batches).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _per_process_batch_size(global_batch_size: int, shard_index: int, shard_count: int) -> int:
  rows = process_rows(global_batch_size, shard_index, shard_count)
  return rows.stop - rows.start


def make_train_iterator(
  windows: np.ndarray,
  *,
  global_batch_size: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.DatasetIterator:
  """Infinite, deterministic, checkpointable iterator over this process's batches.

  Args:
    windows: int32 `[num_windows, seq_len + 1]`, from `pack_documents`.
    global_batch_size: rows per step summed over all processes.
    seed: shuffle seed; every epoch visits all windows in a new order.
    shard_index, shard_count: this process and the number of processes.

  Returns:
    A grain iterator of `{'inputs', 'targets'}` int32
    `[global_batch_size // shard_count, seq_len]`. `get_state()` returns a
    small dict; `set_state(state)` on a fresh iterator (same arguments)
    resumes with exactly the batches that followed `state`.
  """
  batch_size = _per_process_batch_size(global_batch_size, shard_index, shard_count)
  if len(windows) == 0:
    raise ValueError("make_train_iterator: no windows (train split shorter than seq_len + 1)")
  dataset = (
    grain.MapDataset.source(windows)
    .shuffle(seed=seed)
    .repeat()  # each epoch is reshuffled with a seed derived from the epoch
    .batch(batch_size, drop_remainder=True)[shard_index::shard_count]
    .map(split_inputs_targets)
  )
  return iter(dataset.to_iter_dataset(_READ_OPTIONS))


def make_eval_batches(
  windows: np.ndarray,
  *,
  global_batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  max_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
  """This process's share of the eval batches, in window order (no shuffle).

  Covers the first `num_batches * global_batch_size` windows, where
  `num_batches = len(windows) // global_batch_size`, capped at `max_batches`;
  the last partial global batch is dropped so every batch has the same shape.

  Returns:
    A list of `{'inputs', 'targets'}` int32 `[global_batch_size // shard_count,
    seq_len]`, the same length on every process.
  """
  batch_size = _per_process_batch_size(global_batch_size, shard_index, shard_count)
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
  num_batches = len(windows) // global_batch_size
  if num_batches < 1:
    raise ValueError(too_few_eval_windows(len(windows), windows.shape[-1] - 1, global_batch_size))
  if max_batches is not None:
    num_batches = min(num_batches, max_batches)
  blocks = windows[: num_batches * global_batch_size].reshape(
    num_batches, shard_count, batch_size, windows.shape[-1]
  )
  batches = [split_inputs_targets(block) for block in blocks[:, shard_index]]
  for batch in batches:  # byte ids carry one byte each; PAD, BOS and EOS none
    batch["target_bytes"] = (batch["targets"] < 256).astype(np.int32)
  return batches


def too_few_eval_windows(num_windows: int, seq_len: int, global_batch_size: int) -> str:
  """The one-line error for an eval split of `num_windows` windows of `seq_len + 1` tokens,
  fewer than one global batch: the keys to change, and the values that would fit."""
  fits = []
  if num_windows >= 1:
    fits.append(f"train.batch_size <= {num_windows}")
  longest = num_windows * (seq_len + 1) // global_batch_size - 1  # about: the tail is dropped
  if longest >= 1:
    fits.append(f"train.seq_len <= {longest}")
  fits.append("a larger data.eval_split")
  return (
    f"the eval split holds {num_windows} windows of train.seq_len + 1 = {seq_len + 1} tokens, "
    f"fewer than one global batch of train.batch_size={global_batch_size}; what fits: "
    f"{' or '.join(fits)}."
  )


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields read by `build_datasets`, with their defaults."""
  return ml_collections.ConfigDict(
    {
      "name": SHAKESPEARE_NAME,  # TFDS dataset name, e.g. 'lm1b', 'c4/en'
      "data_dir": ml_collections.config_dict.placeholder(str),  # None: default
      "text_key": "text",  # the feature holding the document text
      "train_split": "train",  # TFDS split (slices too: 'validation[:50%]': two of four plays)
      "eval_split": "validation",  # lm1b has only 'train' and 'test'
      "eval_batches": 16,  # max global eval batches per evaluation
      # Token stores (`python -m moejax.data.prepare`); set, they replace name/splits.
      "tokens_dir": ml_collections.config_dict.placeholder(str),  # a token store to train on
      "eval_tokens_dir": ml_collections.config_dict.placeholder(str),  # a store to evaluate on
      "eval_fraction": ml_collections.config_dict.placeholder(float),  # or this tail held out
      "mixture": ml_collections.config_dict.placeholder(str),  # 'DIR=WEIGHT,DIR=WEIGHT,...'
      "tokenizer": ml_collections.config_dict.placeholder(
        str
      ),  # None: the store's; else must match it
      "packing": "window",  # window: pretraining; first_fit, best_fit: whole documents
      "document_masking": True,  # attend within a document only; positions restart per document
      "workers": 2,  # threads that read token-store batches ahead of the step
    }
  )


def check_data(data_config: ml_collections.ConfigDict) -> None:
  """What `build_datasets` would refuse about `data_config`, found without reading,
  preparing or downloading any data (for `--dry_run`, and before a run writes anything):
  `data.eval_batches`, and, for TFDS data, the dataset `data.name` (prepared, or an
  embedded corpus that builds offline) and both splits (`sources.check_dataset`). Token
  stores are checked where the vocabulary is resolved (`token_data.resolve_vocab_size`)."""
  if data_config.eval_batches < 1:
    raise ValueError(f"config.data.eval_batches={data_config.eval_batches} must be >= 1.")
  if token_data.uses_token_stores(data_config):
    return
  check_dataset(
    data_config.name,
    data_config.data_dir,
    {
      "config.data.train_split": data_config.train_split,
      "config.data.eval_split": data_config.eval_split,
    },
  )


def build_datasets(
  data_config: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seq_len: int,
  seed: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> tuple[grain.DatasetIterator, list[dict[str, np.ndarray]]]:
  """Returns (train iterator, eval batches) for this process.

  `data_config` has the fields of `default_data_config()`. The train iterator
  is `make_train_iterator` over `data_config.train_split`; the eval batches are
  `make_eval_batches` over `data_config.eval_split`, at most
  `data_config.eval_batches` of them. Both yield per-process batches
  `[global_batch_size // shard_count, seq_len]`.
  """
  if data_config.eval_batches < 1:
    raise ValueError(f"data.eval_batches must be >= 1, got {data_config.eval_batches}")
  if token_data.uses_token_stores(data_config):
    return token_data.build(
      data_config,
      global_batch_size=global_batch_size,
      seq_len=seq_len,
      seed=seed,
      shard_index=shard_index,
      shard_count=shard_count,
    )

  def windows(key: str) -> np.ndarray:
    split = data_config[key]
    try:
      texts = load_split(
        data_config.name, split, data_config.data_dir, text_key=data_config.text_key
      )
    except ValueError as error:  # an unknown split, or a slice without records
      raise ValueError(f"config.data.{key}={split!r}: {' '.join(str(error).split())}") from None
    return pack_documents(texts, seq_len)

  held_out, train_windows = windows("eval_split"), windows("train_split")
  if len(train_windows) == 0:
    raise ValueError(
      f"config.data.train_split={data_config.train_split!r} holds fewer than train.seq_len + 1 "
      f"= {seq_len + 1} tokens."
    )
  train = make_train_iterator(
    train_windows,
    global_batch_size=global_batch_size,
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  try:
    eval_batches = make_eval_batches(
      held_out,
      global_batch_size=global_batch_size,
      shard_index=shard_index,
      shard_count=shard_count,
      max_batches=data_config.eval_batches,
    )
  except ValueError as error:
    raise ValueError(f"config.data.eval_split={data_config.eval_split!r}: {error}") from None
  return train, eval_batches
