"""Block-scaled FP8 checkpoints (DeepSeek-V3, Kimi K2; `moejax.convert.fp8_blocks`): a tiny
DeepSeek-V3 whose linear weights are float8 e4m3 with one scale per block imports to the
logits of its dequantised weights (the NumPy forward pass), and exports them; what moejax
does not read is refused in one line; DeepSeek-V3's published `config.json` is read whole."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import moejax
from helpers import hf_reference
from moejax.config import base_config
from moejax.convert import families, transfer

TOKENS = [3, 17, 5, 39, 0, 22]
BLOCK = (4, 4)  # rows and columns of one scale's block (DeepSeek-V3: 128 × 128)
E4M3_MAX = 448.0
QUANTIZED = ("_proj.weight", "proj_with_mqa.weight")  # the linear layers DeepSeek stores in FP8


def quantize(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(float8 values, float32 scale_inv per block, the dequantised float32 weight), block by
  block with loops: each block scaled so its largest magnitude is e4m3's largest, 448."""
  weight = weight.astype(np.float32)
  rows, cols = BLOCK
  grid = (-(-weight.shape[0] // rows), -(-weight.shape[1] // cols))
  values = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
  scales = np.zeros(grid, np.float32)
  dequantised = np.zeros(weight.shape, np.float32)
  for i in range(grid[0]):
    for j in range(grid[1]):
      block = (slice(i * rows, (i + 1) * rows), slice(j * cols, (j + 1) * cols))
      scales[i, j] = np.float32(np.abs(weight[block]).max() / E4M3_MAX)
      values[block] = (weight[block] / scales[i, j]).astype(ml_dtypes.float8_e4m3fn)
      dequantised[block] = values[block].astype(np.float32) * scales[i, j]
  return values, scales, dequantised


def fp8_checkpoint(directory, **changes):
  """A tiny DeepSeek-V3 whose linear weights are FP8 in blocks of
  `BLOCK`; returns (config.json, the tensors as a float32 checkpoint would hold them)."""
  hf = hf_reference.tiny_config("deepseek_v3", **changes)
  directory.mkdir()
  written = hf_reference.write_checkpoint(directory, hf)
  stored, dequantised = {}, {}
  for key, value in written.items():
    if key.startswith("model.layers.") and key.endswith(QUANTIZED):
      stored[key], stored[key + "_scale_inv"], dequantised[key] = quantize(value)
    else:
      stored[key], dequantised[key] = value, value.astype(np.float32)
  (directory / "model.safetensors").unlink()
  save_file(stored, str(directory / "model.safetensors"))
  quantization = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": list(BLOCK),
  }
  hf = {**hf, "quantization_config": quantization, "torch_dtype": "bfloat16"}
  (directory / "config.json").write_text(json.dumps(hf))
  return hf, dequantised


def test_fp8_blocks_import_to_the_logits_of_the_dequantised_weights(tmp_path):
  hf, dequantised = fp8_checkpoint(tmp_path / "hf")
  partial = [k for k, v in dequantised.items() if k.endswith(QUANTIZED) and v.shape[1] % BLOCK[1]]
  assert partial  # some weights end in a partial block
  transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  model, _ = moejax.load(tmp_path / "run")
  logits = np.asarray(model(jnp.asarray([TOKENS], jnp.int32))[0][0], np.float64)
  expected = hf_reference.forward(hf, dequantised, TOKENS)
  assert np.max(np.abs(logits - expected)) / np.max(np.abs(expected)) < 1e-5

  transfer.export_checkpoint(tmp_path / "run", tmp_path / "out")
  out = json.loads((tmp_path / "out" / "config.json").read_text())
  assert "quantization_config" not in out
  assert out == {k: v for k, v in hf.items() if k != "quantization_config"}
  back = hf_reference.read_all(tmp_path / "out")
  assert sorted(back) == sorted(dequantised)  # the dequantised weights, no scales
  for key, value in dequantised.items():
    assert back[key].astype(np.float32).tobytes() == value.tobytes(), key


@pytest.mark.parametrize(
  "quantization, message",
  [
    ({"quant_method": "mxfp4"}, r"quantization_config\.quant_method='mxfp4' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, r"quantization_config\.fmt='e5m2'"),
    ({"quant_method": "fp8", "weight_block_size": 128}, r"weight_block_size=128"),
    ({"quant_method": "fp8", "weight_block_size": [8, 8]}, r"scales of shape \(\d+, \d+\) for"),
  ],
)
def test_what_the_fp8_reader_cannot_read_is_refused_in_one_line(tmp_path, quantization, message):
  hf, _ = fp8_checkpoint(tmp_path / "hf")
  hf["quantization_config"] = quantization
  (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=message):
    transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_an_fp8_weight_without_its_scales_is_refused(tmp_path):
  fp8_checkpoint(tmp_path / "hf")
  path = tmp_path / "hf" / "model.safetensors"
  tensors = hf_reference.read_all(tmp_path / "hf")
  missing = next(k for k in tensors if k.endswith("_scale_inv"))
  del tensors[missing]
  path.unlink()
  save_file(tensors, str(path))
  with pytest.raises(ValueError, match=f"is FP8 without its {missing}"):
    transfer.import_checkpoint(tmp_path / "hf", tmp_path / "run")


# DeepSeek-V3's config.json as published with its weights (deepseek-ai/DeepSeek-V3), less
# `auto_map` (the names of its remote-code classes).
DEEPSEEK_V3 = {
  "architectures": ["DeepseekV3ForCausalLM"],
  "attention_bias": False,
  "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": True,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "pretraining_tp": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
  },
  "rms_norm_eps": 1e-06,
  "rope_scaling": hf_reference.DEEPSEEK_V3_YARN,
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "seq_aux": True,
  "tie_word_embeddings": False,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1",
  "use_cache": True,
  "v_head_dim": 128,
  "vocab_size": 129280,
}
# The fields the import does not read, and why.
NOT_READ = {
  "architectures": "the family is model_type's",
  "attention_dropout": "0.0: no dropout at import",
  "aux_loss_alpha": "a training setting (the sequence-wise balance loss weight)",
  "seq_aux": "a training setting (the sequence-wise balance loss on)",
  "bos_token_id": "a tokenizer fact, kept in the exported config.json",
  "eos_token_id": "a tokenizer fact, kept in the exported config.json",
  "ep_size": "DeepSeek's inference-time expert parallelism; moejax's mesh is its own",
  "initializer_range": "initialisation, not the function",
  "pretraining_tp": "1: tensor parallelism at pretraining",
  "torch_dtype": "the tensors' own dtypes are read",
  "transformers_version": "not a model setting",
  "use_cache": "decoding always caches",
}


class Recording(dict):
  """A config.json dict that notes every field read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read = set()

  def get(self, key, default=None):
    self.read.add(key)
    return super().get(key, default)

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)

  def __contains__(self, key):
    self.read.add(key)
    return super().__contains__(key)


def test_deepseek_v3s_published_config_is_read_field_by_field():
  """Every field is read, or named in NOT_READ with its reason; YaRN factor 40 and the FP8
  blocks are read, not refused; the shape is the published 671B."""
  hf = Recording(DEEPSEEK_V3)
  config = families.model_config(hf, base_config())
  assert sorted(set(DEEPSEEK_V3) - hf.read) == sorted(NOT_READ)
  m = config.model
  assert (m.rope_scaling, m.rope_factor, m.yarn_mscale_all_dim) == ("yarn", 40.0, 1.0)
  assert (m.num_experts, m.top_k, m.num_layers, m.first_dense_layers) == (256, 8, 61, 3)
  assert (m.num_expert_groups, m.topk_groups, m.routed_scaling_factor) == (8, 4, 2.5)
