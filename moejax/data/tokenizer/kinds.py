"""Tokenizers behind one interface, named by one string (`bytes`, `hf:PATH`, `spm:FILE`).

Every kind gives `encode(text) -> int32[n]` (no BOS or EOS), `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id`, `fingerprint()` (a SHA-256 of the tokenizer's
file, so that a token store and a model can tell whether they were made with the same one)
and `token_bytes()`: `int32[vocab_size]`, the UTF-8 bytes each id stands for (0 for
special ids). Bits per byte are computed with it for any tokenizer: the cross-entropy of
the tokens that carry text over the bytes they carry (`moejax.training.steps.eval_sums`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np

from moejax.data import byte_tokenizer

KINDS = ("bytes", "hf:PATH", "spm:FILE")
# Names the special tokens go by in published `tokenizer.json` files, tried in order when
# no `tokenizer_config.json` beside the file names them.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


class Tokenizer:
  """The interface; `load_tokenizer(kind)` returns one."""

  kind: str
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    raise NotImplementedError

  def fingerprint(self) -> str:
    raise NotImplementedError

  def token_bytes(self) -> np.ndarray:
    raise NotImplementedError

  def files(self) -> dict[str, str]:
    """The files that make this tokenizer, by the name a copy of them goes by."""
    return {}


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255, then PAD, BOS, EOS (`moejax.data.byte_tokenizer`)."""

  kind = "bytes"
  vocab_size = byte_tokenizer.VOCAB_SIZE
  bos_id, eos_id, pad_id = byte_tokenizer.BOS_ID, byte_tokenizer.EOS_ID, byte_tokenizer.PAD_ID

  def encode(self, text: str) -> np.ndarray:
    return byte_tokenizer.encode(text)

  def decode(self, ids) -> str:
    return byte_tokenizer.decode(ids)

  def fingerprint(self) -> str:
    spec = f"moejax bytes tokenizer, vocabulary {self.vocab_size}, specials 256-258"
    return hashlib.sha256(spec.encode()).hexdigest()

  def token_bytes(self) -> np.ndarray:
    return (np.arange(self.vocab_size) < 256).astype(np.int32)


def hf_fingerprint(contents) -> str:
  """SHA-256 over byte strings in order: an `hf:` tokenizer's `tokenizer.json`, then its
  `tokenizer_config.json` where there is one."""
  digest = hashlib.sha256()
  for content in contents:
    digest.update(content)
  return digest.hexdigest()


def _files_sha256(paths) -> str:
  """`hf_fingerprint` of the files' contents."""

  def contents():
    for path in paths:
      with open(path, "rb") as f:
        yield f.read()

  return hf_fingerprint(contents())


