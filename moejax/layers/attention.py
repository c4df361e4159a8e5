"""Causal self-attention: rotary positions (RoPE), grouped key/value heads (GQA), QK-norm,
attention-logit soft-capping (Grok-1), document masking for packed rows
(`moejax.layers.document_mask`), and a KV cache for decoding.

Multi-head latent attention (DeepSeek-V2) is in `moejax.layers.mla`, with the same call.
`GQA` is this module's attention kind (`model.attention='gqa'`, `moejax.layers.attention_kind`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.layers.attention_kernel import (
  causal_attention,
  check_kernel,
  grouped_query_attention,
  kernel_for,
)
from moejax.layers.attention_kind import AttentionKind, HfTensor, Require
from moejax.layers.document_mask import check_segments
from moejax.layers.ffn import on_rows
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import Rope, apply_rope
from moejax.layers.saved_names import ATTENTION_CONTEXT, ATTENTION_OUT, ATTENTION_QKV
from moejax.parallel.sharding import logical, mesh_platform

# One layer's KV cache: {'k': [batch, max_len, num_kv_heads, head_dim], 'v': same}.
LayerCache = dict[str, jax.Array]

QK_NORMS = ("none", "head", "full")


def qk_norm_mode(value) -> str:
  """`model.qk_norm` as one of `QK_NORMS`; True/False (or their strings, as the command line
  gives them) mean 'head'/'none'."""
  mode = {True: "head", False: "none", "True": "head", "False": "none"}.get(value, value)
  if mode not in QK_NORMS:
    raise ValueError(
      f"qk_norm={value!r} is not supported; allowed: {', '.join(map(repr, QK_NORMS))}."
    )
  return mode


class CausalSelfAttention(nnx.Module):
  """Causal self-attention with RoPE, grouped KV heads, optional QK-norm and q/k/v biases.

  Projections: q `[d_model, heads·head_dim]`, k and v `[d_model, kv_heads·head_dim]`,
  o `[heads·head_dim, d_model]`, fan-in scaled (LeCun normal); `qkv_bias` adds biases to
  q, k and v (Qwen2), o never has one. QK-norm is RMSNorm on the queries and keys before
  RoPE: `'head'` one `[head_dim]` scale each for q and k, shared by the heads (Dehghani et
  al. 2023, Qwen3); `'full'` over the whole q `[heads·head_dim]` and k
  `[kv_heads·head_dim]` projections (OLMoE, Muennighoff et al. 2024). `logit_cap` soft-caps
  the attention logits (`grouped_query_attention`; Grok-1), in the cached decode too.
  `kernel` (`model.attention_kernel`) picks what computes the forward pass's attention on
  `mesh`'s platform (`moejax.layers.attention_kernel`); the cached decode is the einsum.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    rope_base: float | Rope,
    qk_norm: str = "none",
    qkv_bias: bool = False,
    norm_eps: float = 1e-6,
    logit_cap: float | None = None,
    kernel: str = "auto",
    mesh=None,
    dtype: Any,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    check_kernel(kernel, logit_cap)
    self.kernel, self.mesh, self.platform = kernel, mesh, mesh_platform(mesh)
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope = rope_base if isinstance(rope_base, Rope) else Rope(float(rope_base))
    self.logit_cap = logit_cap or None
    self.qk_norm = qk_norm = qk_norm_mode(qk_norm)

    def linear(fan_in, fan_out, names, bias):
      return nnx.Linear(
        fan_in,
        fan_out,
        use_bias=bias,
        dtype=dtype,
        kernel_metadata=logical(*names),
        bias_metadata=logical(names[1]),
        rngs=rngs,
      )

    self.q_proj = linear(d_model, num_heads * head_dim, ("embed", "heads"), qkv_bias)
    self.k_proj = linear(d_model, num_kv_heads * head_dim, ("embed", "kv_heads"), qkv_bias)
    self.v_proj = linear(d_model, num_kv_heads * head_dim, ("embed", "kv_heads"), qkv_bias)
    self.o_proj = linear(num_heads * head_dim, d_model, ("heads", "embed"), False)
    q_dim, k_dim, names = {
      "head": (head_dim, head_dim, ("head_dim", "head_dim")),
      "full": (num_heads * head_dim, num_kv_heads * head_dim, ("heads", "kv_heads")),
      "none": (None, None, (None, None)),
    }[qk_norm]
    norm = lambda dim, name: None if dim is None else RMSNorm(dim, eps=norm_eps, axis_name=name)
    self.q_norm, self.k_norm = norm(q_dim, names[0]), norm(k_dim, names[1])

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache: LayerCache | None = None,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    """Attends every position to itself and to every earlier position (of its document).

    Args:
      x: `[batch, seq, d_model]`.
      positions: int32 RoPE positions: `[seq]`, consecutive absolute positions
        `start + arange(seq)` shared by the rows, or `[batch, seq]` per row (packed
        documents: each restarts at 0). Only `[seq]` with a cache.
      cache: None, or this layer's `{'k', 'v'}` each `[batch, max_len, kv_heads,
        head_dim]`; the new keys and values are written at `positions`, and the queries
        attend to every cached slot at a position <= their own.
      segment_ids: None (one document per row), or `[batch, seq]` int32, the document of
        each token (0 = padding): the mask is `moejax.layers.document_mask.self_attention_mask`
        (causal & same segment). Not with a cache.

    Returns:
      `([batch, seq, d_model], updated cache or None)`.
    """
    check_segments(x, positions, segment_ids, cache)
    batch, seq, _ = x.shape
    q, k, v = on_rows(self.q_proj, x), on_rows(self.k_proj, x), on_rows(self.v_proj, x)
    q, k, v = (checkpoint_name(a, ATTENTION_QKV) for a in (q, k, v))
    if self.qk_norm == "full" and self.q_norm and self.k_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = q.reshape(batch, seq, self.num_heads, self.head_dim)
    k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
    if self.qk_norm == "head" and self.q_norm and self.k_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope)
    k = apply_rope(k, positions, self.rope)
    if cache is None:
      kernel = kernel_for(
        self.kernel, self.platform, seq=seq, head_dims=(self.head_dim,), dtype=q.dtype,
        logit_cap=self.logit_cap,
      )  # fmt: skip
      out = causal_attention(
        q, k, v, positions=positions, segment_ids=segment_ids, kernel=kernel, mesh=self.mesh,
        logit_cap=self.logit_cap,
      )  # fmt: skip
    else:
      slot = (0, positions[0], 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), slot)
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), slot)
      cache = {"k": k, "v": v}
      key_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
      mask = key_positions[None, :] <= positions[:, None]  # [seq, kv_len]
      k, v = k.astype(q.dtype), v.astype(q.dtype)
      out = grouped_query_attention(q, k, v, mask, self.logit_cap)
    out = checkpoint_name(
      out.reshape(batch, seq, self.num_heads * self.head_dim), ATTENTION_CONTEXT
    )
    return checkpoint_name(on_rows(self.o_proj, out), ATTENTION_OUT), cache

  def init_cache(self, batch: int, max_len: int, dtype) -> LayerCache:
    """An empty cache: `{'k', 'v'}`, each `[batch, max_len, kv_heads, head_dim]` zeros."""
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# ----------------------------------------------------------------------------- the 'gqa' kind


