"""Switch Transformer, Switch-Base shape (Fedus et al. 2021, Table 9), as a decoder-only LM.

Top-1 routing to 128 experts on every other FFN, raw softmax gates, capacity factor 1.25
(2.0 at eval), router jitter 0.01, balancing loss 0.01, no z-loss. ARG: 'cpu' (default),
'pod' (published shape), 'smoke'.
Pod vocabulary: T5's SentencePiece model (32,000 pieces; 32,128 embedding rows), read from
`tokenizers/t5/spiece.model` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 12, 768, 12, 12, 3072
  m.activation = "relu"
  m.num_experts, m.top_k, m.moe_layer_interval = 128, 1, 2
  m.router, m.dispatch, m.renormalize = "top_k", "auto", False
  m.capacity_factor, m.eval_capacity_factor, m.router_jitter = 1.25, 2.0, 0.01
  m.lb_loss_weight, m.z_loss_weight = 0.01, 0.0
  return apply_variant(
    config,
    arg,
    "switch_base",
    pod_topology="v5e-32",
    pod_mesh={"expert": 32},
    pod_tokenizer=("spm:tokenizers/t5/spiece.model", 32128),
  )
