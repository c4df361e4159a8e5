"""The full set of config keys with their defaults; `configs/*.py` start from `base_config()`.

Every key the code reads is here, so `--config.KEY=VALUE` overrides are type-checked by
`ml_collections` and an unknown key fails at parse time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from moejax.data import VOCAB_SIZE, default_data_config
from moejax.layers.attention_kinds import KINDS as ATTENTION_KINDS


def base_config() -> ml_collections.ConfigDict:
  """Every config key with its default; each key's trailing comment says what it is."""
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.vocab_size = VOCAB_SIZE  # byte tokenizer: 256 bytes + PAD, BOS, EOS
  model.num_layers = 4  # decoder blocks
  model.d_model = 128  # residual stream width
  model.num_heads = 4  # query heads
  model.num_kv_heads = 4  # key/value heads (GQA); must divide num_heads
  model.head_dim = config_dict.placeholder(int)  # per-head width; None: d_model // num_heads
  model.d_ff = 512  # hidden size of the dense FFNs
  model.activation = "swiglu"  # FFN/expert activation: relu, gelu(_tanh), swiglu, geglu(_tanh)
  model.qk_norm = "none"  # RMSNorm on q and k before RoPE: none, head (per head), full (OLMoE)
  model.qkv_bias = False  # biases on the q, k and v projections (Qwen2)
  model.attention_logit_cap = config_dict.placeholder(
    float
  )  # GQA: logits → cap·tanh(logits/cap) (Grok-1: 30); None/0: off
  model.attention = "gqa"  # gqa (grouped-query attention) or mla (multi-head latent attention)
  # What computes the attention of a forward pass (moejax.layers.attention_kernel): xla (an
  # einsum), splash (TPU), cudnn (GPU); auto: splash on TPU, cudnn on GPU where they fit.
  model.attention_kernel = "auto"
  model.q_lora_rank = config_dict.placeholder(int)  # MLA: query latent width; None: no query latent
  model.kv_lora_rank = 512  # MLA: the cached key/value latent's width
  model.qk_nope_head_dim = 128  # MLA: per-head query/key channels without RoPE
  model.qk_rope_head_dim = 64  # MLA: per-head query channels with RoPE (one shared RoPE key)
  model.v_head_dim = 128  # MLA: per-head value channels
  model.norm_eps = 1e-6  # RMSNorm epsilon (Mixtral, Qwen2, OLMoE 1e-5; Qwen3, DeepSeek 1e-6)
  model.rope_base = 10000.0  # RoPE base (theta)
  # RoPE scaling (moejax.layers.rope): none, or yarn (Peng et al. 2023; DeepSeek-V3, Kimi K2)
  model.rope_scaling = "none"
  model.rope_factor = 1.0  # yarn: how many times the original context is stretched
  model.rope_original_max_len = 4096  # yarn: the context the RoPE was trained at
  model.yarn_beta_fast = 32.0  # yarn: frequencies rotating more often than this are kept
  model.yarn_beta_slow = 1.0  # yarn: frequencies rotating less often are divided by the factor
  model.yarn_mscale = 1.0  # yarn: the attention factor's numerator weight
  model.yarn_mscale_all_dim = 0.0  # yarn: its denominator weight; DeepSeek's softmax scale too
  model.yarn_truncate = True  # yarn: the ramp's ends rounded to whole channels
  model.tie_embeddings = False  # output projection reuses the token embedding
  model.post_norms = False  # RMSNorm on the attention and FFN/MoE outputs too ("sandwich", Grok-1)
  model.embedding_multiplier = 1.0  # scales the token embeddings entering the blocks (Grok-1)
  model.output_multiplier = 1.0  # scales the output logits (Grok-1)
  model.dtype = "float32"  # compute dtype (float32, bfloat16); parameters stay float32
  model.scan_layers = True  # layers as a loop (compile time flat in depth); False: unrolled
  # What each scanned period keeps for the backward pass (moejax.models.remat): none, full,
  # dots, attention, ffn, attention_ffn, offload_ffn (the FFN's saved activations on host).
  model.remat = "none"
  model.num_experts = 8  # routed experts per MoE layer; 0: the dense baseline
  model.top_k = 2  # experts per token (token choice); = num_experts for router 'dense'
  model.expert_d_ff = config_dict.placeholder(int)  # hidden size of each expert; None: d_ff
  model.moe_layer_interval = 1  # after the first dense layers, every n-th layer is MoE
  model.first_dense_layers = 0  # the first layers stay dense (DeepSeek's first_k_dense_replace)
  model.router = "top_k"  # top_k, noisy_top_k, expert_choice, dense
  model.dispatch = "auto"  # einsum, sort, dropless; auto: einsum on TPU, sort elsewhere
  model.expert_impl = "auto"  # block_loop, grouped_matmul; auto: block_loop on CPU
  model.capacity_factor = 1.25  # capacity = cf · group tokens · top_k / num_experts (T·k/E)
  model.eval_capacity_factor = 2.0  # the capacity factor in eval mode
  model.min_capacity = 4  # floor of the capacity per expert and routing group
  model.renormalize = False  # rescale the top-k gates to sum to 1 (Mixtral)
  model.second_expert_policy = "all"  # all, random (GShard: 2nd expert kept w.p. min(1, 2·g2))
  model.router_jitter = 0.0  # Switch: router input scaled by U(1-eps, 1+eps) in training
  model.expert_dropout = 0.0  # dropout rate on the expert hidden layer (ST-MoE)
  model.dropout = 0.0  # dropout rate on the attention and dense FFN outputs, in training only
  model.num_shared_experts = 0  # experts every token uses, one dense FFN of n · expert_d_ff
  model.shared_expert_d_ff = config_dict.placeholder(int)  # shared FFN width; None: n · expert_d_ff
  model.shared_expert_gate = False  # scale the shared FFN by sigmoid(x · w) (Qwen2-MoE)
  model.score_fn = "softmax"  # router scores: softmax, or sigmoid (DeepSeek-V3, Llama 4)
  model.routed_scaling_factor = 1.0  # multiplies every routed gate (DeepSeek-V2/V3)
  model.bias_update_rate = 0.0  # aux-loss-free balancing bias step per update; 0: off
  model.num_expert_groups = 1  # group-limited routing: experts in this many equal groups
  model.topk_groups = config_dict.placeholder(int)  # groups a token may route to; None: all
  model.router_bias = False  # a trained bias on the router logits (Switch)
  model.group_size = config_dict.placeholder(int)  # tokens per routing group; None: a sequence
  model.dropless_buffer_factor = 2.0  # dropless expert parallelism: round's receive / own rows
  model.dropless_overflow = "rounds"  # rows past the buffer: more rounds, or drop (opt-in)
  model.dense_moe_hybrid = False  # MoE layers keep a dense FFN beside the experts (Arctic)
  model.lb_loss_weight = 0.01  # load-balancing loss weight, per MoE layer (summed over layers)
  model.z_loss_weight = 0.001  # router z-loss weight, per MoE layer (summed over layers)
  model.lb_pooling = "call"  # LB statistics over the step's global batch (call) or per group
  model.seq_aux_loss_weight = 0.0  # DeepSeek-V3 sequence-wise balance loss, per MoE layer

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 1000  # optimizer steps
  train.batch_size = 32  # sequences per step, global over all processes
  train.seq_len = 128  # tokens per sequence
  # adamw, or muon (Muon on the hidden matrices and expert stacks, AdamW on the rest)
  train.optimizer = "adamw"
  train.learning_rate = 3e-3  # peak learning rate (Muon's and AdamW's alike)
  train.min_learning_rate_ratio = 0.1  # cosine decays to learning_rate · ratio
  train.warmup_steps = 100  # linear warmup from 0
  train.weight_decay = 0.1  # AdamW decoupled weight decay, on matrices only
  train.adam_b1 = 0.9  # AdamW beta1
  train.adam_b2 = 0.95  # AdamW beta2
  train.grad_clip_norm = 1.0  # global gradient-norm clipping
  train.muon_momentum = 0.95  # muon: Nesterov momentum before orthogonalisation
  train.muon_update_rms = 0.2  # muon: each update's RMS, matched to AdamW's (Moonlight)
  train.seed = 0  # parameter init, router and dropout streams, data order
  train.log_every = 20  # steps between train metric records
  train.eval_every = 200  # steps between evaluations (and at the end)
  train.checkpoint_every = 200  # steps between checkpoints (and at the end)
  train.keep_checkpoints = 3  # newest checkpoints kept
  train.nonfinite_policy = "stop"  # a NaN/Inf update: stop the run, or skip the update
  train.init_from = config_dict.placeholder(str)  # fine-tuning: start from this run dir's model
  train.trainable = "all"  # a regex over parameter paths, or all, all_but_moe, only_moe, only_router, attention_only
  train.frozen = ""  # regex over parameter paths that do not train (no gradient, optimizer state or decay); '': none

  config.data = default_data_config()

  config.hardware = hardware = ml_collections.ConfigDict()
  # The slice a config is meant for, gcloud-style (v5p-128); `moejax.aot` compiles for it.
  hardware.topology = config_dict.placeholder(str)
  # The slices a run spans (TPU slices joined by the data-center network; on CPU or GPU
  # hosts, one per process): mesh.dcn_data x mesh.dcn_fsdp of them.
  hardware.num_slices = 1

  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel devices; -1: the remaining devices
  mesh.fsdp = 1  # fully sharded data-parallel devices; shards every parameter (ZeRO-3)
  mesh.expert = 1  # expert-parallel devices (innermost); shards the experts
  # Across slices (hardware.num_slices > 1): the data and fsdp axes stack whole slices;
  # the sizes above are each slice's. The expert axis never leaves a slice.
  mesh.dcn_data = -1  # slices along data; -1: the remaining slices
  mesh.dcn_fsdp = 1  # slices along fsdp
  return config


