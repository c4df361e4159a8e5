"""Reads one split of a TFDS text dataset (array_record) as a list of strings."""

import difflib
import os

import tensorflow_datasets as tfds

from moejax.data import shakespeare

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
    known = [shakespeare.NAME] + sorted(tfds.list_builders(with_community_datasets=False))
    close = difflib.get_close_matches(name.split("/")[0], known, n=2)
    close.sort(key=lambda c: c != shakespeare.NAME)  # the built-in corpus first
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


def prepare(name: str, data_dir: str | None = None) -> None:
  """Builds the built-in corpus if `name` is it and it is missing; checks any other is prepared."""
  data_dir = resolve_data_dir(data_dir)
  if name == shakespeare.NAME:
    shakespeare.prepare(data_dir)
  else:
    _check_prepared(name, data_dir)


def load_split(
  name: str, split: str, data_dir: str | None = None, *, text_key: str = "text"
) -> list[str]:
  """Returns the `text_key` feature of every record of `name[split]`, in order.

  `shakespeare_plays` is built into `data_dir` on first use (offline, a few
  seconds). Any other TFDS dataset (`lm1b`, `c4/en`, ...) must already be
  prepared there in the array_record format; nothing is downloaded. The whole
  split is held in memory.
  """
  data_dir = resolve_data_dir(data_dir)
  prepare(name, data_dir)
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  texts = []
  for start in range(0, len(source), _READ_CHUNK):
    records = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
    if records and text_key not in records[0]:
      raise ValueError(
        f"text_key '{text_key}' is not a feature of {name}; features: {sorted(records[0])}"
      )
    texts.extend(r[text_key].decode("utf-8") for r in records)
  return texts
