"""A run's data from token stores: the `config.data` keys read, checked and turned into
this process's train iterator and eval batches (`moejax.data.windows`).

    data.tokens_dir      one store to train on, or
    data.mixture         'DIR=WEIGHT,DIR=WEIGHT,...': several, each batch's rows by weight
    data.eval_tokens_dir a store to evaluate on, or
    data.eval_fraction   the last fraction of every training store's tokens, held out
    data.tokenizer       None: the stores'; else the kind they must have been prepared with
    data.packing         'window' (seeded windows over the token stream, pretraining), or
                         'first_fit' / 'best_fit' (whole documents packed by grain,
                         fine-tuning; `moejax.data.packed`)
    data.document_masking, data.workers

Every store of a run must share one tokenizer (the same fingerprint).
"""

from __future__ import annotations

import ml_collections
import numpy as np
from etils import epath

from moejax.data import packed, windows
from moejax.data.byte_tokenizer import VOCAB_SIZE as BYTE_VOCAB_SIZE
from moejax.data.store import TokenStore
from moejax.data.tokenizer import load_tokenizer
from moejax.data.tokenizer.kinds import hf_fingerprint

PACKINGS = ("window", "first_fit", "best_fit")


def batch_keys(data_config) -> tuple[str, ...]:
  """The arrays of a training batch from token stores, each int32 `[batch, seq_len]`:
  with document masking, the segment ids and positions the model masks attention by."""
  keys = ("inputs", "targets", "loss_mask")
  return keys + (("segment_ids", "positions") if data_config.document_masking else ())


def per_process_position(data_config) -> bool:
  """Whether each process's data iterator stands somewhere of its own (packed batches),
  rather than at the shared batch index (windows, the byte pipeline)."""
  return uses_token_stores(data_config) and data_config.packing != "window"


def uses_token_stores(data_config: ml_collections.ConfigDict) -> bool:
  return bool(data_config.tokens_dir or data_config.mixture)


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """`'DIR=WEIGHT,DIR=WEIGHT'` as `[(dir, weight)]`; one line naming the setting if malformed."""
  pairs = []
  for item in text.split(","):
    directory, sep, weight = item.strip().rpartition("=")
    try:
      value = float(weight)
    except ValueError:
      value = None
    if not sep or not directory or value is None:
      raise ValueError(
        f"data.mixture={text!r}: each entry is DIR=WEIGHT, comma-separated (got {item!r})."
      )
    pairs.append((directory, value))
  return pairs


def training_stores(data_config) -> list[tuple[TokenStore, float]]:
  """The stores a run trains on with their weights, checked to share one tokenizer (and
  the one `data.tokenizer` names, when it names one)."""
  if data_config.tokens_dir and data_config.mixture:
    raise ValueError("set data.tokens_dir or data.mixture, not both.")
  if data_config.packing not in PACKINGS:
    raise ValueError(f"data.packing={data_config.packing!r}; allowed: {', '.join(PACKINGS)}.")
  pairs = (
    parse_mixture(data_config.mixture) if data_config.mixture else [(data_config.tokens_dir, 1.0)]
  )
  stores = [(TokenStore(directory), weight) for directory, weight in pairs]
  _check_tokenizers([s for s, _ in stores], data_config.tokenizer)
  return stores


def _check_tokenizers(stores: list[TokenStore], expected: str | None) -> None:
  first = stores[0]
  for store in stores[1:]:
    if store.tokenizer_fingerprint != first.tokenizer_fingerprint:
      raise ValueError(
        f"token stores {first.directory} ({first.meta['tokenizer']}) and {store.directory} "
        f"({store.meta['tokenizer']}) were prepared with different tokenizers."
      )
  if expected:
    fingerprint = load_tokenizer(expected).fingerprint()
    if fingerprint != first.tokenizer_fingerprint:
      raise ValueError(
        f"data.tokenizer={expected} is not the tokenizer token store {first.directory} was "
        f"prepared with ({first.meta['tokenizer']}); prepare the store with it, or unset "
        "data.tokenizer."
      )


