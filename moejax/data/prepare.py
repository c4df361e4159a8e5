"""Tokenizes a corpus once into a token store (`moejax.data.store`).

    python -m moejax.data.prepare --source=SOURCE [--source=...] --tokenizer=KIND --out=DIR
        [--workers=N] [--not_utf8=refuse|skip]

SOURCE is `tfds:NAME[:SPLIT]`, `jsonl:GLOB[:KEY]`, `text:GLOB` or `parquet:GLOB[:COLUMN]`;
KIND is `bytes`, `hf:PATH` or `spm:FILE`. It streams the corpus through `--workers`
processes; peak memory does not grow with the corpus. A store killed half-written never
reads as complete; a rerun that finds the same store says so and writes nothing; a
different store at `--out` is refused. See `moejax.data.store_writer`.
"""

from moejax.runtime.signals import handle_signals

handle_signals("the store was not completed (nothing reads as a store); rerun the same command")

import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from moejax.data.store_writer import NOT_UTF8, prepare  # noqa: E402
from moejax.runtime import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
  "source", None, "A corpus: tfds:NAME[:SPLIT], jsonl:GLOB[:KEY], ...; several: one after another."
)
flags.DEFINE_string("tokenizer", "bytes", "The tokenizer: bytes, hf:PATH or spm:FILE.")
flags.DEFINE_string("out", None, "The store's directory (created; never overwritten).")
flags.DEFINE_integer("workers", 1, "Worker processes that tokenize.", lower_bound=1)
flags.DEFINE_enum("not_utf8", "refuse", NOT_UTF8, "A document that is not UTF-8: refuse or skip.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir for tfds: sources (default as TFDS).")
flags.mark_flags_as_required(["source", "out"])


def main(argv) -> None:
  del argv
  began = time.perf_counter()
  meta = prepare(
    FLAGS.source,
    FLAGS.tokenizer,
    FLAGS.out,
    workers=FLAGS.workers,
    not_utf8=FLAGS.not_utf8,
    data_dir=FLAGS.data_dir,
  )
  counts = (
    f"{meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens "
    f"({np.dtype(meta['dtype']).name}), {meta['num_bytes']:,} bytes"
  )
  if meta["already_prepared"]:
    print(f"{FLAGS.out} already holds this store: {counts}; nothing written.")
    return
  seconds = time.perf_counter() - began
  skipped = meta["skipped_not_utf8"]
  skipped_text = f"; skipped {skipped} documents that are not UTF-8" if skipped else ""
  print(
    f"prepared {FLAGS.out}: {counts} in {seconds:.1f} s "
    f"({meta['num_bytes'] / seconds / 1e6:.2f} MB of text/s with {FLAGS.workers} "
    f"worker{'s' if FLAGS.workers > 1 else ''}){skipped_text}"
  )


if __name__ == "__main__":
  cli.run(main)
