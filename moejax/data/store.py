"""A token store: a corpus tokenized once, read as memory-mapped token windows at train time.

A store is a directory (written by `python -m moejax.data.prepare`):

    tokens.bin          the corpus as one flat stream, uint16 where the vocabulary fits, else
                        uint32, little-endian; every document is followed by the EOS id
    document_ends.bin   int64 little-endian `[num_documents]`: one past each document's EOS
    tokenizer.json      a copy of the tokenizer's files (`tokenizer.json` and the
                        `tokenizer_config.json` naming its special tokens, or
                        `tokenizer.model`; none for `bytes`), so the store reads anywhere
    meta.json           the format, source, tokenizer kind and fingerprint, dtype, and the
                        document, token and byte counts; written last

A directory without `meta.json` is never read as a store. `num_bytes` counts the UTF-8
bytes of the documents, so bits per byte can be computed for any tokenizer.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from moejax.data.tokenizer import Tokenizer, load_tokenizer

FORMAT = "moejax-token-store"
VERSION = 1
META = "meta.json"
TOKENS = "tokens.bin"
DOCUMENT_ENDS = "document_ends.bin"
TOKENIZER_COPY = {"hf": "tokenizer.json", "spm": "tokenizer.model"}  # a kind's main file


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 where every id fits, else uint32."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_meta(directory: str) -> dict | None:
  """`meta.json` of the store in `directory`, or None where there is no complete store."""
  path = os.path.join(directory, META)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a moejax token store's meta.json")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path}: token store version {meta.get('version')}, this reads {VERSION}")
  return meta


class TokenStore:
  """Read-only view of a token store directory (memory-mapped: nothing is loaded whole).

  `len(store)` documents; `store[i]` the token ids of document i, int32 `[length]`, without
  its EOS; `store.tokens` the flat stream `[num_tokens]` and `store.document_ends`
  `[num_documents]` as memory maps; `store.tokenizer` the tokenizer it was prepared with
  (from its own copy of the file).
  """

  def __init__(self, directory: str):
    directory = os.path.expanduser(directory)
    meta = read_meta(directory)
    if meta is None:  # a path the config names: the command is wrong (exit 2)
      raise ValueError(
        f"{directory} is not a token store (no {META}); make one with "
        f"python -m moejax.data.prepare --out={directory}"
      )
    self.directory, self.meta = directory, meta
    self.num_documents = int(meta["num_documents"])
    self.num_tokens = int(meta["num_tokens"])
    self.num_bytes = int(meta["num_bytes"])
    self.vocab_size = int(meta["vocab_size"])
    self.eos_id = int(meta["eos_id"])
    self.tokens = np.memmap(
      os.path.join(directory, TOKENS), dtype=np.dtype(meta["dtype"]), mode="r",
      shape=(self.num_tokens,),
    )  # fmt: skip
    self.document_ends = np.memmap(
      os.path.join(directory, DOCUMENT_ENDS), dtype="<i8", mode="r", shape=(self.num_documents,)
    )

  def __len__(self) -> int:
    return self.num_documents

  def __getitem__(self, i: int) -> np.ndarray:
    return self.document(i)

  def document(self, i: int, *, with_eos: bool = False) -> np.ndarray:
    """The ids of document i, int32 `[length]` (`+ 1` with its EOS)."""
    if not -self.num_documents <= i < self.num_documents:
      raise IndexError(f"document {i} of a store of {self.num_documents}")
    i %= self.num_documents
    start = int(self.document_ends[i - 1]) if i else 0
    stop = int(self.document_ends[i]) - (0 if with_eos else 1)
    return np.asarray(self.tokens[start:stop], np.int32)

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    """The tokenizer from the store's copy of its files; its EOS is the separator the
    store was written with (checked)."""
    kind = self.meta["tokenizer"]
    prefix = kind.partition(":")[0]
    if prefix in TOKENIZER_COPY:
      kind = f"{prefix}:{os.path.join(self.directory, TOKENIZER_COPY[prefix])}"
    tokenizer = load_tokenizer(kind)
    if tokenizer.eos_id != self.eos_id:
      raise ValueError(
        f"token store {self.directory}: its tokenizer copy ends documents with id "
        f"{tokenizer.eos_id}, the store with {self.eos_id}."
      )
    return tokenizer

  @property
  def tokenizer_fingerprint(self) -> str:
    return self.meta["tokenizer_fingerprint"]
