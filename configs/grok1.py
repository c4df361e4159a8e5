"""Grok-1 (xAI 2024; the released JAX code, xai-org/grok-1's run.py and model.py): 314B
parameters, 64 layers of d_model 6144, GQA with 48 query and 8 key/value heads of 128,
RoPE base 10,000, and in every layer top-2 of 8 GeGLU experts of hidden 32768, gated by
the tanh-approximate GELU (`jax.nn.gelu`'s default), chosen by softmax probabilities that
are not renormalised. Attention logits are scaled by 0.0884 = 128^-0.5 (1/sqrt(head_dim),
the default) and soft-capped at 30 (`30 · tanh(logits / 30)`); RMSNorm (eps 1e-5,
`scale · x / rms(x)`) before and after both the attention and the MoE block ("sandwich");
the embeddings are scaled by 78.38 = √6144 and the logits, from the tied embedding, by
0.577 = 1/√3. Balance: xAI published no coefficients (the release has inference code
only), so moejax's defaults; dropless, as the released code computes every token.
ARG: 'cpu' (default), 'pod', 'smoke'. The cpu and smoke shapes keep the multipliers and
the cap as published.
Pod vocabulary: Grok-1's SentencePiece model (131,072 pieces), read from
`tokenizers/grok-1/tokenizer.model` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = 64, 6144, 48, 8, 128
  m.d_ff, m.activation = 32768, "geglu_tanh"  # run.py: widening_factor 8 -> ffn_size 32768
  m.rope_base, m.norm_eps = 10000.0, 1e-5
  m.attention_logit_cap, m.post_norms = 30.0, True
  m.embedding_multiplier, m.output_multiplier = 78.38367176906169, 0.5773502691896257
  m.tie_embeddings = True  # model.py: `in_out_embed.decode`, "we use tied weights"
  m.num_experts, m.top_k, m.moe_layer_interval = 8, 2, 1
  m.router, m.dispatch, m.renormalize = "top_k", "dropless", False
  return apply_variant(
    config,
    arg,
    "grok1",
    # v5p-256 (fsdp 16) fits only recomputing the FFN ('attention': 70.3 GiB; keeping it
    # needs 124-129 GiB of temporaries), an MFU bound of 62%; on v5p-512 the
    # FFN is kept, 99.8%, so twice the chips run a step 3.2 times faster (docs/pods.md).
    pod_topology="v5p-512",
    pod_mesh={"fsdp": 32, "expert": 8},
    pod_tokenizer=("spm:tokenizers/grok-1/tokenizer.model", 131072),
  )
