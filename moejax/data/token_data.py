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

import json

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
  """Refuses, in one line, data whose token ids mean something else to the model that
  `train.init_from` (any etils path) starts from: `check_model_data`'s rule."""
  if init_from:
    check_model_data(data_config, init_from)


def check_model_data(
  data_config,
  directory: str,
  *,
  key: str = "config.train.init_from",
  use: str = "fine-tune",
  store_key: str = "data.tokens_dir",
) -> None:
  """Refuses, in one line naming `key` (the setting that names `directory`) and
  `store_key` (the one that names a token store), data whose token ids mean something
  else to the model of the run, import or upcycle `directory` (any etils path). The rule:

  * `directory` holds its `tokenizer.json` (an import's, or a run's on token stores): the
    data is token stores prepared with that same file (same fingerprint).
  * Else, a run or upcycle whose saved config reads bytes is a byte model: the data is
    bytes (no stores, or stores prepared with `bytes`).
  * Else (an import without its tokenizer, or a config naming a tokenizer whose file is
    gone), the ids are the source's: bytes are refused unless the model's vocabulary is the
    byte one, and token stores are taken on trust.

  Every store's vocabulary must fit in the model's (`model.vocab_size` of `directory`'s
  saved `config.json`): a model whose vocabulary is padded past its tokenizer's (published
  configs round it up) is allowed. Without a readable `config.json` only the first rule
  applies (loading the model reports a directory without a model). `use` is the verb of
  the hints (fine-tune, score)."""
  root = epath.Path(directory)
  where = f"{key}={directory}"
  if (root / "tokenizer.json").exists():
    _check_own_tokenizer(data_config, directory, where, use, store_key)
    return
  saved = _saved_config(root)
  if saved is None:
    return
  vocab = saved.get("model", {}).get("vocab_size")
  saved_tokenizer = saved.get("data", {}).get("tokenizer")
  byte_model = not (root / "import.json").exists() and saved_tokenizer in (None, "bytes")
  if not uses_token_stores(data_config):
    if not byte_model and vocab != BYTE_VOCAB_SIZE:
      raise ValueError(
        f"{where} has a vocabulary of {vocab} tokens and no tokenizer.json, so byte ids mean "
        f"nothing to it: put its source's tokenizer.json in {directory} and {use} it on a "
        f"token store prepared with it (python -m moejax.data.prepare "
        f"--tokenizer=hf:{directory} ...; {store_key}=DIR)."
      )
    return
  store = training_stores(data_config)[0][0]
  if byte_model and store.tokenizer_fingerprint != load_tokenizer("bytes").fingerprint():
    raise ValueError(
      f"{where} is a byte model (no tokenizer.json), but token store {store.directory} "
      f"({store_key}) was prepared with {store.meta['tokenizer']}; {use} it on bytes, or on "
      "a store prepared with --tokenizer=bytes."
    )
  if isinstance(vocab, int) and store.vocab_size > vocab:
    raise ValueError(
      f"{where} has a vocabulary of {vocab} tokens, fewer than the {store.vocab_size} of "
      f"token store {store.directory} ({store_key}, {store.meta['tokenizer']}); prepare the "
      "store with the model's own tokenizer."
    )


def _saved_config(root: epath.Path) -> dict | None:
  """The `config.json` a run, import or upcycle directory saved, or None (none, unreadable)."""
  try:
    saved = json.loads((root / "config.json").read_text())
  except (OSError, ValueError):
    return None
  return saved if isinstance(saved, dict) else None


def _check_own_tokenizer(data_config, directory: str, where: str, use: str, store_key) -> None:
  """`directory` holds a tokenizer.json: the data is a token store prepared with it."""
  kind = f"hf:{directory}"
  if not uses_token_stores(data_config):
    raise ValueError(
      f"{where} holds its own tokenizer.json: {use} it on a token store prepared with it "
      f"(python -m moejax.data.prepare --tokenizer={kind} ...; {store_key}=DIR), not on bytes."
    )
  store = training_stores(data_config)[0][0]
  names = ("tokenizer.json", "tokenizer_config.json")
  files = [epath.Path(directory) / name for name in names]
  if hf_fingerprint(f.read_bytes() for f in files if f.exists()) != store.tokenizer_fingerprint:
    raise ValueError(
      f"token store {store.directory} ({store_key}) was prepared with "
      f"{store.meta['tokenizer']}, not with the tokenizer.json of {where}; prepare it with "
      f"--tokenizer={kind}."
    )


def resolve_vocab_size(config: ml_collections.ConfigDict) -> str | None:
  """Sets `model.vocab_size` from the stores' tokenizer where it is the byte vocabulary
  (the default) and the stores are not bytes; refuses a vocabulary smaller than the
  tokenizer's. Returns a note of what changed, or None. A config without stores reads
  bytes: a `data.tokenizer` other than `bytes` is refused there (it would do nothing), and
  so is a `model.vocab_size` below the byte vocabulary (`BYTE_VOCAB_SIZE`; byte ids past
  the embedding would read garbage and score NaN)."""
  if not uses_token_stores(config.data):
    kind = config.data.tokenizer
    if kind and kind != "bytes":
      load_tokenizer(kind)  # a missing file is named first
      raise ValueError(
        f"data.tokenizer={kind}: text in that tokenizer is read from token stores; prepare "
        f"one (python -m moejax.data.prepare --tokenizer={kind} --source=... --out=DIR) and "
        "set data.tokens_dir=DIR."
      )
    if config.model.vocab_size < BYTE_VOCAB_SIZE:
      raise ValueError(
        f"config.model.vocab_size={config.model.vocab_size} is smaller than the byte "
        f"tokenizer's vocabulary of {BYTE_VOCAB_SIZE} (data.name={config.data.name} is read "
        f"as bytes); set config.model.vocab_size >= {BYTE_VOCAB_SIZE}, or train on a token "
        "store (data.tokens_dir)."
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
