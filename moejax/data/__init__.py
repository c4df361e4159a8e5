"""Data: tokenizers, token stores, the embedded corpora (`shakespeare_plays`, `kjv_bible`),
and a run's batches (seeded windows over token stores, or packed byte windows of a TFDS
split)."""

from moejax.data.baseline import unigram_bits_per_byte
from moejax.data.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode
from moejax.data.packing import pack_documents, split_inputs_targets
from moejax.data.pipeline import (
  build_datasets,
  default_data_config,
  make_eval_batches,
  make_train_iterator,
)
from moejax.data.shakespeare import VALIDATION_PLAYS, ShakespearePlays
from moejax.data.sources import load_split, prepare_corpus, resolve_data_dir
from moejax.data.store import TokenStore
from moejax.data.token_data import (
  batch_keys,
  check_init_from_tokenizer,
  per_process_position,
  resolve_vocab_size,
  run_tokenizer,
  run_tokenizer_files,
  uses_token_stores,
)
from moejax.data.token_data import eval_batches as token_eval_batches
from moejax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
  "BOS_ID",
  "EOS_ID",
  "PAD_ID",
  "VALIDATION_PLAYS",
  "VOCAB_SIZE",
  "ShakespearePlays",
  "TokenStore",
  "Tokenizer",
  "batch_keys",
  "build_datasets",
  "check_init_from_tokenizer",
  "decode",
  "default_data_config",
  "encode",
  "load_split",
  "load_tokenizer",
  "make_eval_batches",
  "make_train_iterator",
  "pack_documents",
  "per_process_position",
  "prepare_corpus",
  "resolve_data_dir",
  "resolve_vocab_size",
  "run_tokenizer",
  "run_tokenizer_files",
  "split_inputs_targets",
  "token_eval_batches",
  "unigram_bits_per_byte",
  "uses_token_stores",
]
