"""Unigram (byte-frequency) baseline in bits per byte."""

from collections.abc import Sequence

import numpy as np

from moejax.data.byte_tokenizer import encode


def _byte_counts(texts: Sequence[str]) -> np.ndarray:
  """Occurrences of each byte value in the UTF-8 of `texts`, int64 `[256]`."""
  counts = np.zeros(256, dtype=np.int64)
  for text in texts:
    counts += np.bincount(encode(text), minlength=256)
  return counts


def unigram_bits_per_byte(train_texts: Sequence[str], eval_texts: Sequence[str]) -> float:
  """Cross-entropy (bits/byte) of `eval_texts` under the train byte distribution.

  The distribution is estimated from `train_texts` with add-one smoothing over
  the 256 byte values. BOS/EOS are not counted. A model that learns nothing
  beyond byte frequencies scores this; it is the baseline a LM must beat.
  """
  train, held_out = _byte_counts(train_texts), _byte_counts(eval_texts)
  if held_out.sum() == 0:
    raise ValueError("unigram_bits_per_byte: eval_texts contain no bytes")
  log2_p = np.log2((train + 1) / (train.sum() + 256))
  return float(-(held_out * log2_p).sum() / held_out.sum())
