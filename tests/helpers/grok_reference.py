"""A NumPy reference of Grok-1, written from xAI's released JAX code (xai-org/grok-1,
`model.py`; the shape in `run.py`), independent of moejax's code: float64, loops over
tokens, heads and experts, each step named after the Haiku module it follows.

Parameters use Grok-1's own names (its Haiku paths), per layer:
  `rms_norm`, `rms_norm_1`, `rms_norm_2`, `rms_norm_3`: RMSNorm scales `[d]`, created in
    this order in `DecoderLayer.__call__`: before the attention, after it, before the
    MoE (or dense) block, after it;
  `attn`: `query` `[d, H·D]`, `key` and `value` `[d, KV·D]`, `linear` `[H·D, d]` (bias-free);
  MoE layers: `router` `[d, E]` and `moe`: `linear` (gelu'd), `linear_v` `[E, d, F]`,
    `linear_1` `[E, F, d]`; dense layers (`num_experts` <= 1): `dense`, the same unstacked.
and for the model `in_out_embed` `[vocab, d]` (tied: it also decodes) and the final
`rms_norm` `[d]`.
"""

from __future__ import annotations

import math

import numpy as np

# run.py's Grok-1 constants.
ATTN_OUTPUT_MULTIPLIER = 0.08838834764831845  # = 128 ** -0.5
MAX_ATTN_VAL = 30.0  # MultiHeadAttention: attn_logits = 30 · tanh(attn_logits / 30)
EMBEDDING_MULTIPLIER = 78.38367176906169  # = sqrt(6144)
OUTPUT_MULTIPLIER = 0.5773502691896257  # = 1 / sqrt(3)
RMS_EPS = 1e-5  # RMSNorm's default eps, which hk_rms_norm keeps
ROPE_BASE = 10000  # RotaryEmbedding(base_exponent=int(1e4))


def rms_norm(x, scale, eps=RMS_EPS):
  """`RMSNorm.__call__`: `scale · x · rsqrt(mean(x²) + eps)` over the last axis (not 1 + scale)."""
  x = np.asarray(x, np.float64)
  mean_squared = np.mean(np.square(x), axis=-1, keepdims=True)
  return scale * (x / np.sqrt(mean_squared + eps))


def rotary(x, offset=0, base=ROPE_BASE):
  """`RotaryEmbedding.__call__` on one sequence `[T, heads, D]` starting at position `offset`:
  `x · cos(phase) + rotate_half(x) · sin(phase)`, the phase tiled over both halves."""
  dim = x.shape[-1]
  exponents = np.arange(0, dim, 2, dtype=np.float64)
  inv_freq = 1.0 / (base ** (exponents / dim))
  t = np.arange(x.shape[0], dtype=np.float64) + offset
  phase = np.tile(np.einsum("i,j->ij", t, inv_freq), (1, 2))[:, None, :]  # [T, 1, D]
  x1, x2 = np.split(x, 2, axis=-1)
  rotated = np.concatenate([-x2, x1], axis=-1)  # rotate_half
  return x * np.cos(phase) + rotated * np.sin(phase)


def softmax(v):
  v = np.asarray(v, np.float64)
  e = np.exp(v - v.max())
  return e / e.sum()


def attend(q, k, v, *, multiplier=ATTN_OUTPUT_MULTIPLIER, max_attn_val=MAX_ATTN_VAL):
  """Causal GQA of one sequence, the core of `MultiHeadAttention.__call__`.

  `q` `[T, H, D]`, `k` and `v` `[T, KV, D]`; query head h reads KV head h // (H / KV)
  (its reshape to `[T, KV, H / KV, D]`). Per head and query t: logits `q_t · k_s ·
  multiplier`, then `max_attn_val · tanh(logits / max_attn_val)` (None: no cap), masked
  to s <= t with -1e30, softmax. Returns `[T, H, D]`.
  """
  seq, heads, dim = q.shape
  group = heads // k.shape[1]
  out = np.zeros((seq, heads, v.shape[-1]))
  for h in range(heads):
    kv = h // group
    for t in range(seq):
      logits = np.array([q[t, h] @ k[s, kv] for s in range(seq)]) * multiplier
      if max_attn_val is not None:
        logits = max_attn_val * np.tanh(logits / max_attn_val)
      logits[t + 1 :] = -1e30
      out[t, h] = softmax(logits) @ v[:, kv]
  return out