def run_tokenizer(data_config):
  """The tokenizer of a run's token stores (from the first store's copy of its file)."""
  return training_stores(data_config)[0][0].tokenizer


def run_tokenizer_files(data_config) -> dict[str, str]:
  """The files of a run's tokenizer by name (none for bytes, or without token stores)."""
  return run_tokenizer(data_config).files() if uses_token_stores(data_config) else {}


def check_init_from_tokenizer(data_config, init_from: str | None) -> None:
  """A run that starts from a run holding its `tokenizer.json` (an import's, or a run on
  token stores) trains on text in that vocabulary: token stores prepared with the same
  file (same fingerprint), one line otherwise. `init_from` may be any etils path."""
  if not init_from or not (epath.Path(init_from) / "tokenizer.json").exists():
    return
  kind = f"hf:{init_from}"
  if not uses_token_stores(data_config):
    raise ValueError(
      f"train.init_from={init_from} holds its own tokenizer.json: fine-tune it on a token "
      f"store prepared with it (python -m moejax.data.prepare --tokenizer={kind} ...; "
      "data.tokens_dir=DIR), not on bytes."
    )
  store = training_stores(data_config)[0][0]
  names = ("tokenizer.json", "tokenizer_config.json")
  files = [epath.Path(init_from) / name for name in names]
  if hf_fingerprint(f.read_bytes() for f in files if f.exists()) != store.tokenizer_fingerprint:
    raise ValueError(
      f"token store {store.directory} was prepared with {store.meta['tokenizer']}, not with "
      f"the tokenizer.json of train.init_from={init_from}; prepare it with --tokenizer={kind}."
    )


def resolve_vocab_size(config: ml_collections.ConfigDict) -> str | None:
  """Sets `model.vocab_size` from the stores' tokenizer where it is the byte vocabulary
  (the default) and the stores are not bytes; refuses a vocabulary smaller than the
  tokenizer's. Returns a note of what changed, or None. A config without stores reads
  bytes: a `data.tokenizer` other than `bytes` is refused there (it would do nothing)."""
  if not uses_token_stores(config.data):
    kind = config.data.tokenizer
    if kind and kind != "bytes":
      load_tokenizer(kind)  # a missing file is named first
      raise ValueError(
        f"data.tokenizer={kind}: text in that tokenizer is read from token stores; prepare "
        f"one (python -m moejax.data.prepare --tokenizer={kind} --source=... --out=DIR) and "
        "set data.tokens_dir=DIR."
      )
    return None
  store = training_stores(config.data)[0][0]
  model_vocab = config.model.vocab_size
  if store.vocab_size != BYTE_VOCAB_SIZE and model_vocab == BYTE_VOCAB_SIZE:
    config.model.vocab_size = store.vocab_size
    return f"model.vocab_size={store.vocab_size}, from token store {store.directory}'s tokenizer"
  if model_vocab < store.vocab_size:
    raise ValueError(
      f"model.vocab_size={model_vocab} is smaller than the vocabulary of {store.vocab_size} of "
      f"token store {store.directory} ({store.meta['tokenizer']}); set "
      f"model.vocab_size={store.vocab_size}."
    )
  return None


def _eval_regions(data_config, stores, seq_len) -> tuple[list, list, list[float]]:
  """(train regions, eval regions, eval weights)."""
  if data_config.eval_tokens_dir and data_config.eval_fraction is not None:
    raise ValueError("set data.eval_tokens_dir or data.eval_fraction, not both.")
  if data_config.eval_tokens_dir:
    eval_store = TokenStore(data_config.eval_tokens_dir)
    _check_tokenizers([stores[0][0], eval_store], None)
    train = [windows.whole_region(s, seq_len) for s, _ in stores]
    return train, [windows.whole_region(eval_store, seq_len)], [1.0]
  if data_config.eval_fraction is None:
    raise ValueError(
      "a run on token stores needs data.eval_tokens_dir (a store to evaluate on) or "
      "data.eval_fraction (the tail of each store held out, e.g. 0.05)."
    )
  split = [windows.split_regions(s, seq_len, data_config.eval_fraction) for s, _ in stores]
  return [t for t, _ in split], [e for _, e in split], [w for _, w in stores]


