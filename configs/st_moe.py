"""ST-MoE-L (Zoph et al. 2022, Table 3), as a decoder-only LM.

Top-2 routing to 32 experts on every fourth FFN, GEGLU experts, capacity factor 1.25
(2.0 at eval), balancing loss 0.01 and router z-loss 0.001. ARG: 'cpu' (default), 'pod',
'smoke'.
Pod vocabulary: T5's SentencePiece model (32,000 pieces; 32,128 embedding rows), read from
`tokenizers/t5/spiece.model` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 24, 1024, 16, 16, 2816
  m.activation = "geglu"
  m.num_experts, m.top_k, m.moe_layer_interval = 32, 2, 4
  m.router, m.dispatch, m.renormalize = "top_k", "auto", False
  m.capacity_factor, m.eval_capacity_factor = 1.25, 2.0
  m.lb_loss_weight, m.z_loss_weight = 0.01, 0.001
  return apply_variant(
    config,
    arg,
    "st_moe",
    pod_topology="v5e-32",
    pod_mesh={"expert": 32},
    pod_tokenizer=("spm:tokenizers/t5/spiece.model", 32128),
  )