def attention(x, p, *, num_q_heads, num_kv_heads, key_size, multiplier=ATTN_OUTPUT_MULTIPLIER):
  """`MHABlock` on one sequence `x` `[T, d]` (no KV memory): q, k, v projections, RoPE on
  q and k, `attend`, the output projection `linear`. Returns `[T, d]`."""
  seq = x.shape[0]
  q = (x @ p["query"]).reshape(seq, num_q_heads, key_size)
  k = (x @ p["key"]).reshape(seq, num_kv_heads, key_size)
  v = (x @ p["value"]).reshape(seq, num_kv_heads, key_size)
  k, q = rotary(k), rotary(q)
  return attend(q, k, v, multiplier=multiplier).reshape(seq, -1) @ p["linear"]


def gelu(x):
  """`jax.nn.gelu` as model.py calls it: the default, tanh approximation."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def dense_block(x, w):
  """`DenseBlock` on one vector `[d]`: `linear_1(gelu(linear(x)) · linear_v(x))`."""
  return (gelu(x @ w["linear"]) * (x @ w["linear_v"])) @ w["linear_1"]


def moe(x, router, experts, *, num_selected_experts):
  """`MoELayer._inference_call` on `x` `[T, d]`: routing probabilities `softmax(x ·
  router)` (`Router._compute_routing_prob`, float32 there), the top `num_selected_experts`
  of them (`jax.lax.top_k`: largest first, ties to the lower index) as gates, not
  renormalised; each token the gate-weighted sum of its experts' `DenseBlock`s."""
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    probs = softmax(x[t] @ router)
    for e in np.argsort(-probs, kind="stable")[:num_selected_experts]:
      expert = {name: w[e] for name, w in experts.items()}
      y[t] += probs[e] * dense_block(x[t], expert)
  return y


def decoder_layer(
  h,
  p,
  *,
  num_q_heads,
  num_kv_heads,
  key_size,
  num_selected_experts=2,
  attn_output_multiplier=ATTN_OUTPUT_MULTIPLIER,
):
  """`DecoderLayer.__call__` on one sequence `h` `[T, d]`:

  h = h + rms_norm_1(attention(rms_norm(h)))
  h = h + rms_norm_3(moe(rms_norm_2(h)))      (dense_block with num_experts <= 1)
  """
  attn = attention(
    rms_norm(h, p["rms_norm"]),
    p["attn"],
    num_q_heads=num_q_heads,
    num_kv_heads=num_kv_heads,
    key_size=key_size,
    multiplier=attn_output_multiplier,
  )
  h = h + rms_norm(attn, p["rms_norm_1"])
  x = rms_norm(h, p["rms_norm_2"])
  if "router" in p:
    ffn = moe(x, p["router"], p["moe"], num_selected_experts=num_selected_experts)
  else:
    ffn = np.stack([dense_block(row, p["dense"]) for row in x])
  return h + rms_norm(ffn, p["rms_norm_3"])


def language_model(
  tokens,
  params,
  *,
  embedding_multiplier=EMBEDDING_MULTIPLIER,
  output_multiplier=OUTPUT_MULTIPLIER,
  **dims,
):
  """`LanguageModel.__call__` on `tokens` `[batch, T]`: embeddings `in_out_embed[tokens] ·
  embedding_multiplier`, the decoder layers (`params['layers']`), the final `rms_norm`,
  then the tied decode `h · in_out_embedᵀ · output_multiplier`. `dims`: `decoder_layer`'s
  keywords. Tokens must be > 0: Grok masks its pad token 0 out of the keys, which this
  leaves out. Returns logits `[batch, T, vocab]`."""
  assert np.all(np.asarray(tokens) > 0), "token 0 is Grok-1's padding"
  table = np.asarray(params["in_out_embed"], np.float64)
  out = []
  for row in np.asarray(tokens):
    h = table[row] * embedding_multiplier
    for layer in params["layers"]:
      h = decoder_layer(h, layer, **dims)
    h = rms_norm(h, params["rms_norm"])
    out.append(h @ table.T * output_multiplier)
  return np.stack(out)
