"""Writes a token store (`moejax.data.store`): a corpus tokenized once, by worker processes.

SOURCE is `tfds:NAME[:SPLIT]`, `jsonl:GLOB[:KEY]`, `text:GLOB` or `parquet:GLOB[:COLUMN]`
(`moejax.data.documents`); KIND is `bytes`, `hf:PATH` or `spm:FILE`.

It streams: worker processes tokenize shards of the corpus (a file, 32 MiB of a JSONL file,
4096 TFDS records) into part files, and the parent appends the parts in corpus order to
the store, so memory holds a few shards, never the corpus. Everything is written into
`DIR.partial-PID` and renamed to DIR when complete (`meta.json` last): a prepare killed at
any moment leaves no store that reads as complete, and the next run removes the partial
directory. A rerun that finds the same store (same source files, tokenizer fingerprint and
settings) says so and writes nothing; a different store at DIR is refused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
from typing import Any

import numpy as np

from moejax.data import documents
from moejax.data import store as store_lib
from moejax.data.tokenizer import Tokenizer, load_tokenizer

NOT_UTF8 = ("refuse", "skip")
_ENCODE_BATCH = 256  # documents a worker encodes at once


def _encode_shard(args) -> dict:
  """One worker's shard: its documents tokenized into `PART.tokens` (EOS after each) and
  `PART.ends` (int64 ends within the part). Returns the part's counts."""
  shard, kind, not_utf8, part = args
  tokenizer = load_tokenizer(kind)
  dtype = store_lib.token_dtype(tokenizer.vocab_size)
  counts: dict[str, Any] = {
    "documents": 0,
    "tokens": 0,
    "bytes": 0,
    "not_utf8": 0,
    "empty": 0,
    "error": None,
  }
  skipped: list[str] | None = [] if not_utf8 == "skip" else None
  with open(part + ".tokens", "wb") as tokens_file, open(part + ".ends", "wb") as ends_file:

    def flush(texts):
      if not texts:
        return
      rows = tokenizer.encode_batch(texts)
      eos = np.full(1, tokenizer.eos_id, np.int32)
      flat = np.concatenate([piece for ids in rows for piece in (ids, eos)]).astype(dtype)
      ends = counts["tokens"] + np.cumsum([len(ids) + 1 for ids in rows], dtype=np.int64)
      tokens_file.write(flat.tobytes())
      ends_file.write(ends.astype("<i8").tobytes())
      counts["tokens"] += len(flat)
      counts["documents"] += len(rows)

    batch = []
    try:
      for text in documents.read_shard(shard, skipped):
        if not text:
          counts["empty"] += 1
          continue
        counts["bytes"] += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == _ENCODE_BATCH:
          flush(batch)
          batch = []
    except ValueError as e:  # not UTF-8 (refused), or a malformed record: one line
      counts["error"] = str(e) + (
        "; --not_utf8=skip skips such documents" if isinstance(e, documents.NotUtf8Error) else ""
      )
      return counts
    flush(batch)
  counts["not_utf8"] = len(skipped or ())
  return counts


def source_fingerprint(shards: list[documents.Shard]) -> str:
  """SHA-256 over the corpus's files (absolute path, size, modification time) or TFDS
  splits (name, split, directory, records), in order: not over how they were cut."""
  digest = hashlib.sha256()
  seen: set[tuple] = set()
  for shard in shards:
    stamp: tuple
    if shard.kind == "tfds":
      stamp = (shard.kind, shard.path, shard.split, shard.data_dir)
    else:
      stat = os.stat(shard.path)
      stamp = (shard.kind, shard.path, shard.key, stat.st_size, stat.st_mtime_ns)
    if stamp not in seen:
      seen.add(stamp)
      digest.update(f"{stamp}\n".encode())
  records = sum(s.stop - s.start for s in shards if s.kind == "tfds")
  digest.update(f"tfds records {records}".encode())
  return digest.hexdigest()


def _identity(source: str, tokenizer: Tokenizer, shards, not_utf8: str) -> dict:
  return {
    "source": source,
    "source_fingerprint": source_fingerprint(shards),
    "tokenizer": tokenizer.kind,
    "tokenizer_fingerprint": tokenizer.fingerprint(),
    "not_utf8": not_utf8,
  }


def _partial_prefix(out: str) -> str:
  """`OUT.partial-HOST-`: a partial store names its host and process, so that on a shared
  disk a host removes only its own dead processes' leftovers."""
  return f"{out}.partial-{socket.gethostname()}-"


def _remove_stale_partials(out: str) -> None:
  prefix = _partial_prefix(out)
  parent = os.path.dirname(prefix)
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    pid = path[len(prefix) :] if path.startswith(prefix) else ""
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)


