"""Snowflake Arctic: a dense-MoE hybrid. Every layer has a dense FFN and, beside it, a
residual MoE of 128 experts with top-2 routing; outputs are summed. Snowflake published
no balancing coefficient: Switch's 0.01 per MoE layer. ARG: 'cpu' (default), 'pod',
'smoke'.
Pod vocabulary: the Llama 2 tokenizer Arctic uses (32,000 tokens), read from
`tokenizers/snowflake-arctic` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 35, 7168, 56, 8, 4864
  m.num_experts, m.top_k, m.expert_d_ff, m.moe_layer_interval = 128, 2, 4864, 1
  m.dense_moe_hybrid = True
  m.router, m.dispatch = "top_k", "dropless"
  return apply_variant(
    config,
    arg,
    "arctic",
    pod_topology="v5p-512",
    pod_mesh={"fsdp": 8, "expert": 32},
    pod_tokenizer=("hf:tokenizers/snowflake-arctic", 32000),
  )
