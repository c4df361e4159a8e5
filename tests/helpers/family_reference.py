"""NumPy references of the 2024-2026 MoE families, written from the papers and model cards.

Independent of moejax's code: float64, Python loops over tokens, experts and heads, one
formula per line, each with its source. Used by `tests/test_routing_families.py`,
`tests/test_mla.py` and `tests/test_family_reference.py` (which checks these references on
cases small enough to do by hand), and by the layer and model tests that integrate them.

Sources:
* DeepSeek-V2: arXiv:2405.04434 (MLA §2.1; DeepSeekMoE and device-limited routing §2.2).
* DeepSeek-V3: arXiv:2412.19437 §2.1.2 (sigmoid scores eq. 15, normalised gates eq. 13,
  selection bias eq. 16, sequence-wise balance loss eqs. 17-20, node-limited routing);
  config.json of deepseek-ai/DeepSeek-V3 for `routed_scaling_factor` (2.5), n_group (8),
  topk_group (4).
* Aux-loss-free balancing: Wang et al. 2024, arXiv:2408.15664, Algorithm 1.
* Qwen2-MoE: the Qwen1.5-MoE-A2.7B / Qwen2-57B-A14B model cards and config.json (a shared
  expert of `shared_expert_intermediate_size`, gated by sigmoid(x · w), `[d_model, 1]`;
  `norm_topk_prob` false for Qwen1.5-MoE-A2.7B).
* Llama 4: HF transformers `Llama4TextMoe` (top-1, gate σ(logit) applied to the expert's
  *input*, plus a shared expert).
* Global-batch LB: Qiu et al. 2025, arXiv:2501.11873.
"""

from __future__ import annotations

import math

import numpy as np

from helpers.moe_reference import ffn, softmax


def sigmoid(v):
  return 1.0 / (1.0 + np.exp(-np.asarray(v, np.float64)))


def scores_of(logits, score_fn):
  """Router scores of `[..., experts]` logits: softmax, or sigmoid (DeepSeek-V3 eq. 15)."""
  if score_fn == "softmax":
    return softmax(np.asarray(logits, np.float64))
  if score_fn == "sigmoid":
    return sigmoid(logits)
  raise ValueError(score_fn)


# ----------------------------------------------------------------------------- routing


