"""Trains a byte-level BPE tokenizer on a corpus, with the `tokenizers` package.

    python -m moejax.data.tokenizer train --source=SOURCE [--source=...] --vocab_size=N --out=DIR

Each SOURCE (several are read one after another) is as for `python -m moejax.data.prepare` (`tfds:NAME[:SPLIT]`, `jsonl:GLOB[:KEY]`,
`text:GLOB`, `parquet:GLOB[:COLUMN]`), streamed. It writes `DIR/tokenizer.json`, which
`--tokenizer=hf:DIR` then names: GPT-2's byte-level pre-tokenization (every byte is in the
vocabulary, so every text encodes), and three special tokens `<|pad|>`, `<|bos|>`,
`<|endoftext|>` (ids 0, 1, 2; the last separates documents). An existing
`DIR/tokenizer.json` is never overwritten.
"""

from moejax.runtime.signals import handle_signals

handle_signals("the tokenizer was not written; rerun the same command")

import os  # noqa: E402

from absl import flags  # noqa: E402

from moejax.data import documents  # noqa: E402
from moejax.runtime import cli  # noqa: E402

SPECIALS = ("<|pad|>", "<|bos|>", "<|endoftext|>")
FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
  "source", None, "A corpus to train on: tfds:NAME[:SPLIT], jsonl:GLOB, ..."
)
flags.DEFINE_integer("vocab_size", None, "Vocabulary size, special tokens included.")
flags.DEFINE_string("out", None, "Directory to write tokenizer.json into.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir for tfds: sources (default as TFDS).")
flags.mark_flags_as_required(["source", "vocab_size", "out"])


def train_bpe(sources: list[str], vocab_size: int, out: str, data_dir: str | None = None) -> str:
  """Trains the BPE on the documents of `sources`; writes and returns `out/tokenizer.json`."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  minimum = 256 + len(SPECIALS)
  if vocab_size < minimum:
    raise ValueError(f"--vocab_size={vocab_size} must be >= {minimum} (256 bytes + specials).")
  path = os.path.join(os.path.expanduser(out), "tokenizer.json")
  if os.path.exists(path):
    raise ValueError(f"--out={out} already holds a tokenizer.json; nothing was overwritten.")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIALS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  texts = (text for source in sources for text in documents.iter_documents(source, data_dir))
  first = next(texts, None)
  if first is None:
    raise ValueError(f"--source={','.join(sources)}: the corpus holds no document")
  tokenizer.train_from_iterator(_chain(first, texts), trainer=trainer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f"{path}.partial-{os.getpid()}"
  tokenizer.save(partial)
  os.replace(partial, path)
  return path


def _chain(first, rest):
  yield first
  yield from rest


def main(argv) -> None:
  path = train_bpe(FLAGS.source, FLAGS.vocab_size, FLAGS.out, FLAGS.data_dir)
  print(f"wrote {path}: a byte-level BPE of {FLAGS.vocab_size} tokens; name it hf:{FLAGS.out}")


if __name__ == "__main__":
  cli.run(main, subcommands=("train",))
