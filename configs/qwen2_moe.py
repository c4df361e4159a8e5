"""Qwen1.5-MoE-A2.7B, the Qwen2-MoE architecture (Qwen team 2024; the released
config.json): 24 layers, all MoE; 60 SwiGLU experts of hidden 1408, top-4 of softmax
scores with raw gates, and a shared expert of hidden 5632 scaled by sigmoid(x · w); q/k/v
biases; RoPE base 1e6. Balance: the released coefficient 0.001 is in transformers'
convention (k times moejax's loss, pooled over layers): 0.001 · k / layers per MoE layer
here. ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: Qwen's byte-level BPE (151,936 embedding rows), read from
`tokenizers/qwen1.5-moe-a2.7b` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 24, 2048, 16, 16, 5632
  m.qkv_bias, m.norm_eps, m.rope_base = True, 1e-6, 1e6
  m.num_experts, m.top_k, m.expert_d_ff, m.moe_layer_interval = 60, 4, 1408, 1
  m.num_shared_experts, m.shared_expert_d_ff, m.shared_expert_gate = 1, 5632, True
  m.router, m.dispatch, m.renormalize = "top_k", "dropless", False
  m.lb_loss_weight, m.z_loss_weight = 0.001 * 4 / 24, 0.0
  return apply_variant(
    config,
    arg,
    "qwen2_moe",
    pod_topology="v5p-32",
    pod_mesh={"fsdp": 4, "expert": 4},
    pod_tokenizer=("hf:tokenizers/qwen1.5-moe-a2.7b", 151936),
    # 'attention_ffn' needs 102 GiB a chip; 'ffn' fits with under 1 GiB to spare (XLA's
    # count): 'attention' (44 GiB) is the fallback if a real slice runs short.
    pod_remat="ffn",
  )
