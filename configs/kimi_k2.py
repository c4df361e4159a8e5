"""Kimi K2 (Moonshot AI 2025; the model card and released config.json): DeepSeek-V3's
block at 1.04T parameters, 32B active. 61 layers, the first dense (hidden 18432); 384
routed SwiGLU experts of hidden 2048 and 1 shared expert, top-8 by sigmoid scores plus an
aux-loss-free selection bias (one expert group), gates normalised and scaled by 2.827;
multi-head latent attention with 64 heads (q latent 1536, kv latent 512, 128 + 64
RoPE query/key channels, 128 value channels), RoPE base 50,000. Trained with MuonClip:
here Muon (`train.optimizer='muon'`) without the QK-clip, at cpu and smoke; the pod
recipe trains with AdamW (below). Balance as DeepSeek-V3: bias
update speed 0.001 and the sequence-wise loss α = 0.0001. The released weights stretch
the RoPE by YaRN (factor 32) for a 128K context; pretraining at 1024 tokens, the recipe
leaves it unscaled (`moejax.convert` reads it from the published config.json).
ARG: 'cpu' (default), 'pod', 'smoke'.
Pod vocabulary: Kimi K2's 163,840 ids. It ships a tiktoken BPE (`tiktoken.model`), which
moejax does not read: convert it to a `tokenizer.json` (transformers'
`TikTokenConverter`) at `tokenizers/kimi-k2` (`data.tokenizer`).
"""

from moejax.config import apply_variant, base_config


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.d_ff = 61, 7168, 64, 18432
  m.attention, m.q_lora_rank, m.kv_lora_rank = "mla", 1536, 512
  m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 128, 64, 128
  m.norm_eps, m.rope_base = 1e-6, 50000.0
  m.first_dense_layers, m.moe_layer_interval = 1, 1
  m.num_experts, m.top_k, m.expert_d_ff, m.num_shared_experts = 384, 8, 2048, 1
  m.router, m.dispatch, m.score_fn, m.renormalize = "top_k", "dropless", "sigmoid", True
  m.routed_scaling_factor, m.num_expert_groups, m.topk_groups = 2.827, 1, None
  m.bias_update_rate, m.seq_aux_loss_weight = 0.001, 0.0001
  m.lb_loss_weight, m.z_loss_weight = 0.0, 0.0
  config.train.optimizer = "muon"
  config = apply_variant(
    config,
    arg,
    "kimi_k2",
    pod_topology="v5p-1024",
    pod_mesh={"fsdp": 16, "expert": 32},
    pod_tokenizer=("hf:tokenizers/kimi-k2", 163840),
    pod_remat="attention",
  )
  if arg == "pod":
    # 512 sequences: one per chip of v5p-1024. AdamW, not Muon: Muon's Newton-Schulz update
    # is not yet sharded on a pod (XLA gathers the expert stacks' momentum, 1.04 TB of
    # temporaries on v5p-512), and AdamW's two moments need this slice (104.6 GiB a chip
    # on v5p-512; 59.6 on v5p-1024).
    config.train.batch_size, config.train.optimizer = 512, "adamw"
  return config
