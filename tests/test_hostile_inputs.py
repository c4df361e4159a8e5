"""Hostile and broken HF-format checkpoints given to `python -m moejax.convert import`:
each is refused in one line naming the file or the `config.json` key, fast, before anything
large is allocated, without blocking, and with nothing written.

The cases: safetensors headers that are too long or too short, offsets past the end of the
file, truncated files; an index naming shards outside `--from`; layer and expert counts or
sizes that disagree with the tensors; FIFOs in place of files; JSON that does not parse or
is not an object; `config.json` fields of the wrong type (a string boolean, a float size), or
zero and negative counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from helpers import hf_reference
from moejax.convert import transfer


def _checkpoint(tmp_path, family: str = "olmoe", *, shards: int = 1, name: str = "hf"):
  """A tiny checkpoint of `family` in `tmp_path/name`: (its directory, its config.json)."""
  hf = hf_reference.tiny_config(family)
  source = tmp_path / name
  source.mkdir()
  hf_reference.write_checkpoint(source, hf, shards=shards)
  return source, hf


def _shards(source) -> list:
  return sorted(source.glob("*.safetensors"))


# ----------------------------------------------------------------------------- safetensors files


def _corrupt(path, how: str) -> None:
  """Rewrites the safetensors file `path` broken in the way `how` names."""
  raw = path.read_bytes()
  length = struct.unpack("<Q", raw[:8])[0]
  if how == "header longer than the file":
    path.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
  elif how == "truncated inside the length":
    path.write_bytes(raw[:5])
  elif how == "truncated inside the data":
    path.write_bytes(raw[: 8 + length + 10])
  elif how == "offsets past the end":
    header = json.loads(raw[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**9]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
  else:
    raise AssertionError(how)


@pytest.mark.parametrize(
  "how,shards",
  [
    ("header longer than the file", 1),
    ("truncated inside the length", 1),
    ("truncated inside the data", 1),
    ("offsets past the end", 1),
    ("truncated inside the data", 2),  # a shard named by the index, opened lazily
  ],
)
def test_a_corrupt_safetensors_file_is_refused_naming_it(tmp_path, how, shards):
  source, _ = _checkpoint(tmp_path, "mixtral", shards=shards)
  broken = _shards(source)[-1]
  _corrupt(broken, how)
  with pytest.raises(
    ValueError, match=rf"{broken.name} is not a readable safetensors file \("
  ) as e:
    transfer.import_checkpoint(source, tmp_path / "run")
  assert str(source) in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_an_index_naming_shards_outside_the_directory_is_refused(tmp_path):
  """A hostile index must not splice in tensors from elsewhere on disk."""
  source, _ = _checkpoint(tmp_path, "mixtral", shards=2)
  index_file = source / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  shard = sorted(set(index["weight_map"].values()))[0]
  shutil.copy(source / shard, tmp_path / "elsewhere.safetensors")  # readable if followed
  for name in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
    key = next(iter(index["weight_map"]))
    index_file.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], key: name}}))
    with pytest.raises(ValueError, match="shards must be file names inside"):
      transfer.import_checkpoint(source, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_index_naming_a_missing_shard_is_refused_naming_it(tmp_path):
  source, _ = _checkpoint(tmp_path, "mixtral", shards=2)
  missing = _shards(source)[0]
  missing.unlink()
  with pytest.raises(ValueError, match=rf"{missing.name} does not exist"):
    transfer.import_checkpoint(source, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_refused_naming_both(tmp_path):
  source, _ = _checkpoint(tmp_path, "mixtral", shards=2)
  index_path = source / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  first, second = sorted(set(index["weight_map"].values()))
  key = next(k for k, v in index["weight_map"].items() if v == first)
  index["weight_map"][key] = second
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match=rf"places {re.escape(key)} in {second}, which does not"):
    transfer.import_checkpoint(source, tmp_path / "run")
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- counts and sizes


def test_layers_past_the_configs_count_are_refused_unless_prediction_layers(tmp_path):
  """A config saying 1 layer for a 2-layer file is refused, not imported by half;
  DeepSeek-V3's multi-token-prediction layer (`num_nextn_predict_layers`) is skipped."""
  from safetensors.numpy import save_file

  source, hf = _checkpoint(tmp_path, "olmoe", name="olmoe")
  (source / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 1}))
  with pytest.raises(ValueError, match=r"tensors .* no place for \(e\.g\. model\.layers\.1\."):
    transfer.import_checkpoint(source, tmp_path / "run")
  assert not (tmp_path / "run").exists()

  hf = hf_reference.tiny_config("deepseek_v3")
  source = tmp_path / "deepseek"
  source.mkdir()
  tensors = hf_reference.write_checkpoint(source, hf)
  layers = hf["num_hidden_layers"]
  tensors[f"model.layers.{layers}.eh_proj.weight"] = np.zeros((4, 8), ml_dtypes.bfloat16)
  save_file(tensors, str(source / "model.safetensors"))
  with pytest.raises(ValueError, match=rf"no place for \(e\.g\. model\.layers\.{layers}\."):
    transfer.import_checkpoint(source, tmp_path / "run")
  (source / "config.json").write_text(json.dumps({**hf, "num_nextn_predict_layers": 1}))
  summary = transfer.import_checkpoint(source, tmp_path / "run")
  assert summary["family"] == "deepseek_v3"


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("num_experts", 10**6, r"config\.json claims 1000000 routed experts .*; its tensors hold 4\."),
    ("num_hidden_layers", 10**6, r"config\.json claims 1000000 layers .*; its tensors hold 2\."),
    ("hidden_size", 10**9, r"embed_tokens\.weight has shape \(40, 16\); config\.json implies"),
    ("vocab_size", 10**9, r"embed_tokens\.weight has shape \(40, 16\); config\.json implies"),
    ("intermediate_size", 10**9, r"gate_proj\.weight has shape \(8, 16\); config\.json implies"),
  ],
)
def test_absurd_claimed_sizes_are_refused_before_anything_is_sized(tmp_path, key, value, match):
  """10^6 experts or layers, or 10^9-wide tensors, claimed for a tiny file: refused at once,
  by comparing the claim with the files (nothing of the claimed size is allocated)."""
  source, hf = _checkpoint(tmp_path)
  (source / "config.json").write_text(json.dumps({**hf, key: value}))
  start = time.perf_counter()
  with pytest.raises(ValueError, match=match):
    transfer.import_checkpoint(source, tmp_path / "run")
  assert time.perf_counter() - start < 10
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- config.json fields


