"""HF-format checkpoint directories: `config.json` plus `*.safetensors`, one file or
several with a `model.safetensors.index.json` weight map. Read lazily through
`safetensors.safe_open` (memory-mapped: a tensor is read when asked for) and written in
shards of at most `max_shard_bytes` with the index HF writes.

Every file is checked before it is opened: it must be a regular file (a FIFO would block
the read, and the signals that should end it, forever), the JSON files must parse to
objects, and a safetensors file whose header does not describe the file (truncated, a
header longer than the file, offsets past its end) is refused. Each refusal is a
ValueError (exit 2: the input is wrong) naming `--from` and the file.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from moejax.convert import fp8_blocks

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names -> numpy; block-scaled FP8 is read by `fp8_blocks`, other dtypes
# are refused with the name.
DTYPES = {
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "F64": np.dtype(np.float64),
}


def _check_shard_name(directory, name: Any) -> None:
  """A shard named by the index must be a file name inside `directory`: a path, `..` or an
  absolute name would read tensors from elsewhere on disk."""
  plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
  if not plain or "\\" in name or name.startswith("~"):
    raise ValueError(
      f"--from={directory}: {INDEX_FILE} names the shard {name!r}; shards must be file names "
      "inside the checkpoint directory."
    )


_KINDS = {
  stat.S_IFIFO: "a FIFO",
  stat.S_IFDIR: "a directory",
  stat.S_IFSOCK: "a socket",
  stat.S_IFCHR: "a character device",
  stat.S_IFBLK: "a block device",
}


def check_regular_file(path: epath.Path, context: str) -> None:
  """ValueError (`CONTEXT: NAME ...`) unless `path` is a regular file (a link to one
  included, as in the Hub's cache), checked without opening it: a FIFO or a device would
  block the read. A remote path (`gs://`) is left to its reader."""
  if "://" in os.fspath(path):
    return
  try:
    mode = os.stat(os.fspath(path)).st_mode
  except FileNotFoundError:
    raise ValueError(f"{context}: {path.name} does not exist.") from None
  if not stat.S_ISREG(mode):
    kind = _KINDS.get(stat.S_IFMT(mode), "not a file")
    raise ValueError(
      f"{context}: {path.name} is {kind}, not a regular file; a checkpoint's files must be "
      "regular files (copy them into place)."
    )


def read_json_object(path: epath.Path, context: str) -> dict[str, Any]:
  """The JSON object in the regular file `path`; ValueError naming it if it does not parse
  or is not an object."""
  check_regular_file(path, context)
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{context}: {path.name} is not valid JSON ({error}).") from None
  if not isinstance(value, dict):
    raise ValueError(f"{context}: {path.name} holds a JSON {type(value).__name__}, not an object.")
  return value


class CheckpointDir:
  """The tensors of an HF-format checkpoint directory, by name."""

  def __init__(self, directory: epath.PathLike):
    self.directory = epath.Path(directory)
    self._context = f"--from={directory}"
    if not self.directory.is_dir():
      raise ValueError(f"--from={directory} is not a directory.")
    config = self.directory / "config.json"
    if not config.exists():
      raise ValueError(
        f"--from={directory} holds no config.json (an HF-format checkpoint has one)."
      )
    self.config: dict[str, Any] = read_json_object(config, self._context)
    self._open: dict[str, Any] = {}
    index = self.directory / INDEX_FILE
    if index.exists():
      weight_map = read_json_object(index, self._context).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(
          f"--from={directory}: {INDEX_FILE}: weight_map must be an object of tensor names "
          f"to shard file names, not {type(weight_map).__name__}."
        )
      for name in weight_map.values():
        _check_shard_name(directory, name)
      self.files = dict(weight_map)
      for name in sorted(set(self.files.values())):
        check_regular_file(self.directory / name, self._context)
    else:
      self.files = {}
      for path in sorted(self.directory.glob("*.safetensors")):
        with self._safe_open(path.name) as f:
          self.files.update({key: path.name for key in f.keys()})  # noqa: SIM118 (a file handle)
    if not self.files:
      raise ValueError(f"--from={directory} holds no *.safetensors files.")
    self.fp8_block = fp8_blocks.block_shape(self.config)  # None: not quantized

  def _safe_open(self, name: str):
    """`safe_open` of the shard `name`, checked to be a regular file first; a header that
    does not describe the file is refused naming it."""
    path = self.directory / name
    check_regular_file(path, self._context)
    try:
      return safe_open(str(path), "numpy")
    except SafetensorError as error:
      raise ValueError(
        f"{self._context}: {name} is not a readable safetensors file ({error}); it is "
        "truncated or corrupt: download or copy it again."
      ) from None

  def _file(self, key: str):
    name = self.files[key]
    if name not in self._open:
      self._open[name] = self._safe_open(name)
    return self._open[name]

  def _slice(self, key: str):
    """The lazy slice of tensor `key`; a shard that lacks it (an index naming the wrong
    file) is refused naming both."""
    try:
      return self._file(key).get_slice(key)
    except SafetensorError as error:
      raise ValueError(
        f"{self._context}: {INDEX_FILE} places {key} in {self.files[key]}, which does not "
        f"hold it ({error})."
      ) from None

  def dtype(self, key: str) -> np.dtype:
    """The dtype `get(key)` returns: the stored one, float32 for block-scaled FP8."""
    name = self._slice(key).get_dtype()
    if name == fp8_blocks.FP8_NAME and self.fp8_block:
      if key + fp8_blocks.SCALE_SUFFIX not in self.files:
        raise ValueError(
          f"{self._context}: {key} is FP8 without its {key}{fp8_blocks.SCALE_SUFFIX} scales."
        )
      return np.dtype(np.float32)
    if name not in DTYPES:
      raise ValueError(
        f"{key} is stored as {name}; moejax reads {', '.join(DTYPES)} tensors, and FP8 with "
        "one scale per block (a quantization_config of quant_method 'fp8')."
      )
    return DTYPES[name]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._slice(key).get_shape())

  def nbytes(self, key: str) -> int:
    return int(np.prod(self.shape(key))) * self.dtype(key).itemsize

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a numpy array of `dtype(key)` (read now); FP8 is dequantised."""
    if self.dtype(key) == np.float32 and self._slice(key).get_dtype() == fp8_blocks.FP8_NAME:
      assert self.fp8_block is not None
      values = fp8_blocks.read_raw(self.directory / self.files[key], key)
      try:
        return fp8_blocks.dequantize(values, self._read(key + "_scale_inv"), self.fp8_block)
      except ValueError as error:
        raise ValueError(f"{self._context}: {key}: {error}") from None
    return self._read(key)

  def _read(self, key: str) -> np.ndarray:
    try:
      return self._file(key).get_tensor(key)
    except SafetensorError as error:
      raise ValueError(
        f"{self._context}: {self.files[key]}: {key} cannot be read ({error}); the file is "
        "corrupt: download or copy it again."
      ) from None

  def release(self, keys) -> None:
    """Unmaps the files holding `keys` (their pages count as this process's memory); they
    are mapped again when next read."""
    for name in {self.files[key] for key in keys}:
      self._open.pop(name, None)

  def close(self) -> None:
    self._open.clear()


def write_checkpoint_dir(
  directory: epath.Path,
  config: dict[str, Any],
  tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Any]],
  *,
  max_shard_bytes: int,
) -> list[str]:
  """Writes `config.json` and the tensors into `directory` (which must not exist yet or
  be empty), in shards of at most `max_shard_bytes` (one tensor may exceed it alone).

  `tensors`: (key, shape, dtype, make) with `make()` returning the array; each shard's
  arrays are made just before it is written, so memory holds one shard at a time.
  Returns the file names written.
  """
  directory.mkdir(parents=True, exist_ok=True)
  shards: list[list[tuple[str, Any]]] = [[]]
  size = 0
  total = 0
  for key, shape, dtype, make in tensors:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, make))
    size += nbytes
    total += nbytes
  names = (
    ["model.safetensors"]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  weight_map = {}
  for name, shard in zip(names, shards, strict=True):
    arrays = {key: np.ascontiguousarray(make()) for key, make in shard}
    save_file(arrays, str(directory / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in arrays})
    del arrays
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return names + ([INDEX_FILE] if len(shards) > 1 else []) + ["config.json"]
