"""Data: byte tokenizer, the `shakespeare_plays` TFDS dataset, packed LM batches."""

from moejax.data.baseline import unigram_bits_per_byte
from moejax.data.packing import pack_documents, split_inputs_targets
from moejax.data.pipeline import (
  build_datasets,
  default_data_config,
  make_eval_batches,
  make_train_iterator,
)
from moejax.data.shakespeare import VALIDATION_PLAYS, ShakespearePlays
from moejax.data.sources import load_split, prepare, resolve_data_dir
from moejax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode

__all__ = [
  "BOS_ID",
  "EOS_ID",
  "PAD_ID",
  "VALIDATION_PLAYS",
  "VOCAB_SIZE",
  "ShakespearePlays",
  "build_datasets",
  "decode",
  "default_data_config",
  "encode",
  "load_split",
  "make_eval_batches",
  "make_train_iterator",
  "pack_documents",
  "prepare",
  "resolve_data_dir",
  "split_inputs_targets",
  "unigram_bits_per_byte",
]