@pytest.mark.parametrize(
  "family,key,value,match",
  [
    ("olmoe", "tie_word_embeddings", "false", r"tie_word_embeddings='false' must be true or false"),
    ("olmoe", "norm_topk_prob", 1, r"norm_topk_prob=1 must be true or false"),
    ("olmoe", "hidden_size", 2.5, r"hidden_size=2\.5 must be an int >= 1"),
    ("olmoe", "hidden_size", "16", r"hidden_size='16' must be an int >= 1"),
    ("olmoe", "num_key_value_heads", -2, r"num_key_value_heads=-2 must be an int >= 1"),
    ("olmoe", "num_key_value_heads", 0, r"num_key_value_heads=0 must be an int >= 1"),
    ("olmoe", "num_experts", 0, r"num_experts=0 must be an int >= 1"),
    ("mixtral", "num_local_experts", 0, r"num_local_experts=0 must be an int >= 1"),
    ("deepseek_v3", "n_routed_experts", -1, r"n_routed_experts=-1 must be an int >= 1"),
    ("deepseek_v3", "first_k_dense_replace", -1, r"first_k_dense_replace=-1 must be an int >= 0"),
    ("qwen3_moe", "moe_intermediate_size", 0, r"moe_intermediate_size=0 must be an int >= 1"),
    ("qwen3_moe", "head_dim", 0, r"head_dim=0 must be an int >= 1"),
    ("qwen2_moe", "decoder_sparse_step", 0, r"decoder_sparse_step=0 must be an int >= 1"),
    ("olmoe", "num_experts_per_tok", True, r"num_experts_per_tok=True must be an int >= 1"),
    ("olmoe", "rms_norm_eps", "1e-5", r"rms_norm_eps='1e-5' must be a number > 0"),
    ("olmoe", "rope_theta", -1.0, r"rope_theta=-1\.0 must be a number > 0"),
    ("olmoe", "hidden_size", None, r"config\.json has no hidden_size \(an int >= 1\)"),
    ("mixtral", "num_local_experts", None, r"config\.json has no num_local_experts"),
  ],
)
def test_config_fields_of_the_wrong_type_or_range_are_refused_naming_the_key(
  tmp_path, family, key, value, match
):
  """`"tie_word_embeddings": "false"` is not read as True, `num_local_experts: 0` is not
  taken for a missing key, and a float or string size is not cast: one line naming
  config.json and the key, nothing written."""
  source, hf = _checkpoint(tmp_path, family)
  changed = {k: v for k, v in hf.items() if k != key}
  if value is not None:
    changed[key] = value
  (source / "config.json").write_text(json.dumps(changed))
  with pytest.raises(ValueError, match=r"config\.json") as e:
    transfer.import_checkpoint(source, tmp_path / "run")
  assert e.match(match) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "name,text,match",
  [
    ("config.json", '{"model_type": "olmoe",', r"config\.json is not valid JSON \(.*line 1"),
    ("config.json", "[1, 2]", r"config\.json holds a JSON list, not an object"),
    ("config.json", b"\xff\xfe{}", r"config\.json is not valid JSON"),
    ("model.safetensors.index.json", "{", r"model\.safetensors\.index\.json is not valid JSON"),
    ("model.safetensors.index.json", '{"weight_map": [1]}', r"index\.json: weight_map must be"),
    ("model.safetensors.index.json", "{}", r"index\.json: weight_map must be"),
  ],
)
def test_json_that_does_not_parse_is_refused_naming_the_file(tmp_path, name, text, match):
  source, _ = _checkpoint(tmp_path, "mixtral", shards=2)
  (source / name).write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(ValueError, match=match) as e:
    transfer.import_checkpoint(source, tmp_path / "run")
  assert str(source) in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- FIFOs

