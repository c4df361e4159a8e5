"""Parameter and FLOP accounting for `moejax.models.transformer.TransformerLM`, total vs active.

Everything here is analytic, computed from the model config alone, so it can size a run
before building it; `count_model_params` counts a built model to check the arithmetic.

Conventions:

* *total* parameters are all parameters; *active* parameters are those one token's
  forward pass uses: of an MoE layer's routed experts only `experts_per_token` count
  (`top_k` for token-choice routers, all `num_experts` for the dense router, and
  `capacity_factor · top_k` on average for expert choice, where each expert takes
  `capacity_factor · T · top_k / E` tokens of a group of T); router, shared experts, the
  dense branch, attention and norms always count.
* The embedding table is counted once when tied to the output projection.
* Forward FLOPs per token follow Kaplan et al. 2020 (Table 1) and Chinchilla (Hoffmann
  et al. 2022, App. F): a multiply-add is 2 FLOPs, so every weight used in a matmul costs
  2 FLOPs; the embedding lookup and the norms cost nothing; the output projection costs
  `2 · d_model · vocab` whether tied or not; attention adds, per layer, `2 · seq · d_qk`
  for the scores q·kᵀ and `2 · seq · d_v` for the weighted sum of values, with `d_qk =
  d_v = num_heads · head_dim` (GQA; for MLA `num_heads · (qk_nope + qk_rope)` and
  `num_heads · v_head_dim`, the expanded form it trains with) and every query counted
  against all `seq` keys (no halving for the causal mask, as in both papers, and as the
  model computes it). Softmax, activation
  and routing arithmetic other than the router matmul are ignored; so is capacity
  padding (the einsum/sort dispatches also multiply the empty slots of their buffers).
* Training costs about 3× the forward FLOPs (backward ≈ 2× forward), i.e. the familiar
  `6 · N` per token with N the active matmul parameters, plus attention.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from moejax.layers.activations import is_gated
from moejax.layers.attention_kinds import kind_of
from moejax.models.transformer import expert_d_ff_of, moe_layer_indices, validate_config


def _ffn_params(d_model: int, d_ff: int, activation: str) -> int:
  """Weights of one bias-free FFN: up and down, plus the gate for SwiGLU/GeGLU."""
  return (3 if is_gated(activation) else 2) * d_model * d_ff


def experts_per_token(config: ml_collections.ConfigDict) -> float:
  """How many routed experts one token uses on average (see the module docstring)."""
  if config.router == "dense":
    return config.num_experts
  if config.router == "expert_choice":
    return min(config.capacity_factor * config.top_k, config.num_experts)
  return config.top_k


def _layer_params(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Parameters of the parts of one layer, by kind: `attention` (its matmul weights),
  `vectors` (the two RMSNorms, four with `post_norms`, and attention's vector parameters: no
  matmul), `dense_ffn`, `router` (with Switch's router bias), `expert` (one routed expert),
  `shared` (the shared branch, with its sigmoid gate)."""
  d = config.d_model
  attention, attention_vectors = kind_of(config).params(config)
  e_ff = expert_d_ff_of(config) if config.num_experts else 0
  shared_ff = (
    (config.shared_expert_d_ff or config.num_shared_experts * e_ff)
    if config.num_shared_experts
    else 0
  )
  return {
    "attention": attention,
    "vectors": (4 if config.post_norms else 2) * d + attention_vectors,
    "dense_ffn": _ffn_params(d, config.d_ff, config.activation),
    # Noisy top-k has a second router matrix, W_noise (Shazeer et al. 2017).
    "router": d * config.num_experts * (2 if config.router == "noisy_top_k" else 1)
    + (config.num_experts if config.router_bias else 0),
    "expert": _ffn_params(d, e_ff, config.activation),
    "shared": _ffn_params(d, shared_ff, config.activation)
    + (d if config.shared_expert_gate else 0),
  }


def _count(config: ml_collections.ConfigDict, routed_experts: float) -> dict[str, float]:
  """Parameter counts when each MoE layer uses `routed_experts` of its experts.

  Returns `total`, `embedding` (token table, plus the output projection when untied) and
  `matmul` (the weights multiplied in a forward pass: all but the norm scales and the
  lookup table; a tied table counts once, as the output projection).
  """
  validate_config(config)
  p = _layer_params(config)
  moe_layers = len(moe_layer_indices(config))
  dense_layers = config.num_layers - moe_layers
  moe_ffn = p["router"] + routed_experts * p["expert"] + p["shared"]
  if config.dense_moe_hybrid:
    moe_ffn += p["dense_ffn"]
  layer_matmul = (
    config.num_layers * p["attention"] + dense_layers * p["dense_ffn"] + moe_layers * moe_ffn
  )
  vectors = config.num_layers * p["vectors"] + config.d_model  # + the final RMSNorm
  table = config.vocab_size * config.d_model
  embedding = table if config.tie_embeddings else 2 * table
  return {
    "total": layer_matmul + vectors + embedding,
    "embedding": embedding,
    "matmul": layer_matmul + table,
  }


def count_params(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Analytic parameter counts of `TransformerLM(config)`.

  Args:
    config: the model config (`config.model`).

  Returns:
    `total`: every parameter (an int); `active`: the parameters one token uses (an int,
    except a float for expert choice with a fractional `capacity_factor · top_k`);
    `embedding`: the token embedding, plus the output projection when untied. Both total
    and active include `embedding`.
  """
  total = _count(config, config.num_experts)
  active = _count(config, experts_per_token(config))
  return {"total": total["total"], "active": active["total"], "embedding": total["embedding"]}


def flops_per_token(config: ml_collections.ConfigDict, seq_len: int) -> dict[str, float]:
  """Analytic forward FLOPs per token at context length `seq_len` (module docstring).

  Returns:
    `active`: what the sparse model computes; `total`: what it would compute if every
    token went through every expert (the dense equivalent). Multiply by 3 for training.
  """
  qk, v = kind_of(config).score_widths(config)
  attention = config.num_layers * 2 * seq_len * (qk + v)  # scores q·k, then the values
  return {
    "total": 2 * _count(config, config.num_experts)["matmul"] + attention,
    "active": 2 * _count(config, experts_per_token(config))["matmul"] + attention,
  }


def count_model_params(model: nnx.Module) -> int:
  """The number of scalars in every `nnx.Param` of a built model."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
