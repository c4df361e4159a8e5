"""DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437; the released config.json): 61 layers,
the first 3 dense; 256 routed SwiGLU experts of hidden 2048 and 1 shared expert, top-8
chosen by sigmoid scores plus an aux-loss-free selection bias among the 4 best of 8
expert groups, gates normalised and scaled by 2.5; multi-head latent attention (128
heads, q latent 1536, kv latent 512, 128 + 64 RoPE query/key channels, 128 value
channels). Balance: bias update speed 0.001 and the sequence-wise loss α = 0.0001 (§4.2),
no Switch LB loss. The multi-token-prediction module is left out (not in the 671B).
ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: DeepSeek-V3's byte-level BPE (129,280 embedding rows), read from
`tokenizers/deepseek-v3` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 61, 7168, 128, 18432
  m.attention, m.q_lora_rank, m.kv_lora_rank = "mla", 1536, 512
  m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 128, 64, 128
  m.norm_eps, m.rope_base = 1e-6, 10000.0
  m.first_dense_layers, m.moe_layer_interval = 3, 1
  m.num_experts, m.top_k, m.expert_d_ff, m.num_shared_experts = 256, 8, 2048, 1
  m.router, m.dispatch, m.score_fn, m.renormalize = "top_k", "dropless", "sigmoid", True
  m.routed_scaling_factor, m.num_expert_groups, m.topk_groups = 2.5, 8, 4
  m.bias_update_rate, m.seq_aux_loss_weight = 0.001, 0.0001
  m.lb_loss_weight, m.z_loss_weight = 0.0, 0.0
  return apply_variant(
    config,
    arg,
    "deepseek_v3",
    # With the non-expert weights sharded over fsdp and expert together (ZeRO over both),
    # the published 129,280-row vocabulary fits v5p-512. Keeping the FFN activations too
    # ('attention_ffn', 'ffn') needs 107 and 101 GiB a chip: the FFN is recomputed.
    pod_topology="v5p-512",
    pod_mesh={"fsdp": 8, "expert": 32},
    pod_tokenizer=("hf:tokenizers/deepseek-v3", 129280),
    pod_remat="attention",
  )