def head_dim_of(config: ml_collections.ConfigDict) -> int:
  """`config.head_dim`, or `d_model // num_heads` when it is None."""
  return config.head_dim if config.head_dim is not None else config.d_model // config.num_heads


def _validate(config: ml_collections.ConfigDict, require: Require) -> None:
  require(
    config.num_heads % config.num_kv_heads == 0,
    f"num_kv_heads must divide num_heads={config.num_heads}, got {config.num_kv_heads}",
  )
  if config.head_dim is None:
    require(
      config.d_model % config.num_heads == 0,
      f"head_dim=None needs num_heads to divide d_model={config.d_model}, "
      f"got num_heads={config.num_heads}",
    )
  else:
    require(
      isinstance(config.head_dim, int) and config.head_dim >= 1,
      f"head_dim must be None or a positive int, got {config.head_dim!r}",
    )
  require(
    head_dim_of(config) % 2 == 0, f"head_dim must be even for RoPE, got {head_dim_of(config)}"
  )
  cap = config.attention_logit_cap
  require(
    cap is None or 0 <= cap < math.inf,
    f"attention_logit_cap must be None, 0 (off) or a finite number > 0, got {cap}",
  )


def _build(
  config: ml_collections.ConfigDict, *, dtype, mesh, rngs: nnx.Rngs
) -> CausalSelfAttention:
  return CausalSelfAttention(
    config.d_model, config.num_heads, config.num_kv_heads, head_dim_of(config),
    rope_base=Rope.from_config(config), qk_norm=config.qk_norm, qkv_bias=config.qkv_bias,
    norm_eps=config.norm_eps, logit_cap=config.attention_logit_cap,
    kernel=config.attention_kernel, mesh=mesh, dtype=dtype, rngs=rngs,
  )  # fmt: skip


def _params(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """q, k, v, o kernels; QK-norm scales and q/k/v biases."""
  d, heads, kv_heads, hd = (
    config.d_model,
    config.num_heads,
    config.num_kv_heads,
    head_dim_of(config),
  )
  qk_norm = {"none": 0, "head": 2 * hd, "full": (heads + kv_heads) * hd}[
    qk_norm_mode(config.qk_norm)
  ]
  qkv_bias = (heads + 2 * kv_heads) * hd if config.qkv_bias else 0
  return d * hd * (2 * heads + 2 * kv_heads), qk_norm + qkv_bias


def _score_widths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  width = config.num_heads * head_dim_of(config)
  return width, width


def _shrink(before: ml_collections.ConfigDict, after: ml_collections.ConfigDict, small: bool):
  """Keeps the query/key-value head ratio; head_dim follows d_model."""
  del small
  after.num_kv_heads = max(1, after.num_heads // (before.num_heads // before.num_kv_heads))
  after.head_dim = None


def _hf_tensors(config: ml_collections.ConfigDict) -> Iterator[HfTensor]:
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    yield HfTensor(f"{name}.weight", f"{name}/kernel")
    if config.qkv_bias and name != "o_proj":
      yield HfTensor(f"{name}.bias", f"{name}/bias", transpose=False)
  if qk_norm_mode(config.qk_norm) != "none":
    for name in ("q_norm", "k_norm"):
      yield HfTensor(f"{name}.weight", f"{name}/scale", transpose=False)


def _from_hf(hf: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  config.num_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
  config.head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _to_hf(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {"num_key_value_heads": config.num_kv_heads, "head_dim": head_dim_of(config)}


GQA = AttentionKind(
  name="gqa",
  keys=("num_kv_heads", "head_dim", "qk_norm", "qkv_bias", "attention_logit_cap"),
  validate=_validate,
  build=_build,
  params=_params,
  score_widths=_score_widths,
  shrink=_shrink,
  hf_tensors=_hf_tensors,
  from_hf=_from_hf,
  to_hf=_to_hf,
)
