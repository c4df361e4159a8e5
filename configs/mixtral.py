"""Mixtral 8x7B (Jiang et al. 2024): top-2 of 8 SwiGLU experts in every layer, gates
renormalised over the two chosen experts, dropless, grouped-query attention (8 KV heads),
RoPE base 1e6, RMSNorm eps 1e-5. Balance: Mistral published no coefficient; transformers'
default 0.001 is in its convention (k times moejax's loss, pooled over the 32 layers), so
0.001 · 2 / 32 per MoE layer here. ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: Mistral's SentencePiece-derived tokenizer.json (32,000 tokens), read from
`tokenizers/mixtral-8x7b` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 32, 4096, 32, 8, 14336
  m.rope_base, m.norm_eps = 1e6, 1e-5
  m.num_experts, m.top_k, m.moe_layer_interval = 8, 2, 1
  m.router, m.dispatch, m.renormalize = "top_k", "dropless", True
  m.lb_loss_weight, m.z_loss_weight = 0.001 * 2 / 32, 0.0
  return apply_variant(
    config,
    arg,
    "mixtral",
    pod_topology="v5p-128",
    pod_mesh={"fsdp": 8, "expert": 8},
    pod_tokenizer=("hf:tokenizers/mixtral-8x7b", 32000),
  )
