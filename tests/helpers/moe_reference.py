"""An independent NumPy reference of the MoE layer: explicit loops over tokens and experts.

Written from the papers' definitions, not from moejax's code: float64, a Python loop for
the capacity queue (rank 1 before rank 2, then token order) and one FFN call per
(token, expert) pair.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(logits):
  z = logits - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def ffn(x, w_in, w_gate, w_out, activation, keep=1.0):
  """One expert on one token vector `[d]`; `keep` scales the hidden layer (dropout)."""
  pre = x @ w_in
  if activation == "swiglu":
    g = x @ w_gate
    hidden = g / (1 + np.exp(-g)) * pre
  elif activation == "geglu":
    g = x @ w_gate
    hidden = _gelu(g) * pre
  elif activation == "geglu_tanh":
    g = x @ w_gate
    hidden = _tanh_gelu(g) * pre
  elif activation == "relu":
    hidden = np.maximum(pre, 0)
  elif activation == "gelu_tanh":
    hidden = _tanh_gelu(pre)
  else:
    hidden = _gelu(pre)
  return (hidden * keep) @ w_out


def _tanh_gelu(v):
  """GELU's tanh approximation, 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
  return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


def _gelu(v):
  """x·Φ(x), Φ the standard normal CDF (the exact GELU)."""
  return v * 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))


def layer_params(layer):
  """float64 NumPy copies of a MoeLayer's weights."""
  get = lambda p: None if p is None else np.asarray(p[...], np.float64)
  return dict(
    router=get(layer.router_kernel),
    w_in=get(layer.experts.w_in),
    w_gate=get(layer.experts.w_gate),
    w_out=get(layer.experts.w_out),
  )


def capacity(group, num_experts, k, factor, min_capacity):
  return min(group, max(min_capacity, math.ceil(factor * group * k / num_experts)))


def token_choice(
  x,
  params,
  *,
  num_experts,
  top_k,
  activation,
  renormalize=False,
  capacity_per_expert=None,
  group_size=None,
  probs_fn=softmax,
):
  """Reference token-choice MoE. `x` `[tokens, d]`; capacity None means dropless.

  Returns (y `[tokens, d]`, number of dropped assignments).
  """
  tokens, d = x.shape
  group_size = group_size or tokens
  probs = probs_fn(x @ params["router"])
  y = np.zeros((tokens, d))
  dropped = 0
  for start in range(0, tokens, group_size):
    group = range(start, start + group_size)
    choices = {}
    for t in group:
      order = np.argsort(-probs[t], kind="stable")[:top_k]
      gates = probs[t, order]
      if renormalize:
        gates = gates / gates.sum()
      choices[t] = list(zip(order, gates, strict=True))
    used = np.zeros(num_experts, int)
    for rank in range(top_k):
      for t in group:
        e, gate = choices[t][rank]
        if capacity_per_expert is not None and used[e] >= capacity_per_expert:
          dropped += 1
          continue
        used[e] += 1
        w_gate = None if params["w_gate"] is None else params["w_gate"][e]
        y[t] += gate * ffn(x[t], params["w_in"][e], w_gate, params["w_out"][e], activation)
  return y, dropped


def expert_choice(x, params, *, num_experts, capacity_per_expert, activation, group_size=None):
  """Reference expert-choice MoE: each expert takes its top-C tokens of each group."""
  tokens, d = x.shape
  group_size = group_size or tokens
  probs = softmax(x @ params["router"])
  y = np.zeros((tokens, d))
  for start in range(0, tokens, group_size):
    for e in range(num_experts):
      column = probs[start : start + group_size, e]
      for t in np.argsort(-column, kind="stable")[:capacity_per_expert]:
        w_gate = None if params["w_gate"] is None else params["w_gate"][e]
        y[start + t] += column[t] * ffn(
          x[start + t], params["w_in"][e], w_gate, params["w_out"][e], activation
        )
  return y


def dispatch_combine(x, expert_indices, gates, valid, expert_fn, capacity=None):
  """Reference token-choice dispatch and combine of one routing group, routing given.

  `x` `[tokens, d]`; `expert_indices`, `gates`, `valid` `[tokens, k]`; `expert_fn(e, v)` an
  expert on one vector. Every rank-1 assignment is queued before any rank-2 one, then
  token order; `capacity` None means no limit. Returns (y `[tokens, d]`, kept `[tokens, k]`).
  """
  tokens, k = expert_indices.shape
  y = np.zeros_like(x, dtype=np.float64)
  kept = np.zeros((tokens, k), bool)
  used = {}
  for rank in range(k):
    for t in range(tokens):
      if not valid[t, rank]:
        continue
      e = int(expert_indices[t, rank])
      if capacity is not None and used.get(e, 0) >= capacity:
        continue
      used[e] = used.get(e, 0) + 1
      kept[t, rank] = True
      y[t] += gates[t, rank] * expert_fn(e, x[t])
  return y, kept


def expert_choice_dispatch_combine(x, token_indices, gates, expert_fn):
  """Reference expert-choice dispatch and combine of one group: expert `e` takes the tokens
  `token_indices[e]` `[capacity]` with weights `gates[e]`. Returns (y, taken `[tokens]`)."""
  y = np.zeros_like(x, dtype=np.float64)
  taken = np.zeros(x.shape[0], bool)
  for e in range(token_indices.shape[0]):
    for t, g in zip(token_indices[e], gates[e], strict=True):
      y[t] += g * expert_fn(e, x[t])
      taken[t] = True
  return y, taken