def build(data_config, *, global_batch_size, seq_len, seed, shard_index=0, shard_count=1):
  """(train iterator, eval batches) of this process; see `moejax.data.pipeline`. Held-out
  tokens are evaluated in windows whatever the packing."""
  stores = training_stores(data_config)
  rows = windows.process_rows(global_batch_size, shard_index, shard_count)
  train_regions, _, _ = _eval_regions(data_config, stores, seq_len)
  if data_config.packing == "window":
    train = windows.MixtureBatches(
      train_regions,
      [w for _, w in stores],
      global_batch_size=global_batch_size,
      seed=seed,
      document_masking=bool(data_config.document_masking),
    )
    iterator = windows.train_iterator(train, rows, threads=data_config.workers)
  else:
    iterator = _packed_iterator(
      data_config, train_regions, seq_len, seed, rows, shard_index, shard_count
    )
  evaluation = eval_batches(
    data_config,
    global_batch_size=global_batch_size,
    seq_len=seq_len,
    max_batches=data_config.eval_batches,
    shard_index=shard_index,
    shard_count=shard_count,
  )
  return iterator, evaluation


def _packed_iterator(data_config, regions, seq_len, seed, rows, shard_index, shard_count):
  if len(regions) > 1:
    raise ValueError(
      f"data.packing={data_config.packing} packs one store; data.mixture needs data.packing=window."
    )
  if not data_config.document_masking:
    raise ValueError(
      f"data.packing={data_config.packing} packs whole documents, which only attend to "
      "themselves: it needs data.document_masking=True."
    )
  region = regions[0]
  documents = packed.Documents(region.store, 0, packed.documents_before(region.store, region.end))
  return packed.train_iterator(
    documents,
    packing=data_config.packing,
    seq_len=seq_len,
    batch_size=rows.stop - rows.start,
    seed=seed,
    pad_id=region.store.tokenizer.pad_id,
    shard_index=shard_index,
    shard_count=shard_count,
    threads=data_config.workers,
  )


def eval_batches(
  data_config, *, global_batch_size, seq_len, max_batches, shard_index=0, shard_count=1
) -> list[dict[str, np.ndarray]]:
  """This process's rows of the first `max_batches` global batches of the held-out tokens,
  in order (as many as fit without drawing a window twice), with `target_bytes`; a
  packed run's leave out the targets after an EOS, as its training does."""
  stores = training_stores(data_config)
  rows = windows.process_rows(global_batch_size, shard_index, shard_count)
  _, eval_regions, eval_weights = _eval_regions(data_config, stores, seq_len)
  held_out = windows.MixtureBatches(
    eval_regions,
    eval_weights,
    global_batch_size=global_batch_size,
    seed=0,
    shuffle=False,
    document_masking=bool(data_config.document_masking),
  )
  count = held_out.batches_within(max_batches)
  if count < 1:
    raise ValueError(
      f"the eval tokens hold fewer than one global batch of {global_batch_size} windows of "
      f"{seq_len + 1} tokens; hold out more (data.eval_fraction) or lower train.batch_size."
    )
  tokenizer = stores[0][0].tokenizer
  return windows.eval_batches(
    held_out,
    rows,
    count,
    np.asarray(tokenizer.token_bytes(), np.int32),
    eos_id=tokenizer.eos_id,
    count_document_starts=data_config.packing == "window",  # as training counts them
  )
