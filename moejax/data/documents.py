"""Documents from a corpus named by one string, read in shards without holding the corpus.

A SOURCE is one of:
  * `tfds:NAME[:SPLIT]`: a prepared TFDS dataset, its `text` feature (the built-in
    `shakespeare_plays` and `kjv_bible` are built on first use); SPLIT defaults to `train`;
  * `jsonl:GLOB[:KEY]`: one JSON object a line, the document under KEY (default `text`);
  * `text:GLOB`: one document per file;
  * `parquet:GLOB[:COLUMN]`: one document per row of COLUMN (default `text`).

`shards(source)` cuts the corpus into pieces that workers read independently (record
ranges, byte ranges of a JSONL file that start and end at line breaks, files, row groups);
`read_shard(shard)` yields a shard's documents in order, so the documents of all shards in
order are the corpus in order.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterator

SHARD_BYTES = 32 << 20  # a worker's unit of a large JSONL file
SHARD_RECORDS = 4096  # a worker's unit of a TFDS split


@dataclasses.dataclass(frozen=True)
class Shard:
  """One worker's unit: `kind` as in the source; `path` an absolute file path, or a TFDS
  dataset name with its `split` and `data_dir`; `key` the JSON key, parquet column or TFDS
  feature; `start`/`stop` a byte range (jsonl), record range (tfds) or row group
  (parquet)."""

  kind: str
  path: str
  key: str
  start: int = 0
  stop: int = -1
  split: str = ""
  data_dir: str = ""


class NotUtf8Error(ValueError):
  """A document that is not valid UTF-8."""


def parse_source(source: str) -> tuple[str, str, str | None]:
  """`(kind, pattern, key or split or None)`; one line naming the setting if malformed."""
  kind, _, rest = source.partition(":")
  if kind not in ("tfds", "jsonl", "text", "parquet") or not rest:
    raise ValueError(
      f"--source={source!r} is not a corpus; allowed: tfds:NAME[:SPLIT], jsonl:GLOB[:KEY], "
      "text:GLOB, parquet:GLOB[:COLUMN]."
    )
  if kind == "text":
    return kind, rest, None
  # TFDS names hold no ':', but splits may ('validation[:50%]'); globs rarely do.
  if kind == "tfds":
    pattern, _, key = rest.partition(":")
  else:
    pattern, _, key = rest.rpartition(":") if ":" in rest else (rest, "", "")
  return kind, pattern, key or None


def _files(source: str, pattern: str) -> list[str]:
  files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
  files = [os.path.abspath(p) for p in files if os.path.isfile(p)]
  if not files:
    raise ValueError(f"--source={source!r}: no file matches {pattern!r}")
  return files


def shards(source: str, data_dir: str | None = None) -> list[Shard]:
  """The corpus `source` cut into shards, in corpus order (see the module docstring)."""
  kind, pattern, key = parse_source(source)
  if kind == "tfds":
    from moejax.data import sources  # TFDS only when a TFDS corpus is named

    name, split = pattern, key or "train"
    size = sources.split_size(name, split, data_dir)
    directory = sources.resolve_data_dir(data_dir)
    return [
      Shard("tfds", name, "text", start, min(start + SHARD_RECORDS, size), split, directory)
      for start in range(0, size, SHARD_RECORDS)
    ]
  files = _files(source, pattern)
  if kind == "text":
    return [Shard("text", path, "") for path in files]
  if kind == "parquet":
    import pyarrow.parquet as pq

    return [
      Shard("parquet", path, key or "text", group, group + 1)
      for path in files
      for group in range(pq.ParquetFile(path).num_row_groups)
    ]
  out = []
  for path in files:
    size = os.path.getsize(path)
    out += [
      Shard("jsonl", path, key or "text", start, min(start + SHARD_BYTES, size))
      for start in range(0, max(size, 1), SHARD_BYTES)
    ]
  return out


def _decode(data: bytes, where: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise NotUtf8Error(f"{where} is not UTF-8 (byte {e.start})") from None


def _jsonl_lines(shard: Shard) -> Iterator[tuple[int, bytes]]:
  """The lines that start inside [start, stop), with their line numbers' byte offsets: a
  line belongs to the shard holding its first byte."""
  with open(shard.path, "rb") as f:
    if shard.start:
      f.seek(shard.start - 1)
      if f.read(1) != b"\n":
        f.readline()  # the rest of a line that started in the previous shard
    while (offset := f.tell()) < shard.stop:
      line = f.readline()
      if not line:
        break
      yield offset, line


def _encodable(text: str, where: str, skipped: list[str] | None) -> bool:
  """Whether `text` has a UTF-8 form (no lone surrogates); else as a document that is not
  UTF-8 (raised, or appended to `skipped`)."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    error = NotUtf8Error(f"{where} is not UTF-8 (a lone surrogate at character {e.start})")
    if skipped is None:
      raise error from None
    skipped.append(str(error))
    return False
  return True


def read_shard(shard: Shard, skipped: list[str] | None = None) -> Iterator[str]:
  """The documents of `shard`, in order. A document that is not UTF-8 raises
  `NotUtf8Error` naming where it is, or, with a `skipped` list, is skipped and its place
  appended to the list."""

  def decode(data: bytes, where: str) -> str | None:
    try:
      return _decode(data, where)
    except NotUtf8Error as e:
      if skipped is None:
        raise
      skipped.append(str(e))
      return None

  if shard.kind == "text":
    with open(shard.path, "rb") as f:
      text = decode(f.read(), shard.path)
    if text is not None:
      yield text
  elif shard.kind == "jsonl":
    for offset, line in _jsonl_lines(shard):
      if not line.strip():
        continue
      where = f"{shard.path} at byte {offset}"
      text = decode(line, where)
      if text is None:
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get(shard.key), str):
        raise ValueError(f"{where}: no string field {shard.key!r}")
      text = record[shard.key]
      if _encodable(text, where, skipped):  # JSON may hold lone surrogates (\ud800)
        yield text
  elif shard.kind == "parquet":
    import pyarrow.parquet as pq

    table = pq.ParquetFile(shard.path).read_row_group(shard.start, columns=[shard.key])
    for row, text in enumerate(table.column(shard.key).to_pylist()):
      where = f"{shard.path} row group {shard.start} row {row}"
      if not isinstance(text, str):
        raise ValueError(f"{where}: column {shard.key!r} holds {type(text).__name__}, not text")
      if _encodable(text, where, skipped):
        yield text
  else:  # tfds
    from moejax.data import sources

    records = sources.read_records(
      shard.path, shard.split, shard.data_dir, shard.key, shard.start, shard.stop
    )
    for index, data in enumerate(records, shard.start):
      text = decode(data, f"{shard.path}[{shard.split}] record {index}")
      if text is not None:
        yield text


def iter_documents(source: str, data_dir: str | None = None) -> Iterator[str]:
  """Every document of `source`, in order, streamed shard by shard."""
  for shard in shards(source, data_dir):
    yield from read_shard(shard)
