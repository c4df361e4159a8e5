"""Packs documents into one token stream and cuts it into fixed-size windows."""

from collections.abc import Sequence

import numpy as np

from moejax.data.byte_tokenizer import BOS_ID, EOS_ID


def pack_documents(documents: Sequence[str], seq_len: int) -> np.ndarray:
  """Returns int32 windows `[num_windows, seq_len + 1]`.

  Each document becomes `BOS, bytes..., EOS`; the documents are concatenated
  in order and cut into non-overlapping windows of `seq_len + 1` tokens
  (windows cross document boundaries; the incomplete tail is dropped).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  encoded = [doc.encode("utf-8") for doc in documents]
  lengths = np.array([len(e) for e in encoded], dtype=np.int64)
  ends = np.cumsum(lengths + 2)  # one past each document's EOS
  starts = ends - lengths - 2  # each document's BOS
  total = int(ends[-1]) if len(ends) else 0
  stream = np.empty(total, dtype=np.int32)
  is_byte = np.ones(total, dtype=bool)
  is_byte[starts] = is_byte[ends - 1] = False
  stream[starts] = BOS_ID
  stream[ends - 1] = EOS_ID
  stream[is_byte] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
  num_windows = total // (seq_len + 1)
  return stream[: num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)


def split_inputs_targets(windows: np.ndarray) -> dict[str, np.ndarray]:
  """Windows `[..., seq_len + 1]` -> `{'inputs', 'targets'}`, each `[..., seq_len]`.

  `targets` is `inputs` shifted left by one token.
  """
  return {"inputs": windows[..., :-1], "targets": windows[..., 1:]}