def _gpt2_byte_of_char() -> dict[str, int]:
  """The inverse of GPT-2's byte-to-unicode table, which byte-level BPE vocabularies are
  written in: printable bytes stand for themselves, the others for chars from U+0100 on."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class HfTokenizer(Tokenizer):
  """A `tokenizer.json` read with the `tokenizers` package (no transformers).

  The special ids come from `tokenizer_config.json` beside the file when it names them
  (`bos_token`, `eos_token`, `pad_token`), else from the usual names (`<|endoftext|>`,
  `</s>`, ...). Without a pad token, padding uses the EOS id (padding never reaches a loss:
  its segment id is 0).
  """

  def __init__(self, path: str):
    import tokenizers

    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer=hf:{path}: no such tokenizer.json")
    self.kind, self.path = f"hf:{path}", path
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    self.config_path = config if os.path.isfile(config) else None
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust reader raises a bare Exception
      raise ValueError(f"tokenizer=hf:{path}: not a readable tokenizer.json ({e})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = self._configured_specials(self.config_path)
    eos_id = self._special(named.get("eos_token"), _EOS_NAMES)
    if eos_id is None:
      raise ValueError(
        f"tokenizer=hf:{path}: no end-of-document token found (tried tokenizer_config.json's "
        f"eos_token and {', '.join(_EOS_NAMES)}); documents need one as their separator."
      )
    self.eos_id = eos_id
    self.bos_id = self._special(named.get("bos_token"), _BOS_NAMES)
    pad = self._special(named.get("pad_token"), _PAD_NAMES)
    self.pad_id = self.eos_id if pad is None else pad

  @staticmethod
  def _configured_specials(config_path: str | None) -> dict[str, str]:
    if config_path is None:
      return {}
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    names = {}
    for key in ("bos_token", "eos_token", "pad_token"):
      value = config.get(key)
      if isinstance(value, dict):  # {"content": "</s>", ...} in older files
        value = value.get("content")
      if isinstance(value, str):
        names[key] = value
    return names

  def _special(self, configured: str | None, names: tuple[str, ...]) -> int | None:
    for name in (configured, *names) if configured else names:
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    return None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def prompt_prefix(self) -> list[int]:
    """The ids the file's own post-processor puts before a text (Llama's and Mixtral's
    BOS; none for Qwen's): what a model trained with this file saw first."""
    return list(self._tok.encode("", add_special_tokens=True).ids)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def files(self) -> dict[str, str]:
    out = {"tokenizer.json": self.path}
    if self.config_path:  # it names the special tokens, the EOS a store separates with
      out["tokenizer_config.json"] = self.config_path
    return out

  @functools.cache  # noqa: B019 (a run holds one or two tokenizers for its lifetime)
  def fingerprint(self) -> str:
    """SHA-256 of `tokenizer.json`, and of `tokenizer_config.json` when there is one."""
    return _files_sha256(self.files().values())

  def token_bytes(self) -> np.ndarray:
    """From each token's string: in a byte-level vocabulary (GPT-2's table) one byte per
    char; a `<0xNN>` byte piece one byte; otherwise the UTF-8 of the string with
    SentencePiece's `▁` as the space it stands for (decoding a piece alone would drop
    it). Special tokens 0."""
    decoder = json.loads(self._tok.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    specials = {a.content for a in self._tok.get_added_tokens_decoder().values() if a.special}
    byte_of = _gpt2_byte_of_char()
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      token = self._tok.id_to_token(i)
      if token is None or token in specials:
        continue
      if byte_level and all(c in byte_of for c in token):
        lengths[i] = len(token)
      elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        lengths[i] = 1
      else:
        lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


class SpmTokenizer(Tokenizer):
  """A SentencePiece `.model` file, read with the `sentencepiece` package (the `spm` extra).

  Without a pad piece, padding uses the EOS id."""

  def __init__(self, path: str):
    try:
      import sentencepiece
    except ImportError:
      raise ImportError(
        f"tokenizer=spm:{path} needs the sentencepiece package: pip install 'moejax[spm]'"
      ) from None
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer=spm:{path}: no such SentencePiece model file")
    self.kind, self.path = f"spm:{path}", path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.vocab_size()
    if self._sp.eos_id() < 0:
      raise ValueError(f"tokenizer=spm:{path}: the model has no EOS piece")
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

  def files(self) -> dict[str, str]:
    return {"tokenizer.model": self.path}

  @functools.cache  # noqa: B019 (a run holds one or two tokenizers for its lifetime)
  def fingerprint(self) -> str:
    return _files_sha256([self.path])

  def token_bytes(self) -> np.ndarray:
    """`▁` is one space; `<0xNN>` byte pieces are one byte; control and unknown pieces 0."""
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        lengths[i] = 1
      else:
        lengths[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


@functools.cache
def load_tokenizer(kind: str) -> Tokenizer:
  """The tokenizer that `kind` names: `bytes`, `hf:PATH` (a `tokenizer.json` or a
  directory holding one) or `spm:FILE`. One line naming the setting for anything else."""
  if kind == "bytes":
    return ByteTokenizer()
  prefix, _, path = kind.partition(":")
  if prefix == "hf" and path:
    return HfTokenizer(os.path.expanduser(path))
  if prefix == "spm" and path:
    return SpmTokenizer(os.path.expanduser(path))
  raise ValueError(f"tokenizer={kind!r} is not a tokenizer; allowed: {', '.join(KINDS)}.")
