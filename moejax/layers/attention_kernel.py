"""Which kernel computes a forward pass's causal self-attention (`model.attention_kernel`).

Every kernel computes the same thing: `softmax(cap(scale · q·kᵀ) + mask) · v` for each query
head, where query slot i sees key slots j <= i of its own document (document masking, Zhao
et al. 2024, arXiv:2402.13991; `moejax.layers.document_mask.self_attention_mask`), and
`cap` is the optional soft cap `c · tanh(s / c)` (Grok-1). Decoding with a KV cache always
uses the einsum: it attends one step's queries to the cache.

Kernels:
- `xla`: `grouped_query_attention`, an einsum that materialises the float32 scores
  `[batch, heads, q, kv]`. Any platform; the only one on CPU by default.
- `splash`: the TPU Pallas splash-attention kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`): flash attention that skips the
  blocks above the causal diagonal, with the documents as its `SegmentIds` and the soft cap
  as its `attn_logits_soft_cap`. Needs sequences of a multiple of 128. Off TPU it runs in
  the Pallas interpreter (slow: for tests).
- `cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention(implementation=
  'cudnn')`, causal, the documents as a boolean mask `[batch, 1, q, kv]`. float16/bfloat16,
  head dims up to 128 (a narrower value head is zero-padded), no soft cap.
- `auto` (default): `splash` on TPU and `cudnn` on GPU where the layer's shapes suit them
  (`kernel_for`), `xla` otherwise.

On a mesh the fused kernels run per device inside `jax.shard_map` over the batch axes: the
heads and sequence are not sharded, so each device attends its own rows.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers.document_mask import self_attention_mask
from moejax.parallel.sharding import batch_axes, mesh_platform, num_batch_shards

KERNELS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCK = 128  # splash attention's smallest block: sequences must be a multiple of it
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def check_kernel(name, logit_cap) -> None:
  """One-line ValueErrors for `model.attention_kernel` (a kernel cuDNN cannot soft-cap)."""
  if name not in KERNELS:
    raise ValueError(f"attention_kernel must be one of {KERNELS}, got {name!r}")
  if name == "cudnn" and logit_cap:
    raise ValueError(
      f"attention_kernel='cudnn' cannot soft-cap logits (attention_logit_cap={logit_cap}); "
      "use 'splash' or 'xla'"
    )


def grouped_query_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array,
  logit_cap: float | None = None,
  scale: float | None = None,
) -> jax.Array:
  """Softmax attention where each group of `heads / kv_heads` query heads shares one KV head.

  Query head `h` reads KV head `h // (heads / kv_heads)` (GQA, Ainslie et al. 2023;
  kv_heads = heads is multi-head attention, kv_heads = 1 multi-query attention).
  Scores and softmax run in float32. With `logit_cap` the scaled scores s become
  `cap · tanh(s / cap)` before masking, as xai-org/grok-1's model.py does
  (`MultiHeadAttention`: `max_attn_val` 30, after `attn_output_multiplier`, which is
  128^-0.5 = 1/sqrt(head_dim) there, this function's default scale).

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, kv_heads, head_dim]`.
    v: `[batch, kv_len, kv_heads, v_head_dim]`.
    mask: `[q_len, kv_len]` (all rows) or `[batch, q_len, kv_len]` (per row) bool, True
      where the query may attend to the key. Every query must see at least one key.
    logit_cap: None (no cap) or the soft cap, > 0.
    scale: the scores' scale; None: 1 / sqrt(head_dim).

  Returns:
    `[batch, q_len, heads, v_head_dim]` in q's dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(1 / math.sqrt(head_dim) if scale is None else scale)
  if logit_cap:
    scores = logit_cap * jnp.tanh(scores / logit_cap)
  if mask.ndim == 3:  # [batch, q, kv] -> over the heads [batch, 1, 1, q, kv]
    mask = mask[:, None, None]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqt,btkd->bqkgd", probs, v)
  return out.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)


def kernel_for(requested: str, platform: str, *, seq: int, head_dims, dtype, logit_cap) -> str:
  """The kernel a layer uses: `requested`, or for 'auto' the platform's fused kernel where
  the shapes suit it (splash: TPU, seq a multiple of 128; cudnn: GPU, 16-bit, q/k/v head
  dims <= 128 and multiples of 8, no soft cap), else 'xla'."""
  if requested != "auto":
    return requested
  if platform == "tpu" and seq % SPLASH_BLOCK == 0:
    return "splash"
  if (
    platform == "gpu"
    and jnp.dtype(dtype) in CUDNN_DTYPES
    and all(d <= CUDNN_MAX_HEAD_DIM and d % 8 == 0 for d in head_dims)
    and not logit_cap
  ):
    return "cudnn"
  return "xla"


def causal_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  positions: jax.Array,
  segment_ids: jax.Array | None,
  kernel: str,
  mesh=None,
  scale: float | None = None,
  logit_cap: float | None = None,
) -> jax.Array:
  """Causal self-attention of one forward pass (no cache), by `kernel`.

  Args:
    q: `[batch, seq, heads, head_dim]`.
    k: `[batch, seq, kv_heads, head_dim]`, kv_heads dividing heads.
    v: `[batch, seq, kv_heads, v_head_dim]`.
    positions: `[seq]` (consecutive) or `[batch, seq]` (restarting at each document); the
      'xla' kernel's causal mask reads them, the fused kernels use the slot order, the same
      for every forward pass.
    segment_ids: None, or `[batch, seq]` int: the document of each token (0 = padding).
    kernel: one of `KERNELS` other than 'auto' (`kernel_for`).
    mesh: None, or the model's mesh: the fused kernels run per batch shard.
    scale: the scores' scale; None: 1 / sqrt(head_dim).
    logit_cap: None/0 (off) or the soft cap.

  Returns:
    `[batch, seq, heads, v_head_dim]` in q's dtype.
  """
  if kernel == "xla":
    mask = self_attention_mask(positions, segment_ids)  # [(batch,) seq, seq]
    return grouped_query_attention(q, k, v, mask, logit_cap, scale)
  scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
  if kernel == "splash":
    seq = q.shape[1]
    if seq % SPLASH_BLOCK:
      raise ValueError(f"attention_kernel='splash' needs seq_len a multiple of 128, got {seq}.")
    local = functools.partial(
      _splash, scale=scale, logit_cap=logit_cap or None, interpret=mesh_platform(mesh) != "tpu"
    )
  elif kernel == "cudnn":
    local = functools.partial(_cudnn, scale=scale, implementation="cudnn")
  else:
    raise ValueError(f"attention_kernel must be one of {KERNELS[1:]}, got {kernel!r}.")
  if mesh is None or num_batch_shards(mesh) == 1:
    return local(q, k, v, segment_ids)
  spec = P(batch_axes(mesh))
  segments_spec = None if segment_ids is None else spec
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(spec, spec, spec, segments_spec),
    out_specs=spec,
    check_vma=False,  # pallas_call's outputs carry no varying-axes annotation
  )(q, k, v, segment_ids)


def _splash(q, k, v, segment_ids, *, scale: float, logit_cap, interpret: bool) -> jax.Array:
  """Splash attention over each row: `[batch, seq, heads, d]` in and out."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

  batch, seq, heads, _ = q.shape
  attend = _splash_kernel(seq, heads, logit_cap, interpret)
  q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [batch, heads, seq, d]
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [batch, kv_heads, seq, d]
  if segment_ids is None:
    out = jax.vmap(attend)(q, k, v)
  else:
    row = lambda q, k, v, s: attend(q, k, v, segment_ids=splash.SegmentIds(s, s))
    out = jax.vmap(row)(q, k, v, segment_ids.astype(jnp.int32))
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _splash_kernel(seq: int, heads: int, logit_cap, interpret: bool):
  """The splash kernel of a causal `[seq, seq]` mask for `heads` query heads, with blocks
  of up to 512 tokens. Made where it is traced: its block tables become the program's
  constants."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  block = next(b for b in (512, 256, SPLASH_BLOCK) if seq % b == 0)
  sizes = splash.BlockSizes(
    block_q=block, block_kv=block, block_kv_compute=block,
    block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
    block_q_dq=block, block_kv_dq=block,
  )  # fmt: skip
  causal = masks.MultiHeadMask([masks.CausalMask((seq, seq))] * heads)
  return splash.make_splash_mha(
    causal,
    head_shards=1,
    q_seq_shards=1,
    block_sizes=sizes,
    attn_logits_soft_cap=logit_cap,
    interpret=interpret,
  )


def _cudnn(
  q, k, v, segment_ids, *, scale: float, implementation: Literal["xla", "cudnn"]
) -> jax.Array:
  """`jax.nn.dot_product_attention`, causal, with the document mask `[batch, 1, q, kv]`; a
  value head narrower than the key's is zero-padded and the output cut back. The tests
  call it with implementation='xla' (the same call off GPU)."""
  v_dim = v.shape[-1]
  if v_dim < k.shape[-1]:
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, k.shape[-1] - v_dim)))
  same = None
  if segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  out = jax.nn.dot_product_attention(
    q, k, v, mask=same, scale=float(scale), is_causal=True, implementation=implementation
  )
  return out[..., :v_dim]
