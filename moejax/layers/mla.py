"""Multi-head latent attention, MLA (DeepSeek-V2, arXiv:2405.04434, §2.1; DeepSeek-V3).

MLA compresses the keys and values of every token into one latent vector c_KV of
`kv_lora_rank` channels, and keeps position information in a separate, decoupled RoPE key
of `qk_rope_head_dim` channels shared by all heads. The KV cache then holds
kv_lora_rank + qk_rope_head_dim numbers per token and layer (512 + 64 in DeepSeek-V2/V3)
instead of 2 · heads · head_dim (2 · 128 · 128 for 128 heads of 128).

For a token x `[d_model]` (the paper's equation numbers):

    c_Q  = RMSNorm(x W^DQ)                   q_down `[d_model, q_lora]`, q_norm   (eq. 12)
    q    = c_Q W^UQ                          q_up `[q_lora, heads·(nope + rope)]` (eqs. 13-14)
           (or q = x W^Q, q_proj, when q_lora_rank is None or 0: DeepSeek-V2-Lite)
    q_h  = [q^C_h ; RoPE(q^R_h)]             per head: nope channels, then rope channels
    c_KV = RMSNorm(x W^DKV)                  kv_down `[d_model, kv_lora]`, kv_norm (eq. 9)
    [k^C_h ; v_h] = c_KV W^UKV               kv_up `[kv_lora, heads·(nope + v)]` (eqs. 10-11)
    k^R  = RoPE(x W^KR)                      k_rope `[d_model, rope]`, one for all heads (eq. 15)
    k_h  = [k^C_h ; k^R]                                                           (eq. 17)
    o_h  = softmax(q_h · k_h / sqrt(nope + rope)) v_h  (causal)                     (eq. 18)
    y    = [o_1 ; ... ; o_H] W^O              o_proj `[heads·v, d_model]`           (eq. 19)

The RMSNorms on c_Q and c_KV are in DeepSeek's released code (`q_a_layernorm`,
`kv_a_layernorm`), not in the paper's equations. DeepSeek's code fuses W^DKV and W^KR
into one `kv_a_proj_with_mqa` `[d_model, kv_lora + rope]`; here they are two kernels
(`kv_down`, `k_rope`) so that each carries its own logical axis names: concatenate their
columns to load a DeepSeek checkpoint.

RoPE layout. moejax's `apply_rope` is rotate-half: channel pairs (j, j + D/2). DeepSeek's
released inference code rotates interleaved pairs (2j, 2j + 1) (it views them as complex
numbers), and HF transformers' DeepSeek-V3 (`rope_interleave=True`,
`apply_rotary_pos_emb_interleave`) reorders each rope head's channels to evens-then-odds
before a rotate-half RoPE. Both are the same attention up to a fixed permutation of the
rope output columns of W^QR (in q_up / q_proj) and W^KR: trained here from scratch, the
layout is immaterial; to load DeepSeek weights, permute those columns by
`[0, 2, 4, ..., 1, 3, 5, ...]` within each head's rope part.

The KV cache (`init_cache`) holds, per layer:

    {'latent': [batch, max_len, kv_lora_rank]      c_KV after its RMSNorm,
     'k_rope': [batch, max_len, qk_rope_head_dim]  k^R after RoPE}

Without a cache the layer expands every key and value (k^C, v from c_KV: the cheap order
for training, where queries and keys are equally many). With a cache it attends in the
latent space, DeepSeek-V2's "absorbed" form (§2.1.2: W^UK is absorbed into W^UQ and W^UV
into W^O): the nope part of each query is mapped into the latent space once,
q̃_h = q^C_h W^UK_h^T `[kv_lora]`, scores are q̃_h · c_KV_j + q^R_h · k^R_j, and the
output o_h = (Σ_j p_j c_KV_j) W^UV_h, so a decode step reads the compressed cache and
never expands it. The two orders are the same function (tested).

`MLA` is this module's attention kind (`model.attention='mla'`, `moejax.layers.attention_kind`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.layers.attention import qk_norm_mode
from moejax.layers.attention_kernel import causal_attention, check_kernel, kernel_for
from moejax.layers.attention_kind import AttentionKind, HfTensor, Require
from moejax.layers.document_mask import check_segments, self_attention_mask
from moejax.layers.ffn import on_rows
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import Rope, apply_rope
from moejax.layers.saved_names import ATTENTION_CONTEXT, ATTENTION_OUT, ATTENTION_QKV
from moejax.parallel.sharding import logical, mesh_platform

# One MLA layer's cache: {'latent': [batch, max_len, kv_lora_rank],
#                         'k_rope': [batch, max_len, qk_rope_head_dim]}.
MlaCache = dict[str, jax.Array]


def _positive(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int.")


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis of float32 `scores` `[batch, heads, q_len, kv_len]` where
  `mask` `[q_len, kv_len]` (all rows) or `[batch, q_len, kv_len]` (per row) is True; masked
  scores get the float32 minimum (as `moejax.layers.attention.grouped_query_attention` does)."""
  if mask.ndim == 3:  # [batch, q, kv] -> over the heads [batch, 1, q, kv]
    mask = mask[:, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


class MultiHeadLatentAttention(nnx.Module):
  """Causal multi-head latent attention (DeepSeek-V2 §2.1); no biases.

  Called as `moejax.layers.attention.CausalSelfAttention`: `(x [batch, seq, d_model], positions
  [seq] or [batch, seq], cache or None, segment_ids [batch, seq] or None) -> ([batch, seq,
  d_model], cache or None)`. See the module docstring for
  the formulas, the RoPE layout and the cache.

  Args:
    d_model: model width.
    num_heads: H (`model.num_heads`).
    q_lora_rank: d_c' (`model.q_lora_rank`), the query latent; None or 0 projects the
      queries straight from x (DeepSeek-V2-Lite).
    kv_lora_rank: d_c (`model.kv_lora_rank`), the key-value latent the cache holds.
    qk_nope_head_dim: d_h, the per-head query/key channels without RoPE
      (`model.qk_nope_head_dim`).
    qk_rope_head_dim: d_h^R, the decoupled RoPE channels, even (`model.qk_rope_head_dim`).
    v_head_dim: per-head value channels (`model.v_head_dim`).
    rope_base: the RoPE base, or a `moejax.layers.rope.Rope` (YaRN scaling).
    norm_eps: epsilon of the latents' RMSNorms (`model.norm_eps`; 1e-6 in DeepSeek-V2/V3).
    dtype: compute dtype; parameters stay float32, scores and softmax run in float32.
    rngs: `nnx.Rngs` with a `params` stream.

  Parameters (kernels `[in, out]`, fan-in scaled as `nnx.Linear`'s default) and their
  logical axes: q_down ('embed', 'q_lora'), q_norm ('q_lora',), q_up ('q_lora', 'heads') or
  q_proj ('embed', 'heads'); kv_down ('embed', 'kv_lora'), kv_norm ('kv_lora',), kv_up
  ('kv_lora', 'heads'); k_rope ('embed', 'head_dim'); o_proj ('heads', 'embed').
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    *,
    q_lora_rank: int | None,
    kv_lora_rank: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    rope_base: float | Rope,
    norm_eps: float = 1e-6,
    kernel: str = "auto",
    mesh=None,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_kernel(kernel, None)
    self.kernel, self.mesh, self.platform = kernel, mesh, mesh_platform(mesh)
    for name, value in (
      ("d_model", d_model),
      ("num_heads", num_heads),
      ("kv_lora_rank", kv_lora_rank),
      ("qk_nope_head_dim", qk_nope_head_dim),
      ("qk_rope_head_dim", qk_rope_head_dim),
      ("v_head_dim", v_head_dim),
    ):
      _positive(name, value)
    if q_lora_rank is not None and q_lora_rank != 0:
      _positive("q_lora_rank", q_lora_rank)
    if qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim={qk_rope_head_dim} must be even for RoPE.")
    rope = rope_base if isinstance(rope_base, Rope) else Rope(float(rope_base))
    if not rope.base > 0:
      raise ValueError(f"rope_base={rope.base!r} must be > 0.")
    if not norm_eps > 0:
      raise ValueError(f"norm_eps={norm_eps!r} must be > 0.")
    self.num_heads = num_heads
    self.q_lora_rank = q_lora_rank or None
    self.kv_lora_rank = kv_lora_rank
    self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
    self.v_head_dim = v_head_dim
    self.rope = rope
    self.dtype = dtype
    qk_dim = qk_nope_head_dim + qk_rope_head_dim
    linear = lambda fan_in, fan_out, names: nnx.Linear(
      fan_in, fan_out, use_bias=False, dtype=dtype, kernel_metadata=logical(*names), rngs=rngs
    )
    if self.q_lora_rank is None:
      self.q_down: nnx.Linear | None = None
      self.q_norm: RMSNorm | None = None
      self.q_up: nnx.Linear | None = None
      self.q_proj: nnx.Linear | None = linear(d_model, num_heads * qk_dim, ("embed", "heads"))
    else:
      self.q_down = linear(d_model, self.q_lora_rank, ("embed", "q_lora"))
      self.q_norm = RMSNorm(self.q_lora_rank, eps=norm_eps, axis_name="q_lora")
      self.q_up = linear(self.q_lora_rank, num_heads * qk_dim, ("q_lora", "heads"))
      self.q_proj = None
    self.kv_down = linear(d_model, kv_lora_rank, ("embed", "kv_lora"))
    self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps, axis_name="kv_lora")
    self.kv_up = linear(
      kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), ("kv_lora", "heads")
    )
    self.k_rope = linear(d_model, qk_rope_head_dim, ("embed", "head_dim"))
    self.o_proj = linear(num_heads * v_head_dim, d_model, ("heads", "embed"))

  @property
  def softmax_scale(self) -> float:
    """1 / sqrt(qk_nope_head_dim + qk_rope_head_dim) (DeepSeek-V2 §2.1.3), times YaRN's
    `m(factor, mscale_all_dim)²` when the RoPE is scaled (`Rope.softmax_factor`)."""
    return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5 * self.rope.softmax_factor

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> MlaCache:
    """An empty cache: `{'latent': [batch, max_len, kv_lora_rank], 'k_rope': [batch,
    max_len, qk_rope_head_dim]}` zeros in `dtype` (default the compute dtype)."""
    dtype = self.dtype if dtype is None else dtype
    return {
      "latent": jnp.zeros((batch, max_len, self.kv_lora_rank), dtype),
      "k_rope": jnp.zeros((batch, max_len, self.qk_rope_head_dim), dtype),
    }

  def __call__(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache: MlaCache | None = None,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, MlaCache | None]:
    """Attends every position to itself and to every earlier position (of its document).

    Args:
      x: `[batch, seq, d_model]`.
      positions: int32 RoPE positions: `[seq]`, consecutive absolute positions
        `start + arange(seq)` shared by the rows, or `[batch, seq]` per row (packed
        documents: each restarts at 0). Only `[seq]` with a cache.
      cache: None, or this layer's cache (`init_cache`); the new latents and rope keys are
        written at `positions`, and the queries attend to every cached slot at a position
        <= their own.
      segment_ids: None (one document per row), or `[batch, seq]` int32, the document of
        each token (0 = padding): the mask is `moejax.layers.document_mask.self_attention_mask`
        (causal & same segment; Zhao et al. 2024, arXiv:2402.13991). Not with a cache.

    Returns:
      `([batch, seq, d_model], updated cache or None)`.
    """
    check_segments(x, positions, segment_ids, cache)
    batch, seq, _ = x.shape
    heads, nope, rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
    x = x.astype(self.dtype)
    if self.q_norm is None:  # no query latent
      q = on_rows(self.q_proj, x)
    else:
      q_latent = checkpoint_name(on_rows(self.q_down, x), ATTENTION_QKV)
      q = on_rows(self.q_up, self.q_norm(q_latent))
    q = checkpoint_name(q, ATTENTION_QKV).reshape(batch, seq, heads, nope + rope)
    q_nope = q[..., :nope]
    q_rope = apply_rope(q[..., nope:], positions, self.rope)  # [b, s, H, rope]
    latent = self.kv_norm(checkpoint_name(on_rows(self.kv_down, x), ATTENTION_QKV))
    k_rope = checkpoint_name(on_rows(self.k_rope, x), ATTENTION_QKV)  # [b, s, rope]
    k_rope = apply_rope(k_rope[:, :, None, :], positions, self.rope)
    k_rope = k_rope[:, :, 0, :]  # [b, s, rope]

    if cache is None:
      out = self._expanded(q_nope, q_rope, latent, k_rope, positions, segment_ids)
    else:
      slot = (0, positions[0], 0)
      latent = jax.lax.dynamic_update_slice(
        cache["latent"], latent.astype(cache["latent"].dtype), slot
      )
      k_rope = jax.lax.dynamic_update_slice(
        cache["k_rope"], k_rope.astype(cache["k_rope"].dtype), slot
      )
      cache = {"latent": latent, "k_rope": k_rope}
      key_positions = jnp.arange(latent.shape[1], dtype=jnp.int32)
      mask = key_positions[None, :] <= positions[:, None]  # [seq, max_len]
      out = self._absorbed(
        q_nope, q_rope, latent.astype(self.dtype), k_rope.astype(self.dtype), mask
      )
    out = out.reshape(batch, seq, heads * self.v_head_dim).astype(self.dtype)
    out = checkpoint_name(out, ATTENTION_CONTEXT)
    return checkpoint_name(on_rows(self.o_proj, out), ATTENTION_OUT), cache

  def _kv_up_kernel(self) -> tuple[jax.Array, jax.Array]:
    """W^UK `[kv_lora, H, nope]` and W^UV `[kv_lora, H, v]` from kv_up's kernel."""
    kernel = self.kv_up.kernel[...].astype(self.dtype)
    kernel = kernel.reshape(
      self.kv_lora_rank, self.num_heads, self.qk_nope_head_dim + self.v_head_dim
    )
    return kernel[..., : self.qk_nope_head_dim], kernel[..., self.qk_nope_head_dim :]

  def _expanded(self, q_nope, q_rope, latent, k_rope, positions, segment_ids) -> jax.Array:
    """Attention with every key and value expanded from its latent: `[b, s, H, v]`. The
    fused kernels (`model.attention_kernel`) take each head's key whole: its nope part,
    then the shared RoPE key."""
    batch, kv_len, _ = latent.shape
    kv = on_rows(self.kv_up, latent).reshape(
      batch, kv_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim
    )
    kv = checkpoint_name(kv, ATTENTION_QKV)
    k_nope, v = kv[..., : self.qk_nope_head_dim], kv[..., self.qk_nope_head_dim :]
    qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
    kernel = kernel_for(
      self.kernel, self.platform, seq=kv_len, head_dims=(qk_dim, self.v_head_dim),
      dtype=q_nope.dtype, logit_cap=None,
    )  # fmt: skip
    if kernel != "xla":
      q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
      k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))
      k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)
      return causal_attention(
        q, k, v, positions=positions, segment_ids=segment_ids, kernel=kernel, mesh=self.mesh,
        scale=self.softmax_scale,
      )  # fmt: skip
    mask = self_attention_mask(positions, segment_ids)  # [(batch,) seq, seq]
    scores = jnp.einsum("bqhd,bthd->bhqt", q_nope, k_nope, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bqhr,btr->bhqt", q_rope, k_rope, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores * self.softmax_scale, mask).astype(v.dtype)
    return jnp.einsum("bhqt,bthd->bqhd", probs, v)

  def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> jax.Array:
    """Attention in the latent space (W^UK into the query, W^UV after): `[b, s, H, v]`."""
    w_uk, w_uv = self._kv_up_kernel()
    q_latent = jnp.einsum("bqhd,chd->bqhc", q_nope, w_uk)  # [b, s, H, kv_lora]
    scores = jnp.einsum("bqhc,btc->bhqt", q_latent, latent, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bqhr,btr->bhqt", q_rope, k_rope, preferred_element_type=jnp.float32)
    probs = _masked_softmax(scores * self.softmax_scale, mask).astype(latent.dtype)
    out_latent = jnp.einsum("bhqt,btc->bqhc", probs, latent)  # [b, s, H, kv_lora]
    return jnp.einsum("bqhc,chd->bqhd", out_latent, w_uv)


# ----------------------------------------------------------------------------- the 'mla' kind


def interleaved_to_half(dim: int) -> np.ndarray:
  """Rows of interleaved RoPE pairs (2j, 2j + 1) in rotate-half order: evens, then odds."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _validate(config: ml_collections.ConfigDict, require: Require) -> None:
  for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    require(
      isinstance(config[key], int) and config[key] >= 1,
      f"{key} must be a positive int for attention='mla', got {config[key]!r}",
    )
  require(
    config.q_lora_rank is None or config.q_lora_rank >= 1,
    f"q_lora_rank must be None or a positive int, got {config.q_lora_rank!r}",
  )
  require(
    config.qk_rope_head_dim % 2 == 0,
    f"qk_rope_head_dim must be even for RoPE, got {config.qk_rope_head_dim}",
  )
  require(
    qk_norm_mode(config.qk_norm) == "none" and not config.qkv_bias,
    "qk_norm and qkv_bias are options of attention='gqa'; MLA normalises its latents",
  )
  require(
    not config.attention_logit_cap,
    f"attention_logit_cap={config.attention_logit_cap} is an option of attention='gqa' only",
  )


def _build(
  config: ml_collections.ConfigDict, *, dtype, mesh, rngs: nnx.Rngs
) -> MultiHeadLatentAttention:
  return MultiHeadLatentAttention(
    config.d_model, config.num_heads, q_lora_rank=config.q_lora_rank,
    kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
    qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
    rope_base=Rope.from_config(config), norm_eps=config.norm_eps, kernel=config.attention_kernel,
    mesh=mesh, dtype=dtype, rngs=rngs,
  )  # fmt: skip


def _params(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The query (latent or direct), key-value latent, RoPE key and output projections; the
  two latent norms."""
  d, heads, lora = config.d_model, config.num_heads, config.kv_lora_rank
  qk = config.qk_nope_head_dim + config.qk_rope_head_dim
  q_lora = config.q_lora_rank or 0
  q = d * q_lora + q_lora * heads * qk if q_lora else d * heads * qk
  kv = d * lora + lora * heads * (config.qk_nope_head_dim + config.v_head_dim)
  matmul = q + kv + d * config.qk_rope_head_dim + heads * config.v_head_dim * d
  return matmul, q_lora + lora


def _score_widths(config: ml_collections.ConfigDict) -> tuple[int, int]:
  qk = config.num_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
  return qk, config.num_heads * config.v_head_dim


def _shrink(before: ml_collections.ConfigDict, after: ml_collections.ConfigDict, small: bool):
  """Latents and head parts at the small model's scale; every head its own key and value."""
  after.q_lora_rank = None if before.q_lora_rank is None else (16 if small else 48)
  after.kv_lora_rank = 16 if small else 32
  after.qk_nope_head_dim = after.qk_rope_head_dim = 8 if small else 16
  after.v_head_dim = 16 if small else 32
  after.num_kv_heads, after.head_dim = after.num_heads, None


def _hf_tensors(config: ml_collections.ConfigDict) -> Iterator[HfTensor]:
  """DeepSeek-V3's layout: its RoPE columns interleaved (module docstring), and the key-value
  latent and RoPE key fused in `kv_a_proj_with_mqa`."""
  heads, nope, rope = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
  in_head = np.concatenate([np.arange(nope), nope + interleaved_to_half(rope)])
  q_perm = tuple(int(i) for h in range(heads) for i in h * (nope + rope) + in_head)
  if config.q_lora_rank:
    yield HfTensor("q_a_proj.weight", "q_down/kernel")
    yield HfTensor("q_a_layernorm.weight", "q_norm/scale", transpose=False)
    yield HfTensor("q_b_proj.weight", "q_up/kernel", perm=q_perm)
  else:
    yield HfTensor("q_proj.weight", "q_proj/kernel", perm=q_perm)
  lora = config.kv_lora_rank
  yield HfTensor("kv_a_proj_with_mqa.weight", "kv_down/kernel", rows=(0, lora))
  k_perm = tuple(int(i) for i in interleaved_to_half(rope))
  yield HfTensor(
    "kv_a_proj_with_mqa.weight", "k_rope/kernel", rows=(lora, lora + rope), perm=k_perm
  )
  yield HfTensor("kv_a_layernorm.weight", "kv_norm/scale", transpose=False)
  yield HfTensor("kv_b_proj.weight", "kv_up/kernel")
  yield HfTensor("o_proj.weight", "o_proj/kernel")


_HF_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _from_hf(hf: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  config.num_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
  for key in _HF_KEYS:
    config[key] = hf.get(key) if key == "q_lora_rank" else hf[key]
  config.head_dim = None


def _to_hf(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {
    "num_key_value_heads": config.num_kv_heads,
    **{key: config[key] for key in _HF_KEYS},
    "rope_interleave": True,
  }


MLA = AttentionKind(
  name="mla",
  keys=_HF_KEYS,
  validate=_validate,
  build=_build,
  params=_params,
  score_widths=_score_widths,
  shrink=_shrink,
  hf_tensors=_hf_tensors,
  from_hf=_from_hf,
  to_hf=_to_hf,
)