def apply_variant(
  config: ml_collections.ConfigDict,
  arg: str,
  name: str,
  *,
  pod_topology: str | None = None,
  pod_mesh: Mapping[str, int] | None = None,
  pod_tokenizer: tuple[str, int] | None = None,
  pod_remat: str = "attention_ffn",
) -> ml_collections.ConfigDict:
  """Picks the size of a published-architecture config: ARG 'pod' keeps the published
  shape; 'cpu' (the default) shrinks it to train in minutes on 2 CPU cores on the
  Shakespeare corpus, keeping its routing (router, k, renormalisation, layer layout,
  capacity, losses) and its share of experts; 'smoke' shrinks it to a few seconds.

  The pod recipe: 256 sequences of 1024 tokens per step, one sequence per
  routing group where there is a capacity (dropless routing has none), bfloat16 compute
  (parameters, router and losses stay float32), the remat policy `pod_remat`
  (`moejax.models.remat`; 'attention_ffn' keeps every projection's and FFN's output and
  recomputes only the attention scores, norms and router), on the slice `pod_topology`
  (`hardware.topology`, gcloud-style) with the mesh axes `pod_mesh` (the data axis takes
  the rest), with the published vocabulary `pod_tokenizer` = (`data.tokenizer`,
  `model.vocab_size`): the tokenizer file is not shipped, the kind names where a run
  expects it (`docs/data.md`). `python -m moejax.aot --config=configs/NAME.py:pod` checks
  that it fits.
  """
  arg = arg or "cpu"
  if arg not in ("pod", "cpu", "smoke"):
    raise ValueError(f"configs/{name}.py: ARG={arg!r} is not one of 'pod', 'cpu', 'smoke'.")
  if arg == "pod":
    config.train.batch_size, config.train.seq_len = 256, 1024
    config.train.num_steps, config.train.warmup_steps = 100_000, 2000
    config.train.learning_rate = 3e-4
    config.train.log_every, config.train.eval_every, config.train.checkpoint_every = 100, 2000, 2000
    if config.model.num_experts and config.model.dispatch != "dropless":  # capacity per sequence
      config.model.group_size = config.train.seq_len
    config.model.dtype, config.model.remat = "bfloat16", pod_remat
    config.hardware.topology = pod_topology
    if pod_tokenizer is not None:
      config.data.tokenizer, config.model.vocab_size = pod_tokenizer
    for axis, size in (pod_mesh or {}).items():
      config.mesh[axis] = size
    return config
  m, t = config.model, config.train
  before = copy.deepcopy(m)
  experts = min(m.num_experts, 16)
  top_k = experts if m.router == "dense" else min(m.top_k, experts)
  small = arg == "smoke"
  m.first_dense_layers = min(m.first_dense_layers, 1)
  m.num_layers = max(2 if small else 4, m.first_dense_layers + m.moe_layer_interval)
  m.d_model, m.num_heads = (32, 2) if small else (128, 4)
  m.d_ff = 64 if small else 512
  if m.attention in ATTENTION_KINDS:  # an unknown kind is refused where the model is checked
    ATTENTION_KINDS[m.attention].shrink(before, m, small)
  if m.num_experts:
    shared_ratio = None if m.shared_expert_d_ff is None else m.shared_expert_d_ff / m.expert_d_ff
    m.num_experts, m.top_k = experts, top_k
    # Experts share a fixed budget: 8 experts of hidden 256 (32 in smoke), finer when more.
    m.expert_d_ff = (32 if small else 256) * 8 // max(8, experts)
    if shared_ratio is not None:  # the shared expert keeps its width relative to an expert
      m.shared_expert_d_ff = int(shared_ratio * m.expert_d_ff)
    m.num_expert_groups = min(m.num_expert_groups, experts)
  t.batch_size, t.seq_len = (8, 32) if small else (32, 128)
  t.num_steps, t.warmup_steps = (6, 2) if small else (600, 60)
  t.learning_rate = 3e-3
  t.log_every, t.eval_every, t.checkpoint_every = (2, 3, 3) if small else (20, 200, 200)
  config.data.eval_batches = 2 if small else 8
  return config
