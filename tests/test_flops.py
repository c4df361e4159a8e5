"""Tests of moejax.models.flops: the analytic counts against built models and against hand counts."""

import pytest
from flax import nnx

from helpers.small_models import dense_model_config as tiny_config
from moejax.models import flops
from moejax.models.transformer import TransformerLM

MOE = dict(num_experts=4, top_k=2)
CONFIGS = {
  "dense": {},
  "dense-tied-relu-no-qknorm": dict(tie_embeddings=True, activation="relu", qk_norm="none"),
  "dense-head-dim-mqa": dict(head_dim=12, num_kv_heads=1, activation="geglu"),
  "moe-every-layer": MOE,
  "moe-every-other-layer": dict(MOE, num_layers=4, moe_layer_interval=2),
  "moe-one-in-four-tied": dict(MOE, num_layers=4, moe_layer_interval=4, tie_embeddings=True),
  "moe-shared-experts": dict(MOE, num_shared_experts=2),
  "moe-hybrid": dict(MOE, num_layers=4, moe_layer_interval=2, dense_moe_hybrid=True),
  "moe-hybrid-post-norms": dict(
    MOE, num_layers=4, moe_layer_interval=2, dense_moe_hybrid=True, post_norms=True
  ),
  "moe-grok-options": dict(
    MOE, post_norms=True, attention_logit_cap=30.0, activation="geglu_tanh", tie_embeddings=True
  ),
  "moe-noisy-gelu": dict(MOE, router="noisy_top_k", activation="gelu"),
  "moe-expert-choice-bf16": dict(MOE, router="expert_choice", dispatch="sort", dtype="bfloat16"),
  "moe-dense-router": dict(num_experts=4, top_k=4, router="dense"),
  "moe-expert-d-ff-default": dict(MOE, expert_d_ff=None),
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_analytic_param_count_matches_the_model(overrides):
  config = tiny_config(**overrides)
  model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
  assert flops.count_params(config)["total"] == flops.count_model_params(model)


def test_count_model_params_of_a_built_model():
  config = tiny_config(**MOE)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  assert flops.count_model_params(model) == flops.count_params(config)["total"]


def test_hand_count_of_a_tiny_moe_model():
  """2 layers, d_model=8, 2 heads of 4 with 1 KV head, QK-norm, vocab 10, untied, SwiGLU;
  layer 0 dense (d_ff=16), layer 1 MoE (interval 2) with E=4 experts of d_ff=6, top-2,
  one shared expert."""
  config = tiny_config(
    vocab_size=10,
    d_model=8,
    num_heads=2,
    num_kv_heads=1,
    d_ff=16,
    num_experts=4,
    top_k=2,
    expert_d_ff=6,
    moe_layer_interval=2,
    num_shared_experts=1,
  )
  embedding = 10 * 8 + 8 * 10  # table + lm_head        = 160
  attention = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8  # q, k, v, o             = 192
  norms = 8 + 8 + 4 + 4  # 2 RMSNorms, q/k norms  = 24
  dense_ffn = 3 * 8 * 16  # gate, up, down         = 384
  expert = 3 * 8 * 6  # one expert             = 144
  router, shared = 8 * 4, 3 * 8 * 6  #                          32, 144
  final_norm = 8
  total = (
    embedding + 2 * (attention + norms) + dense_ffn + router + 4 * expert + shared + final_norm
  )
  active = total - 2 * expert
  assert (total, active) == (1736, 1448)
  assert flops.count_params(config) == {"total": total, "active": active, "embedding": embedding}
  model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
  assert flops.count_model_params(model) == total

  # Forward FLOPs: 2 per matmul weight (not norms, not the lookup table), plus attention
  # scores and values, 2 · 2 · seq · (heads · head_dim) per layer.
  seq = 16
  matmul_active = 2 * attention + dense_ffn + router + 2 * expert + shared + 10 * 8
  attention_flops = 2 * 2 * 2 * seq * 8
  assert flops.flops_per_token(config, seq) == {
    "active": 2 * matmul_active + attention_flops,
    "total": 2 * (matmul_active + 2 * expert) + attention_flops,
  }


def test_tied_embedding_counted_once():
  untied = flops.count_params(tiny_config())
  tied = flops.count_params(tiny_config(tie_embeddings=True))
  assert untied["embedding"] == 2 * 260 * 32 and tied["embedding"] == 260 * 32
  assert untied["total"] - tied["total"] == 260 * 32
  # The output projection costs the same FLOPs either way.
  assert flops.flops_per_token(tiny_config(), 8) == flops.flops_per_token(
    tiny_config(tie_embeddings=True), 8
  )


def test_dense_model_active_equals_total():
  counts = flops.count_params(tiny_config())
  assert counts["active"] == counts["total"]
  f = flops.flops_per_token(tiny_config(), 64)
  assert f["active"] == f["total"]


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_active_params_grow_with_top_k(top_k):
  config = tiny_config(num_experts=8, top_k=top_k, expert_d_ff=16)
  counts = flops.count_params(config)
  expert = 3 * 32 * 16
  assert counts["total"] - counts["active"] == 2 * (8 - top_k) * expert  # 2 MoE layers
  f = flops.flops_per_token(config, 32)
  assert f["total"] - f["active"] == 2 * 2 * (8 - top_k) * expert


def test_expert_choice_uses_capacity_factor_times_top_k_experts_per_token():
  config = tiny_config(
    num_experts=8,
    top_k=1,
    router="expert_choice",
    dispatch="sort",
    capacity_factor=2.0,
    expert_d_ff=16,
  )
  assert flops.experts_per_token(config) == 2.0
  counts = flops.count_params(config)
  assert counts["total"] - counts["active"] == 2 * (8 - 2) * 3 * 32 * 16


def test_attention_flops_grow_linearly_with_seq_len():
  config = tiny_config()
  short, long = flops.flops_per_token(config, 128), flops.flops_per_token(config, 256)
  assert long["active"] - short["active"] == 2 * 2 * 2 * 128 * 32  # layers · 2·2·Δseq·d_attn


def test_counts_validate_the_config():
  with pytest.raises(ValueError, match="config.model.num_kv_heads"):
    flops.count_params(tiny_config(num_kv_heads=3))