# Run in a child with a timeout: a FIFO opened for reading blocks until a writer comes, so a
# regression would hang here, not the test suite.
_FIFO_CHILD = """
import sys
from moejax.convert import transfer
for case in sys.argv[1:]:
  source, _, workdir = case.partition("=")
  try:
    transfer.import_checkpoint(source, workdir)
    print("imported", source)
  except Exception as error:
    print(type(error).__name__, str(error).replace(chr(10), " "))
"""


def test_fifos_in_place_of_files_are_refused_before_being_opened(tmp_path):
  """A FIFO as config.json, the index, a shard (found by name or named by the index) or
  tokenizer.json would block the import forever (and signals with it): each is refused in
  one line naming it, without opening it."""
  cases = {}
  for name, shards in (
    ("config.json", 1),
    ("model.safetensors", 1),
    ("model.safetensors.index.json", 2),
    ("model-00002-of-00002.safetensors", 2),
    ("tokenizer.json", 1),
  ):
    source, _ = _checkpoint(tmp_path, "mixtral", shards=shards, name=f"hf_{len(cases)}")
    if (source / name).exists():
      (source / name).unlink()
    os.mkfifo(source / name)
    cases[name] = source
  done = subprocess.run(
    [sys.executable, "-c", _FIFO_CHILD]
    + [f"{source}={tmp_path / ('run_' + source.name)}" for source in cases.values()],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.strip().splitlines()
  assert len(lines) == len(cases), done.stdout
  for line, (name, source) in zip(lines, cases.items(), strict=True):
    assert line.startswith("ValueError --from="), line
    assert f"{name} is a FIFO, not a regular file" in line, line
    assert not (tmp_path / f"run_{source.name}").exists()
