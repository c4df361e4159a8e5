"""Tokenizers: one interface (`Tokenizer`), kinds named by one string (`load_tokenizer`).

`python -m moejax.data.tokenizer train --source=SOURCE --vocab_size=N --out=DIR` trains a
byte-level BPE on a corpus and writes `DIR/tokenizer.json` (`hf:DIR` then names it).
"""

from moejax.data.tokenizer.kinds import (
  KINDS,
  ByteTokenizer,
  HfTokenizer,
  SpmTokenizer,
  Tokenizer,
  load_tokenizer,
)

__all__ = ["KINDS", "ByteTokenizer", "HfTokenizer", "SpmTokenizer", "Tokenizer", "load_tokenizer"]
