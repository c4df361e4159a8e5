"""DeepSeek-V2-Lite (DeepSeek-AI 2024, arXiv:2405.04434; the released config.json): 27
layers, the first dense; 64 routed SwiGLU experts of hidden 1408 and 2 shared experts,
top-6 of softmax scores, raw gates; multi-head latent attention without a query latent
(16 heads, kv latent 512, 128 + 64 RoPE query/key channels, 128 value channels).
Balance: the expert-level loss α1 = 0.001 computed per sequence (the released code's
`seq_aux`), in moejax's per-layer convention. ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: DeepSeek-V2's byte-level BPE (102,400 tokens), read from
`tokenizers/deepseek-v2-lite` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 27, 2048, 16, 10944
  m.attention, m.q_lora_rank, m.kv_lora_rank = "mla", None, 512
  m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 128, 64, 128
  m.norm_eps, m.rope_base = 1e-6, 10000.0
  m.first_dense_layers, m.moe_layer_interval = 1, 1
  m.num_experts, m.top_k, m.expert_d_ff, m.num_shared_experts = 64, 6, 1408, 2
  m.router, m.dispatch, m.renormalize = "top_k", "dropless", False
  m.lb_loss_weight, m.seq_aux_loss_weight, m.z_loss_weight = 0.0, 0.001, 0.0
  return apply_variant(
    config,
    arg,
    "deepseek_v2_lite",
    pod_topology="v5p-32",
    pod_mesh={"expert": 16},
    pod_tokenizer=("hf:tokenizers/deepseek-v2-lite", 102400),
    # Keeping the FFN activations too ('attention_ffn', 'ffn') needs 124 and 116 GiB a
    # chip: the FFN is recomputed.
    pod_remat="attention",
  )
