"""GLaM 8B/64E (Du et al. 2021, Table 4), as a decoder-only LM (GShard routing).

Top-2 routing to 64 experts on every other FFN with GShard's random second expert,
GELU experts, capacity factor 1.25 per assignment (T·k/E convention). ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: GLaM's SentencePiece vocabulary, "256K" in the paper (256,000 tokens, as
PaLM's 256k), read from `tokenizers/glam/spiece.model` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 32, 4096, 32, 32, 16384
  m.activation = "gelu"  # two expert matrices: the published 143B total parameters
  m.num_experts, m.top_k, m.moe_layer_interval = 64, 2, 2
  m.router, m.dispatch, m.renormalize = "top_k", "auto", False
  m.second_expert_policy = "random"
  m.capacity_factor, m.eval_capacity_factor = 1.25, 2.0
  m.lb_loss_weight, m.z_loss_weight = 0.01, 0.0
  return apply_variant(
    config,
    arg,
    "glam",
    pod_topology="v5p-256",
    pod_mesh={"fsdp": 2, "expert": 64},
    pod_tokenizer=("spm:tokenizers/glam/spiece.model", 256000),
  )