def _sync(directory: str) -> None:
  """fsync every file in `directory`, then the directory itself."""
  for entry in os.listdir(directory):
    path = os.path.join(directory, entry)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        os.fsync(f.fileno())
  descriptor = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def prepare(
  sources: list[str],
  tokenizer_kind: str,
  out: str,
  *,
  workers: int = 1,
  not_utf8: str = "refuse",
  data_dir: str | None = None,
) -> dict:
  """Writes the token store of the corpora `sources` (their documents one after another)
  tokenized by `tokenizer_kind` at `out`; returns its meta (with `already_prepared` True
  when `out` already held this store)."""
  if not_utf8 not in NOT_UTF8:
    raise ValueError(f"--not_utf8={not_utf8!r}; allowed: {', '.join(NOT_UTF8)}.")
  if workers < 1:
    raise ValueError(f"--workers={workers} must be >= 1.")
  out = os.path.abspath(os.path.expanduser(out))
  _worker_setup()  # before the tokenizers package starts its threads: one core a worker
  tokenizer = load_tokenizer(tokenizer_kind)
  shards = [shard for source in sources for shard in documents.shards(source, data_dir)]
  identity = _identity(",".join(sources), tokenizer, shards, not_utf8)
  existing = store_lib.read_meta(out) if os.path.isdir(out) else None
  if existing is not None:
    if {k: existing.get(k) for k in identity} == identity:
      return existing | {"already_prepared": True}
    raise ValueError(
      f"--out={out} holds another token store (source {existing.get('source')}, tokenizer "
      f"{existing.get('tokenizer')}); nothing was overwritten: choose another --out."
    )
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--out={out} exists and is not a token store; nothing was overwritten.")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  _remove_stale_partials(out)
  partial = f"{_partial_prefix(out)}{os.getpid()}"
  os.makedirs(partial)
  try:
    meta = _write(partial, shards, tokenizer, identity, workers, not_utf8)
    _sync(partial)  # the files on disk before the name says the store is complete
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.rename(partial, out)
    _sync(os.path.dirname(out))
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return meta | {"already_prepared": False}


def _write(partial, shards, tokenizer, identity, workers, not_utf8) -> dict:
  dtype = store_lib.token_dtype(tokenizer.vocab_size)
  totals = {"documents": 0, "tokens": 0, "bytes": 0, "not_utf8": 0, "empty": 0}
  tasks = [
    (shard, tokenizer.kind, not_utf8, os.path.join(partial, f"part-{i:06d}"))
    for i, shard in enumerate(shards)
  ]
  tokens_path = os.path.join(partial, store_lib.TOKENS)
  ends_path = os.path.join(partial, store_lib.DOCUMENT_ENDS)
  context = multiprocessing.get_context("spawn")
  pool = context.Pool(workers, initializer=_worker_setup) if workers > 1 else None
  finished = False
  try:
    results = pool.imap(_encode_shard, tasks) if pool else map(_encode_shard, tasks)
    with open(tokens_path, "wb") as tokens_file, open(ends_path, "wb") as ends_file:
      for (_, _, _, part), counts in zip(tasks, results, strict=True):
        if counts["error"]:
          raise ValueError(counts["error"])
        with open(part + ".tokens", "rb") as f:
          shutil.copyfileobj(f, tokens_file, 1 << 22)
        ends = np.fromfile(part + ".ends", dtype="<i8") + totals["tokens"]
        ends_file.write(ends.tobytes())
        os.remove(part + ".tokens")
        os.remove(part + ".ends")
        for key in totals:
          totals[key] += counts[key]
    finished = True
  finally:
    if pool and finished:
      pool.close()
      pool.join()
    elif pool:  # an error: the workers' shards are of no use
      pool.terminate()
  if totals["documents"] == 0:
    raise ValueError(f"--source={identity['source']}: the corpus holds no document with text")
  for name, source in tokenizer.files().items():  # the store's own copy, specials included
    shutil.copyfile(source, os.path.join(partial, name))
  meta = {
    "format": store_lib.FORMAT,
    "version": store_lib.VERSION,
    **identity,
    "vocab_size": tokenizer.vocab_size,
    "eos_id": tokenizer.eos_id,
    "dtype": dtype.str,
    "num_documents": totals["documents"],
    "num_tokens": totals["tokens"],
    "num_bytes": totals["bytes"],
    "skipped_not_utf8": totals["not_utf8"],
    "skipped_empty": totals["empty"],
  }
  with open(os.path.join(partial, store_lib.META), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
  return meta


def _worker_setup() -> None:
  """One thread per worker for the tokenizers package (`--workers` processes, `--workers`
  cores); Ctrl-C reaches the whole process group, and the parent alone answers it."""
  os.environ["RAYON_NUM_THREADS"] = "1"
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  if multiprocessing.parent_process() is not None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
