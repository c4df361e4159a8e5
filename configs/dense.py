"""The dense baseline: the same Transformer with a dense SwiGLU FFN in every layer
(`num_experts=0`); at ARG 'cpu' its FFN (hidden 512) matches the active
FFN of `tiny` (2 experts of hidden 256). ARG: 'cpu'
(default), 'pod' (a 12-layer d_model 768 decoder), 'smoke'.
Pod vocabulary: T5's SentencePiece model, as Switch-Base, its MoE counterpart (32,128
embedding rows), read from `tokenizers/t5/spiece.model` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 12, 768, 12, 12, 3072
  m.num_experts = 0
  return apply_variant(
    config,
    arg,
    "dense",
    pod_topology="v5e-16",
    pod_tokenizer=("spm:tokenizers/t5/spiece.model", 32128),
  )
