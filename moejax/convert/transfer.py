"""Import an HF-format checkpoint into a moejax run directory, and export one back.

`import_checkpoint(SOURCE, WORKDIR)` reads `config.json` and the safetensors files,
builds the matching moejax config (`families.model_config`) and writes a model-only
checkpoint (`Checkpointer.save_model`) with `config.json` and `import.json` (the source's
`config.json`, each tensor's dtype: what export needs to write the same files back).
Every shape is checked against `config.json` before anything is written. Then each
moejax parameter is made and written one layer row at a time (`StreamedArray`): the row's
tensors are read from the memory-mapped files, copied into place (`layout.pieces`) in
their stored dtype, and the files unmapped. Peak host memory is about the largest row (one
weight of one layer's experts) or unstacked tensor (the embedding: read, then copied), not
the model. A failed or stopped import removes what it wrote, and one killed outright is
refused by readers and replaced by its rerun (`output_dir`). `moejax.load(WORKDIR)`,
`moejax.generate`, `moejax.eval` and `train.init_from` read the result.

`export_checkpoint(WORKDIR, DESTINATION)` writes the model of a run (trained, imported,
fine-tuned or upcycled) as the same family's files: the key names, shapes and
`config.json` transformers reads, in shards. An imported model exported unchanged gives
back every tensor bit for bit. A weight that is not finite, or that the chosen dtype cannot
hold (beyond float16's 65504), fails the export, and what was written is removed.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from moejax.config import base_config
from moejax.convert import families, fp8_blocks, hf_rope, layout, model_state
from moejax.convert.safetensors_dir import (
  DTYPES,
  CheckpointDir,
  check_regular_file,
  write_checkpoint_dir,
)
from moejax.models.transformer import validate_config
from moejax.training import output_dir
from moejax.training import workdir as workdir_lib
from moejax.training.loading import load_model
from moejax.training.streamed_array import StreamedArray
from moejax.training.tree_paths import flat

IMPORT_RECORD = "import.json"
IMPORT_COMMAND = "python -m moejax.convert import"
EXPORT_COMMAND = "python -m moejax.convert export"


def _unused_is_known(key: str, num_layers: int, prediction_layers: int) -> bool:
  """Tensors a checkpoint may hold that are not model weights moejax has: RoPE's
  precomputed frequencies, and DeepSeek-V3's multi-token-prediction layers (the config's
  `num_nextn_predict_layers`, numbered from num_hidden_layers on). Any other layer past
  num_hidden_layers is a config that does not describe its file."""
  if key.endswith("rotary_emb.inv_freq"):
    return True
  parts = key.split(".")
  if len(parts) <= 2 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
    return False
  return num_layers <= int(parts[2]) < num_layers + prediction_layers


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


def check_claimed_counts(files, model, source) -> None:
  """Refuses a config.json that claims more layers or routed experts than the files hold,
  before anything is sized by its numbers (a claim of 10^6 experts would otherwise cost
  gigabytes of bookkeeping before the first missing tensor is noticed)."""
  layers = {int(m.group(1)) for key in files if (m := _LAYER_KEY.match(key))}
  experts = {int(m.group(1)) for key in files if (m := _EXPERT_KEY.search(key))}
  for what, claimed, held in (
    ("layers (num_hidden_layers)", model.num_layers, len(layers)),
    ("routed experts per layer", model.num_experts, max(experts) + 1 if experts else None),
  ):
    if held is not None and claimed > held:
      raise ValueError(
        f"--from={source}: config.json claims {claimed} {what}; its tensors hold {held}."
      )


def _streamed_leaf(
  src: CheckpointDir, pieces: list[layout.Piece], shape: tuple[int, ...], dtype: np.dtype
) -> StreamedArray:
  """The moejax parameter `pieces` fill, made one row of its first axis (one layer of a
  stack) at a time when every piece is indexed by row, else whole; each block's tensors
  are read, copied in, and their files unmapped before the next block is made."""
  by_row = all(piece.index for piece in pieces)

  def make_block(start: int, stop: int) -> np.ndarray:
    block = np.empty((stop - start, *shape[1:]) if by_row else shape, dtype)
    keys = set()
    for piece in pieces:
      if by_row and not start <= piece.index[0] < stop:
        continue
      index = (piece.index[0] - start, *piece.index[1:]) if by_row else piece.index
      value = piece.to_moejax(src.get(piece.key))
      if value.shape != block[index].shape:  # no broadcasting into a wrong layout
        raise ValueError(f"{piece.key} gives {value.shape} for {block[index].shape} of a leaf.")
      block[index] = value
      keys.add(piece.key)
    src.release(keys)
    return block

  return StreamedArray(shape, dtype, make_block, block_rows=1 if by_row else 0)


def import_checkpoint(
  source: epath.PathLike,
  workdir: epath.PathLike,
  base: ml_collections.ConfigDict | None = None,
) -> dict[str, Any]:
  """Writes the HF-format checkpoint in directory `source` as a moejax run in `workdir`
  (new or empty). `base`: the config whose non-model sections (train, data, mesh) the run
  gets (default `base_config()`). Returns a summary: family, tensors, bytes, seconds."""
  start = time.perf_counter()
  output_dir.check_finished(source, "--from")  # an interrupted export
  path = model_state.new_run_directory(workdir)
  src = CheckpointDir(source)
  try:
    family = families.family_of(src.config)
    config = families.model_config(src.config, base if base is not None else base_config())
    check_claimed_counts(src.files, config.model, source)
    validate_config(config.model)
    plan = layout.pieces(config.model, family)
    wanted = {piece.key for piece in plan}
    missing = sorted(wanted - set(src.files))
    if missing:
      shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
      raise ValueError(f"--from={source}: {family.model_type} tensors missing: {shown}.")
    prediction_layers = int(src.config.get("num_nextn_predict_layers") or 0)
    unknown = [
      k
      for k in src.files
      if k not in wanted
      and not _unused_is_known(k, config.model.num_layers, prediction_layers)
      and not fp8_blocks.is_scale(k, src.files)
    ]
    if unknown:
      raise ValueError(
        f"--from={source}: {len(unknown)} tensors moejax's {family.model_type} has no place "
        f"for (e.g. {unknown[0]}); nothing was written."
      )
    dtypes = {key: src.dtype(key) for key in sorted(wanted)}
    stored = next(iter(set(dtypes.values()))) if len(set(dtypes.values())) == 1 else np.float32

    _, tree, param_paths = model_state.abstract_model(config)
    shapes = {name: tuple(x.shape) for name, x in flat(tree).items()}
    by_key: dict[str, list[layout.Piece]] = {}
    by_leaf: dict[str, list[layout.Piece]] = {}
    for piece in plan:
      by_key.setdefault(piece.key, []).append(piece)
      by_leaf.setdefault(piece.leaf, []).append(piece)
    for key, group in by_key.items():  # every shape checked before anything is written
      expected = layout.hf_shape(group, shapes)
      if src.shape(key) != expected:
        raise ValueError(
          f"--from={source}: {key} has shape {src.shape(key)}; config.json implies "
          f"{expected} for {group[0].leaf}."
        )
    covered = {
      name: sum(int(np.prod(shapes[name][len(p.index) :])) for p in pieces)
      for name, pieces in by_leaf.items()
    }
    unfilled = [n for n in param_paths if covered.get(n, 0) != int(np.prod(shapes[n]))]
    if unfilled:
      raise ValueError(f"the {family.model_type} layout leaves {unfilled[0]} unfilled.")
    leaves = model_state.fresh_non_params(config)
    for name, pieces in by_leaf.items():
      dtype = np.dtype(stored if name in param_paths else leaves[name].dtype)
      leaves[name] = _streamed_leaf(src, pieces, shapes[name], dtype)
    nbytes = sum(src.nbytes(key) for key in wanted)
    kept = _tokenizer_files(source)
    if kept:  # generate and fine-tuning read the checkpoint's own vocabulary from it
      config.data.tokenizer = f"hf:{path}"
    record = {
      "source": str(source),
      "tokenizer_files": [f.name for f in kept],
      "model_type": family.model_type,
      "config": src.config,
      "dtypes": {key: str(dtype) for key, dtype in dtypes.items()},
    }
    model_state.save_model_run(
      path,
      model_state.with_leaves(tree, leaves),
      config,
      IMPORT_RECORD,
      json.dumps(record, indent=2, sort_keys=True) + "\n",
      copies=kept,
      command=IMPORT_COMMAND,
    )
  finally:
    src.close()
  return {
    "family": family.model_type,
    "tensors": len(wanted),
    "bytes": nbytes,
    "seconds": time.perf_counter() - start,
    "workdir": str(path),
  }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tokenizer_files(source: epath.PathLike) -> list[epath.Path]:
  """The source's `tokenizer.json` and `tokenizer_config.json` (which names its special
  tokens), to keep beside the import, each checked to be a regular file; [] without a
  tokenizer.json."""
  source = epath.Path(source)
  if not (source / TOKENIZER_FILES[0]).exists():
    return []
  kept = [source / name for name in TOKENIZER_FILES if (source / name).exists()]
  for file in kept:
    check_regular_file(file, f"--from={source}")
  return kept


def import_record(workdir: epath.PathLike) -> dict[str, Any] | None:
  """What `import_checkpoint` recorded in `workdir` (the source's family, its config.json as
  `config`, its tensors' dtypes), or None for a run that is not an import. ValueError for
  an import that was interrupted (`output_dir.check_finished`)."""
  output_dir.check_finished(workdir, "--workdir")
  record_file = workdir_lib.resolve(workdir) / IMPORT_RECORD
  return json.loads(record_file.read_text()) if record_file.exists() else None


def origin_record(workdir: epath.PathLike) -> dict[str, Any] | None:
  """The import record of `workdir`, or of the run it was fine-tuned from
  (`train.init_from`), followed back to the import; None for a model that never was one."""
  path, seen = workdir_lib.resolve(workdir), set[str]()
  while str(path) not in seen:
    output_dir.check_finished(path, "train.init_from" if seen else "--workdir")
    seen.add(str(path))
    record = import_record(path)
    if record is not None:
      return record
    init_from = ((workdir_lib.read_config(path) or {}).get("train") or {}).get("init_from")
    if not init_from:
      return None
    path = workdir_lib.resolve(init_from)
  return None  # a cycle of init_from directories


def _same_value(key: str, a: Any, b: Any) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or a == b
  if key == "rope_scaling":
    return hf_rope.same_scaling(a, b)
  return a == b


def exported_config(
  original: dict[str, Any], computed: dict[str, Any], *, keep_dtype: bool
) -> dict[str, Any]:
  """The original `config.json` with the fields moejax's model now gives another value
  (`computed`, what training changed) replaced; every other original field is kept, and
  fields the original lacks are not added. `torch_dtype` stays the original's when the
  tensors keep their imported dtypes (`keep_dtype`). `quantization_config` is dropped:
  moejax writes the dequantised weights (`fp8_blocks`)."""
  out = {key: value for key, value in original.items() if key != "quantization_config"}
  for key, value in computed.items():
    if key in out and not _same_value(key, out[key], value):
      if key == "torch_dtype" and keep_dtype:
        continue
      out[key] = value
  return out


def infer_family(model: ml_collections.ConfigDict) -> families.Family:
  """The family a moejax model config is written as when none is named."""
  if model.attention != "gqa":  # the family of that attention kind
    holding = [f.model_type for f in families.FAMILIES.values() if f.attention == model.attention]
    if not holding:
      raise ValueError(f"model.attention={model.attention!r}: no HF family moejax writes holds it.")
    name = holding[0]
  elif not model.num_experts:
    name = "qwen2" if model.qkv_bias else "llama"
  elif model.shared_expert_gate:
    name = "qwen2_moe"
  else:
    name = {"full": "olmoe", "head": "qwen3_moe"}.get(model.qk_norm, "mixtral")
  return families.FAMILIES[name]


def _cast(key: str, value: np.ndarray, kind: np.dtype, flag: str | None) -> np.ndarray:
  """The float32 tensor `key` as `kind`; ValueError if a weight is not finite, or is beyond
  what `kind` holds (float16's largest is 65504): inf would be written in its place."""
  if not np.isfinite(value).all():
    raise ValueError(
      f"{key} holds non-finite weights (inf or nan); the model cannot be exported: export an "
      "earlier checkpoint (--step)."
    )
  with np.errstate(over="ignore", invalid="ignore"):
    cast = value.astype(kind)
  if not np.isfinite(cast.astype(np.float32)).all():
    given = f"--dtype={flag}" if flag else f"its imported dtype {kind.name} (no --dtype)"
    raise ValueError(
      f"{key} holds a weight of magnitude {float(np.max(np.abs(value))):.4g}, beyond what "
      f"{given} holds (largest {float(np.finfo(kind).max):.4g}); export with "
      "--dtype=bfloat16 (float32's range) or --dtype=float32."
    )
  return cast


def export_checkpoint(
  workdir: epath.PathLike,
  destination: epath.PathLike,
  *,
  family: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
  step: int | None = None,
) -> dict[str, Any]:
  """Writes the model of run `workdir` (its newest readable checkpoint, or `step`) as an
  HF-format checkpoint in `destination` (new or empty).

  A model imported here, or fine-tuned from an import (`train.init_from`, followed back),
  is written with its original `config.json`: every field is kept but those whose value
  training changed (`exported_config`).

  `family`: the `model_type` to write (default: the imported one, else inferred from the
  config); `dtype`: float32, bfloat16 or float16 (default: each tensor's imported dtype,
  else float32). Returns a summary: family, tensors, bytes, files, seconds.
  """
  start = time.perf_counter()
  if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"--dtype={dtype!r} must be one of float32, bfloat16, float16.")
  record = origin_record(workdir)  # refuses an interrupted import
  out = output_dir.new_directory(destination, "--to")
  model, config, _ = load_model(workdir, step)
  if family is None:
    chosen = families.FAMILIES[record["model_type"]] if record else infer_family(config.model)
  elif family in families.FAMILIES:
    chosen = families.FAMILIES[family]
  else:
    raise ValueError(f"--family={family!r} must be one of {', '.join(sorted(families.FAMILIES))}.")
  original = record if record is not None and record["model_type"] == chosen.model_type else None
  default_dtype = np.dtype(DTYPES["BF16"] if dtype == "bfloat16" else dtype or "float32")
  dtypes = {
    key: np.dtype(DTYPES["BF16"]) if name == "bfloat16" else np.dtype(name)
    for key, name in (original["dtypes"].items() if original and dtype is None else ())
  }
  families.check_expressible(config.model, chosen)
  hf = families.hf_config(config.model, chosen, dtype or "float32")
  if original:
    hf = exported_config(original["config"], hf, keep_dtype=dtype is None)
  plan = layout.pieces(config.model, chosen)
  state = flat(nnx.to_pure_dict(nnx.state(model)))
  leaves = {name: np.asarray(state[name]) for name in {piece.leaf for piece in plan}}
  shapes = {name: value.shape for name, value in leaves.items()}
  groups: dict[str, list[layout.Piece]] = {}
  for piece in plan:
    groups.setdefault(piece.key, []).append(piece)

  def tensors():
    for key, group in groups.items():
      shape = layout.hf_shape(group, shapes)
      kind = dtypes.get(key, default_dtype)

      def make(key=key, group=group, shape=shape, kind=kind):
        value = np.empty(shape, np.float32)
        for piece in group:
          piece.to_hf(leaves[piece.leaf][piece.index], value)
        return _cast(key, value, kind, dtype)

      yield key, shape, kind, make
    if chosen.deepseek_router and not config.model.bias_update_rate:
      # No selection bias in the model: DeepSeek-V3's is written as zeros (the same routing).
      for i, (_, _, layer_kind) in enumerate(layout.layer_locations(config.model)):
        if layer_kind == "moe":
          key = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
          size = config.model.num_experts
          yield key, (size,), np.dtype(np.float32), lambda size=size: np.zeros(size, np.float32)

  with output_dir.writing(out, "--to", EXPORT_COMMAND):
    files = write_checkpoint_dir(out, hf, tensors(), max_shard_bytes=max_shard_bytes)
  return {
    "family": chosen.model_type,
    "tensors": len(groups),
    "files": files,
    "seconds": time.perf_counter() - start,
    "destination": str(out),
  }
