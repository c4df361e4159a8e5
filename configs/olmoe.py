"""OLMoE-1B-7B (Muennighoff et al. 2024): 64 fine-grained SwiGLU experts (hidden 1024),
top-8 in every layer, raw softmax gates, dropless, QK-norm over the whole q and k
projections, RMSNorm eps 1e-5. Balance: the paper's α = 0.01 and β = 0.001 weigh losses
averaged over the 16 layers (MegaBlocks' batched losses, which OLMoE trained with), so
0.01 / 16 and 0.001 / 16 per MoE layer here. ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: the GPT-NeoX-derived tokenizer (50,280 tokens; the embedding is padded to
50,304), read from `tokenizers/olmoe-1b-7b` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 16, 2048, 16, 16, 1024
  m.qk_norm = "full"  # RMSNorm over the whole q and k projections
  m.num_experts, m.top_k, m.expert_d_ff, m.moe_layer_interval = 64, 8, 1024, 1
  m.router, m.dispatch, m.renormalize = "top_k", "dropless", False
  m.norm_eps = 1e-5
  m.lb_loss_weight, m.z_loss_weight = 0.01 / 16, 0.001 / 16
  return apply_variant(
    config,
    arg,
    "olmoe",
    pod_topology="v5p-32",
    # The planner's choice (docs/pods.md): pure FSDP has expert 16's compute bound with
    # 35% less ICI and 45 rather than 80 GiB a chip.
    pod_mesh={"fsdp": 16},
    pod_tokenizer=("hf:tokenizers/olmoe-1b-7b", 50304),
  )