def route_token(
  scores,
  k,
  *,
  bias=None,
  num_groups=1,
  topk_groups=None,
  group_top=2,
  normalize=False,
  scale=1.0,
):
  """The experts and gates of one token, `scores` `[E]`. Returns (experts list, gates list).

  DeepSeek-V3 §2.1.2: selection by s + b (eq. 16), within the `topk_groups` groups of
  highest sum-of-top-`group_top` selection score (node-limited routing); gates from the
  unbiased s (eq. 16), normalised over the chosen (eq. 13), times the routed scaling
  factor. Ties go to the lower index (a stable sort).
  """
  scores = [float(s) for s in scores]
  num_experts = len(scores)
  select = list(scores)
  if bias is not None:
    select = [scores[e] + float(bias[e]) for e in range(num_experts)]
  allowed = list(range(num_experts))
  if num_groups > 1:
    size = num_experts // num_groups
    group_score = []
    for g in range(num_groups):
      members = sorted((select[e] for e in range(g * size, (g + 1) * size)), reverse=True)
      group_score.append(sum(members[:group_top]))
    kept = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
    allowed = [e for e in range(num_experts) if e // size in kept]
  chosen = sorted(allowed, key=lambda e: -select[e])[:k]
  gates = [scores[e] for e in chosen]
  if normalize:
    total = sum(gates)
    gates = [g / total for g in gates]
  return chosen, [g * scale for g in gates]


def update_bias(bias, counts, rate):
  """Wang et al. 2024, Algorithm 1: b_i + u · sign(mean(c) - c_i), per expert."""
  mean = sum(counts) / len(counts)
  out = []
  for b, c in zip(bias, counts, strict=True):
    error = mean - c
    out.append(b + rate * (1.0 if error > 0 else -1.0 if error < 0 else 0.0))
  return np.array(out)


def switch_lb(probs, indices, num_experts):
  """E · Σ_i f_i P_i, f over the T·k assignments, P the mean probability (Switch eq. 4)."""
  probs = np.asarray(probs, np.float64).reshape(-1, num_experts)
  indices = np.asarray(indices).reshape(-1)
  f = np.array([np.sum(indices == i) for i in range(num_experts)]) / indices.size
  return num_experts * float(np.sum(f * probs.mean(0)))


def group_lb(probs, indices, num_experts):
  """The mean over groups (leading axis) of each group's Switch LB loss."""
  return float(np.mean([switch_lb(p, i, num_experts) for p, i in zip(probs, indices, strict=True)]))


def sequence_aux_loss(scores, indices, num_experts):
  """DeepSeek-V3 eqs. 17-20 without α, averaged over sequences.

  `scores` `[batch, seq, E]`, `indices` `[batch, seq, k]`.
  """
  batch, seq, _ = scores.shape
  k = indices.shape[-1]
  losses = []
  for b in range(batch):
    total = 0.0
    for i in range(num_experts):
      chosen = sum(1 for t in range(seq) for r in range(k) if indices[b, t, r] == i)
      f = num_experts / (k * seq) * chosen  # eq. 18
      p = sum(scores[b, t, i] / scores[b, t].sum() for t in range(seq)) / seq  # eqs. 19-20
      total += f * p  # eq. 17
    losses.append(total)
  return float(np.mean(losses))


# ----------------------------------------------------------------------------- MoE blocks


def _expert(params, e, v):
  return ffn(v, params["w_in"][e], params["w_gate"][e], params["w_out"][e], "swiglu")


def _shared(shared, v):
  return ffn(v, shared["w_in"], shared["w_gate"], shared["w_out"], "swiglu")


def deepseek_v3_moe(
  x,
  params,
  *,
  top_k,
  num_groups=1,
  topk_groups=None,
  group_top=2,
  routed_scaling_factor=1.0,
  normalize=True,
  score_fn="sigmoid",
):
  """DeepSeek-V3 MoE block (§2.1.2 eq. 12): h = Σ_shared FFN(u) + Σ_i g_i · FFN_i(u).

  `x` `[tokens, d]`. `params`: `router` `[d, E]`, `bias` `[E]` or None (the selection
  bias), `w_in`, `w_gate` `[E, d, f]`, `w_out` `[E, f, d]` (SwiGLU experts), and `shared`:
  None or a dict of one SwiGLU FFN of width n_shared · f (the shared experts as one dense
  FFN, as DeepSeek's code builds them), ungated. Returns (y `[tokens, d]`, chosen
  `[tokens, k]`). DeepSeek-V2 is score_fn='softmax', normalize=False, group_top=1.
  """
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  chosen_all = []
  for t in range(x.shape[0]):
    scores = scores_of(x[t] @ params["router"], score_fn)
    chosen, gates = route_token(
      scores,
      top_k,
      bias=None if params.get("bias") is None else list(params["bias"]),
      num_groups=num_groups,
      topk_groups=topk_groups,
      group_top=group_top,
      normalize=normalize,
      scale=routed_scaling_factor,
    )
    chosen_all.append(chosen)
    for e, g in zip(chosen, gates, strict=True):
      y[t] += g * _expert(params, e, x[t])
    if params.get("shared") is not None:
      y[t] += _shared(params["shared"], x[t])
  return y, np.array(chosen_all)


def qwen2_moe(x, params, *, top_k, norm_topk_prob=False):
  """Qwen2-MoE block: softmax top-k routed experts + σ(x · w_sg) · shared expert.

  `params`: `router` `[d, E]`, expert weights as in `deepseek_v3_moe`, `shared` (one SwiGLU
  FFN of `shared_expert_intermediate_size`) and `shared_gate` `[d, 1]`. Gates are the raw
  softmax probabilities of the chosen experts unless `norm_topk_prob` (False for
  Qwen1.5-MoE-A2.7B and Qwen2-57B-A14B, True for Qwen3-MoE, which has no shared expert).
  """
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    probs = softmax(x[t] @ params["router"])
    chosen, gates = route_token(probs, top_k, normalize=norm_topk_prob)
    for e, g in zip(chosen, gates, strict=True):
      y[t] += g * _expert(params, e, x[t])
    if params.get("shared") is not None:
      shared_gate = sigmoid(x[t] @ params["shared_gate"][:, 0])
      y[t] += shared_gate * _shared(params["shared"], x[t])
  return y


def llama4_moe(x, params, *, top_k=1):
  """Llama 4 MoE block: y = Σ_chosen FFN_e(σ(l_e) · x) + FFN_shared(x).

  Top-k by logit, gate σ(logit) (no normalisation), and the gate multiplies the expert's
  *input* (HF `Llama4TextMoe`: `routed_in = hidden_states * router_scores`), not its
  output; for a SwiGLU expert the two differ.
  """
  x = np.asarray(x, np.float64)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    logits = x[t] @ params["router"]
    chosen = sorted(range(len(logits)), key=lambda e: -logits[e])[:top_k]
    for e in chosen:
      y[t] += _expert(params, e, sigmoid(logits[e]) * x[t])
    if params.get("shared") is not None:
      y[t] += _shared(params["shared"], x[t])
  return y


# ----------------------------------------------------------------------------- MLA


def rms_norm(v, scale, eps):
  v = np.asarray(v, np.float64)
  return v / math.sqrt(float(np.mean(v * v)) + eps) * scale


def rope(v, position, base, layout="half", freqs=None, scale=1.0):
  """RoPE of one vector `[D]` at `position` (Su et al. 2021): channel pair j turns by
  position · base^(-2j/D) (or `freqs[j]`, YaRN's), and the result is multiplied by
  `scale` (YaRN's attention factor). 'half' pairs (j, j + D/2) (GPT-NeoX, LLaMA, moejax's
  `apply_rope`); 'interleaved' pairs (2j, 2j + 1) (the RoFormer paper, and DeepSeek's
  released code, which views the pairs as complex numbers)."""
  v = np.asarray(v, np.float64)
  dim = v.shape[0]
  out = np.zeros(dim)
  for j in range(dim // 2):
    theta = position * (base ** (-2.0 * j / dim) if freqs is None else freqs[j])
    a, b = (j, j + dim // 2) if layout == "half" else (2 * j, 2 * j + 1)
    out[a] = (v[a] * math.cos(theta) - v[b] * math.sin(theta)) * scale
    out[b] = (v[b] * math.cos(theta) + v[a] * math.sin(theta)) * scale
  return out


def yarn(dim, base, factor, original, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.0):
  """YaRN (Peng et al. 2023, arXiv:2309.00071) for a rotated part of `dim` channels, as the
  released configs ask for it (DeepSeek-V3, Kimi K2): (the frequency of each channel pair,
  the factor on the rotated vectors, DeepSeek's factor on the softmax scale).

  Channel pair j has frequency f_j = base^(-2j/dim). The channel c(r) = dim · ln(original /
  (2π r)) / (2 ln base) is where a frequency turns r times in the original context; pairs
  below floor(c(beta_fast)) keep f_j, pairs above ceil(c(beta_slow)) take f_j / factor,
  and between, the weight of f_j falls linearly with j. m(a) = 0.1 · a · ln(factor) + 1.
  """

  def channel(rotations):
    return dim * math.log(original / (2 * math.pi * rotations)) / (2 * math.log(base))

  low = max(math.floor(channel(beta_fast)), 0)
  high = min(math.ceil(channel(beta_slow)), dim - 1)
  freqs = []
  for j in range(dim // 2):
    f = base ** (-2.0 * j / dim)
    interpolated = min(max((j - low) / (high - low if high != low else 0.001), 0.0), 1.0)
    freqs.append(f * (1 - interpolated) + f / factor * interpolated)
  m = lambda a: 0.1 * a * math.log(factor) + 1.0
  attention = m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)
  return freqs, attention, (m(mscale_all_dim) ** 2 if mscale_all_dim else 1.0)


def mla(
  x,
  params,
  *,
  num_heads,
  qk_nope_head_dim,
  qk_rope_head_dim,
  v_head_dim,
  rope_base,
  eps,
  positions=None,
  rope_layout="half",
  rope_freqs=None,
  rope_scale=1.0,
  softmax_factor=1.0,
):
  """Causal multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, §2.1, eqs. 9-19).

  `x` `[batch, seq, d]`; per token t (d_h^R = qk_rope_head_dim):

      c_Q  = RMSNorm(x W^DQ)                  (eq. 12; `q_down`, `q_norm`; if q_down given)
      q^C  = c_Q W^UQ, q^R = RoPE(c_Q W^QR)  (eqs. 13-14; `q_up` holds both per head:
                                              [nope | rope] for each head; or `q` from x)
      c_KV = RMSNorm(x W^DKV)                 (eq. 9; `kv_down`, `kv_norm`)
      k^C  = c_KV W^UK, v^C = c_KV W^UV       (eqs. 10-11; `kv_up`: [nope | v] per head)
      k^R  = RoPE(x W^KR)                     (eq. 15; `k_rope`, one key shared by heads)
      o_h  = Σ_j softmax_j((q_h · k_hj) / sqrt(d_nope + d_h^R)) v_hj over j <= t  (eq. 18)
      y    = [o_1; ...; o_H] W^O              (eq. 19; `o`)

  with q_h = [q^C_h; q^R_h] and k_hj = [k^C_hj; k^R_j] (eqs. 16-17). The RMSNorms on the
  latents are DeepSeek's released code (`q_a_layernorm`, `kv_a_layernorm`), not in the
  paper's equations. YaRN (`yarn`) gives `rope_freqs` and `rope_scale`, and multiplies the
  softmax scale by `softmax_factor`. Returns `[batch, seq, d]` float64.
  """
  x = np.asarray(x, np.float64)
  batch, seq, _ = x.shape
  positions = np.arange(seq) if positions is None else np.asarray(positions)
  qk_dim = qk_nope_head_dim + qk_rope_head_dim
  scale = softmax_factor / math.sqrt(qk_dim)
  y = np.zeros((batch, seq, params["o"].shape[1]))
  for b in range(batch):
    q = np.zeros((seq, num_heads, qk_dim))
    k_nope = np.zeros((seq, num_heads, qk_nope_head_dim))
    value = np.zeros((seq, num_heads, v_head_dim))
    k_rot = np.zeros((seq, qk_rope_head_dim))
    for t in range(seq):
      if params.get("q_down") is not None:
        c_q = rms_norm(x[b, t] @ params["q_down"], params["q_norm"], eps)
        q_t = (c_q @ params["q_up"]).reshape(num_heads, qk_dim)
      else:
        q_t = (x[b, t] @ params["q"]).reshape(num_heads, qk_dim)
      for h in range(num_heads):
        q[t, h, :qk_nope_head_dim] = q_t[h, :qk_nope_head_dim]
        q[t, h, qk_nope_head_dim:] = rope(
          q_t[h, qk_nope_head_dim:], positions[t], rope_base, rope_layout, rope_freqs, rope_scale
        )
      c_kv = rms_norm(x[b, t] @ params["kv_down"], params["kv_norm"], eps)
      kv_t = (c_kv @ params["kv_up"]).reshape(num_heads, qk_nope_head_dim + v_head_dim)
      k_nope[t] = kv_t[:, :qk_nope_head_dim]
      value[t] = kv_t[:, qk_nope_head_dim:]
      k_rot[t] = rope(
        x[b, t] @ params["k_rope"], positions[t], rope_base, rope_layout, rope_freqs, rope_scale
      )
    for t in range(seq):
      heads = []
      for h in range(num_heads):
        logits = []
        for j in range(t + 1):
          key = np.concatenate([k_nope[j, h], k_rot[j]])
          logits.append(float(q[t, h] @ key) * scale)
        weights = softmax(np.array(logits))
        heads.append(sum(w * value[j, h] for j, w in enumerate(weights)))
      y[b, t] = np.concatenate(heads) @ params["o"]
  return y


def interleaved_to_half(dim):
  """The channel permutation p with rope_half(v[p]) = rope_interleaved(v)[p]: evens, then odds.

  HF transformers' DeepSeek-V3 (`rope_interleave=True`, `apply_rotary_pos_emb_interleave`)
  reorders the rope channels of q and k this way, then applies rotate-half RoPE."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
