"""The tokenizer and token stores that ship with moejax or are made from what ships.

`BPE_2048` is a byte-level BPE of 2,048 tokens, trained on the `train` splits of both
embedded corpora with

    python -m moejax.data.tokenizer train --source=tfds:shakespeare_plays:train \\
      --source=tfds:kjv_bible:train --vocab_size=2048 --out=moejax/data/assets/bpe_2048

(deterministic: the same command writes the same file). `make stores` prepares the two
corpora with it into `STORES_DIR` (`bpe2048_train`, `bpe2048_validation`), and with the
byte tokenizer (`bytes_train`, `bytes_validation`), for `configs/tiny.py:bpe` and its
byte-level twin.
"""

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BPE_2048 = "hf:" + os.path.join(ASSETS, "bpe_2048")
STORES_DIR = "workdirs/stores"  # relative to the working directory, as `make stores` writes


def store_dir(tokenizer_name: str, split: str) -> str:
  """`STORES_DIR/{tokenizer_name}_{split}`: a store `make stores` prepares."""
  return os.path.join(STORES_DIR, f"{tokenizer_name}_{split}")
