"""FP8 weights with one scale per block, as DeepSeek-V3, V3.1, R1 and Kimi K2 publish them,
dequantised on import in NumPy, one tensor at a time.

Their `config.json` says `quantization_config: {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}`. A linear weight W
`[out, in]` is stored as float8 e4m3 (`F8_E4M3`), beside `W_scale_inv` float32
`[ceil(out / 128), ceil(in / 128)]`, and the weight is `W[i, j] · scale_inv[i // 128, j // 128]`
(DeepSeek-V3's released inference code, `weight_dequant`). moejax computes the product in
float32 and keeps it so: the dequantised model, in full precision. The 'dynamic'
activation scheme quantizes activations at inference time; the import has no activations,
so it computes the model the weights define.

Any other `quant_method`, format or block shape is refused in one line naming the field.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import ml_dtypes
import numpy as np
from etils import epath

FP8_NAME = "F8_E4M3"  # safetensors' name for float8 e4m3 (finite, NaN but no infinity)
SCALE_SUFFIX = "_scale_inv"


def block_shape(hf: dict[str, Any]) -> tuple[int, int] | None:
  """The `[rows, columns]` of one scale's block from `quantization_config`, or None when the
  checkpoint is not quantized; a one-line ValueError for what moejax does not read."""
  quant = hf.get("quantization_config")
  if not quant:
    return None

  def refuse(field: str, allowed: str) -> NoReturn:
    raise ValueError(
      f"config.json: quantization_config.{field}={quant.get(field)!r} is not supported by "
      f"moejax ({allowed})."
    )

  if not isinstance(quant, dict):
    raise ValueError(f"config.json: quantization_config={quant!r} must be an object.")
  if quant.get("quant_method") != "fp8":
    refuse("quant_method", "'fp8' with one scale per weight block, as DeepSeek-V3 publishes")
  if quant.get("fmt", "e4m3") != "e4m3":
    refuse("fmt", "'e4m3'")
  if quant.get("activation_scheme", "dynamic") != "dynamic":
    refuse("activation_scheme", "'dynamic'")
  block = quant.get("weight_block_size")
  if not (
    isinstance(block, list)
    and len(block) == 2
    and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)
  ):
    refuse("weight_block_size", "two positive ints, e.g. [128, 128]")
  return block[0], block[1]


def is_scale(key: str, files: dict[str, str]) -> bool:
  """Whether tensor `key` is the block scales of another tensor the checkpoint holds."""
  return key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in files


def dequantize(values: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """`values` `[out, in]` float8 e4m3 times each block's `scale_inv` `[ceil(out / rows),
  ceil(in / columns)]`, in float32; a ValueError naming the shapes if they disagree."""
  rows, columns = block
  out, inp = values.shape if values.ndim == 2 else (0, 0)
  expected = (-(-out // rows), -(-inp // columns))
  if values.ndim != 2 or scale_inv.shape != expected:
    raise ValueError(
      f"scales of shape {scale_inv.shape} for a weight of {values.shape} in blocks of "
      f"{block}; expected {expected}."
    )
  scales = np.repeat(np.repeat(scale_inv.astype(np.float32), rows, 0), columns, 1)
  return values.astype(np.float32) * scales[:out, :inp]


def read_raw(path: epath.Path, key: str) -> np.ndarray:
  """Tensor `key` of the safetensors file `path` as float8 e4m3 (the `safetensors` NumPy
  reader has no float8 type): its header's `data_offsets` give the bytes."""
  with path.open("rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(header_size))[key]
    begin, end = entry["data_offsets"]
    f.seek(8 + header_size + begin)
    data = f.read(end - begin)
  dtype = np.dtype(ml_dtypes.float8_e4m3fn)
  return np.frombuffer(data, dtype).reshape(entry["shape"])
