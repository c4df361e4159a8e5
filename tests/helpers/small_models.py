"""Small model configs the model-level tests share, built from `configs/tiny.py` with overrides."""

import ml_collections

from moejax.config import load_config

VOCAB = 260


# The overrides that make `dense_model_config` multi-head latent attention, at small widths.
MLA = dict(
  attention="mla",
  qk_norm="none",
  q_lora_rank=8,
  kv_lora_rank=8,
  qk_nope_head_dim=4,
  qk_rope_head_dim=4,
  v_head_dim=4,
)


def dense_model_config(**overrides) -> ml_collections.ConfigDict:
  """A dense 2-layer model (d_model 32, GQA 4/2 heads, QK-norm, d_ff 64); `overrides` replace
  `config.model` keys (`num_experts=4` makes it MoE, with dropless experts of hidden 32)."""
  base = {
    "model.num_layers": 2,
    "model.d_model": 32,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.d_ff": 64,
    "model.num_experts": 0,
    "model.expert_d_ff": 32,
    "model.qk_norm": "head",
    "model.scan_layers": True,  # the loop over layers (tiny.py unrolls it)
    "model.dispatch": "dropless",
  }
  config = load_config("configs/tiny.py", base).model
  assert config.vocab_size == VOCAB
  config.update(overrides)
  return config
