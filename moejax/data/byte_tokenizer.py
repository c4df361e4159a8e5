"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then three special ids.

The vocabulary is `VOCAB_SIZE = 260`: the 259 ids in use (256 bytes + PAD, BOS,
EOS) rounded up to a multiple of four. Id 259 is never produced.
"""

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 260


def encode(text: str) -> np.ndarray:
  """Returns the UTF-8 bytes of `text` as ids, int32 `[num_bytes]` (no BOS/EOS)."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids) -> str:
  """Decodes ids `[length]` (other shapes are flattened), skipping ids >= 256.

  Invalid UTF-8 (e.g. a multi-byte character cut by a window edge) becomes
  U+FFFD.
  """
  ids = np.asarray(ids).reshape(-1)
  if ids.size and ids.min() < 0:
    raise ValueError(f"decode: ids must be >= 0, got {int(ids.min())}")
  byte_ids = ids[ids < 256].astype(np.uint8)
  return byte_ids.tobytes().decode("utf-8", errors="replace")
