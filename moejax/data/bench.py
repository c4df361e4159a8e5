"""Measures how fast one process reads training batches from a token store.

    python -m moejax.data.bench --tokens_dir=DIR --batch_size=B --seq_len=S
        [--packing=window] [--batches=N] [--threads=T]

Prints global tokens per second (B · S tokens a batch, one process reading every row), as
the median of `--repeats` timed passes over `--batches` batches each, after one pass that
warms the page cache: the batches a training step would take from `moejax.data.windows`'
iterator (`window`) or `moejax.data.packed`'s (`first_fit`, `best_fit`: documents packed
whole; padding counts as tokens, and the share of real tokens is printed), with their
reading threads.
"""

from moejax.runtime.signals import handle_signals

handle_signals()

import statistics  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402

from moejax.data import packed, token_data, windows  # noqa: E402
from moejax.data.store import TokenStore  # noqa: E402
from moejax.runtime import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("tokens_dir", None, "The token store to read.")
flags.DEFINE_integer("batch_size", 256, "Rows a global batch.", lower_bound=1)
flags.DEFINE_integer("seq_len", 1024, "Tokens a row.", lower_bound=1)
flags.DEFINE_enum("packing", "window", token_data.PACKINGS, "How rows are cut from the store.")
flags.DEFINE_integer("batches", 100, "Batches a timed pass.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed passes; the median is reported.", lower_bound=1)
flags.DEFINE_integer("threads", 2, "Reading threads (data.workers).", lower_bound=1)
flags.DEFINE_bool("document_masking", True, "Compute segment ids and positions per document.")
flags.mark_flag_as_required("tokens_dir")


def iterator_of(store, packing, *, batch_size, seq_len, threads, masking):
  if packing == "window":
    region = windows.whole_region(store, seq_len)
    mixture = windows.MixtureBatches(
      [region], [1.0], global_batch_size=batch_size, seed=0, document_masking=masking
    )
    return windows.train_iterator(mixture, slice(0, batch_size), threads=threads)
  documents = packed.Documents(store, 0, len(store))
  return packed.train_iterator(
    documents, packing=packing, seq_len=seq_len, batch_size=batch_size, seed=0,
    pad_id=store.tokenizer.pad_id, threads=threads,
  )  # fmt: skip


def tokens_per_second(iterator, *, batch_size, seq_len, batches, repeats) -> tuple[list, float]:
  """Global tokens/s of each timed pass (each pass reads new batches), and the share of
  rows' tokens that are not padding."""
  rates, real, total = [], 0, 0
  for i in range(repeats + 1):
    began = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
      if i:
        real += int((batch.get("segment_ids", batch["inputs"] * 0 + 1) > 0).sum())
        total += batch["inputs"].size
    if i:  # the first pass warms the page cache and the threads
      rates.append(batches * batch_size * seq_len / (time.perf_counter() - began))
  return rates, real / total


def main(argv) -> None:
  del argv
  if FLAGS.packing != "window" and not FLAGS.document_masking:
    raise ValueError(f"--nodocument_masking: --packing={FLAGS.packing} always masks documents.")
  store = TokenStore(FLAGS.tokens_dir)
  iterator = iterator_of(
    store,
    FLAGS.packing,
    batch_size=FLAGS.batch_size,
    seq_len=FLAGS.seq_len,
    threads=FLAGS.threads,
    masking=FLAGS.document_masking,
  )
  rates, real = tokens_per_second(
    iterator,
    batch_size=FLAGS.batch_size,
    seq_len=FLAGS.seq_len,
    batches=FLAGS.batches,
    repeats=FLAGS.repeats,
  )
  print(
    f"{FLAGS.packing} packing, {FLAGS.batch_size} x {FLAGS.seq_len} tokens a batch "
    f"({real:.1%} not padding), {FLAGS.threads} threads: "
    f"{statistics.median(rates) / 1e6:.2f}M tokens/s median "
    f"(min {min(rates) / 1e6:.2f}M, max {max(rates) / 1e6:.2f}M over {len(rates)} passes of "
    f"{FLAGS.batches} batches) from {store.directory} ({store.num_tokens:,} tokens)"
  )


if __name__ == "__main__":
  cli.run(main)
