"""Qwen3-30B-A3B (Qwen team 2025; the released config.json): 48 layers, all MoE; 128
SwiGLU experts of hidden 768, top-8 of softmax scores with renormalised gates, no shared
expert; grouped-query attention with 32 query and 4 key/value heads of 128 channels and
per-head QK-norm; RoPE base 1e6. Balance: global-batch LB loss (Qiu et al. 2025; moejax's
'call' pooling is over the step's global batch), the released 0.001 converted from
transformers' convention: 0.001 · k / layers per MoE layer. ARG: 'cpu' (default), 'pod',
'smoke'.
Pod vocabulary: Qwen's byte-level BPE (151,936 embedding rows), read from
`tokenizers/qwen3-30b-a3b` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 48, 2048, 32, 4, 128
  m.d_ff, m.qk_norm, m.norm_eps, m.rope_base = 6144, "head", 1e-6, 1e6
  m.num_experts, m.top_k, m.expert_d_ff, m.moe_layer_interval = 128, 8, 768, 1
  m.router, m.dispatch, m.renormalize, m.lb_pooling = "top_k", "dropless", True, "call"
  m.lb_loss_weight, m.z_loss_weight = 0.001 * 8 / 48, 0.0
  return apply_variant(
    config,
    arg,
    "qwen3_moe",
    pod_topology="v5p-64",
    pod_mesh={"expert": 32},
    pod_tokenizer=("hf:tokenizers/qwen3-30b-a3b", 151936),
    # Keeping the FFN activations too ('attention_ffn', 'ffn') needs 107 and 99 GiB a
    # chip: the FFN is recomputed.
    pod_remat="attention",
  )
