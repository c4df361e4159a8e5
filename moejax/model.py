"""Decoder-only Transformer language model whose FFNs may be Mixture-of-Experts layers.

The block is the modern pre-norm LLaMA/Mixtral/OLMoE recipe:

* RMSNorm (Zhang & Sennrich 2019) before attention and before the FFN, and at the end;
* rotary position embeddings, RoPE (Su et al. 2021), with a configurable base;
* causal self-attention with grouped key/value heads, GQA (Ainslie et al. 2023), and an
  optional QK-norm: RMSNorm on the queries and keys before RoPE (OLMoE, Muennighoff et
  al. 2024; Dehghani et al. 2023), here per head with one `[head_dim]` scale each for q
  and k, as Dehghani et al. and Qwen3 do (OLMoE normalises the whole projection);
* an FFN that is a dense `FeedForward`, a `moejax.moe.MoeLayer`, or both side by side with
  their outputs summed (the dense-MoE hybrid, "residual MoE", of Snowflake Arctic);
* no biases anywhere.

Which layers are MoE: with `moe_layer_interval = n`, layer `i` (0-based) is MoE iff
`(i + 1) % n == 0`, so the *last* layer of every group of `n` is MoE: n=1 makes every
layer MoE (Mixtral, OLMoE), n=2 every other layer starting from the second (GShard and
Switch Transformer), n=4 one layer in four. The first layer is always dense when n > 1.

Decoding uses an explicit KV cache pytree (see `TransformerLM.init_cache`):

    cache = model.init_cache(batch, max_len)
    logits, aux, cache = model(prompt, cache=cache, start=0)          # prefill
    logits, aux, cache = model(next_tok[:, None], cache=cache, start=P)  # one step

Parameters are float32; `config.dtype` is the compute dtype. Logits are always float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax.activations import ACTIVATIONS
from moejax.ffn import FeedForward, on_rows
from moejax.moe import MoeConfig, MoeLayer
from moejax.sharding import logical

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EMBEDDING_STDDEV = 0.02

# One layer's KV cache: {'k': [batch, max_len, num_kv_heads, head_dim], 'v': same}.
LayerCache = dict[str, jax.Array]


# ----------------------------------------------------------------------------- config


def moe_layer_indices(
  num_layers: int, num_experts: int, moe_layer_interval: int
) -> tuple[int, ...]:
  """The 0-based indices of the MoE layers: `i` with `(i + 1) % moe_layer_interval == 0`.

  Empty when `num_experts == 0` (the dense baseline).
  """
  if num_experts == 0:
    return ()
  return tuple(i for i in range(num_layers) if (i + 1) % moe_layer_interval == 0)


def head_dim_of(config: ml_collections.ConfigDict) -> int:
  """`config.head_dim`, or `d_model // num_heads` when it is None."""
  return config.head_dim if config.head_dim is not None else config.d_model // config.num_heads


def expert_d_ff_of(config: ml_collections.ConfigDict) -> int:
  """`config.expert_d_ff`, or `config.d_ff` when it is None."""
  return config.expert_d_ff if config.expert_d_ff is not None else config.d_ff


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the first bad key of a model config.

  Checks what the model itself relies on; the MoE options are checked once, by
  `MoeConfig` (`moe_config`).
  """

  def require(ok: bool, message: str) -> None:
    if not ok:
      raise ValueError(f"config.model.{message}")

  for key in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "d_ff"):
    require(
      isinstance(config[key], int) and config[key] >= 1,
      f"{key} must be a positive int, got {config[key]!r}",
    )
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
  require(config.rope_base > 0, f"rope_base must be > 0, got {config.rope_base}")
  require(
    config.activation in ACTIVATIONS,
    f"activation must be one of {ACTIVATIONS}, got {config.activation!r}",
  )
  require(config.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
  require(
    isinstance(config.num_experts, int) and config.num_experts >= 0,
    f"num_experts must be an int >= 0 (0 = dense), got {config.num_experts!r}",
  )
  require(
    isinstance(config.moe_layer_interval, int) and config.moe_layer_interval >= 1,
    f"moe_layer_interval must be an int >= 1, got {config.moe_layer_interval!r}",
  )
  require(
    not config.dense_moe_hybrid or config.num_experts > 0,
    "dense_moe_hybrid=True needs num_experts > 0",
  )
  if config.num_experts > 0:
    require(
      config.num_layers >= config.moe_layer_interval,
      f"num_layers={config.num_layers} must be >= moe_layer_interval="
      f"{config.moe_layer_interval} so that some layer is MoE",
    )
    moe_config(config)


def moe_config(config: ml_collections.ConfigDict) -> MoeConfig:
  """The `MoeConfig` of a model config with experts; its one-line errors name the key."""
  try:
    return MoeConfig.from_model_config(config)
  except (ValueError, TypeError) as error:
    raise ValueError(f"config.model.{error}") from None


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm (Zhang & Sennrich 2019): x / rms(x) · scale.

  Normalises the last axis in float32 and returns the input's dtype. `scale` `[dim]`
  starts at ones.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed"):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), **logical(axis_name))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., dim]` -> `[..., dim]`."""
    x32 = x.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 / rms * self.scale[...]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), "rotate-half" layout (GPT-NeoX, LLaMA).

  Channel pairs (j, j + D/2) are rotated by the angle `position · base^(-2j/D)`, so the
  dot product of a rotated query and key depends on their positions only through the
  difference. Computed in float32.

  Args:
    x: `[batch, seq, heads, head_dim]`, head_dim even.
    positions: `[seq]` int, the absolute position of every sequence slot.
    base: the RoPE base (10_000 in the paper; 500_000 in LLaMA 3).

  Returns:
    `[batch, seq, heads, head_dim]` in x's dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [seq, D/2]
  cos = jnp.cos(angles)[None, :, None, :]  # [1, seq, 1, D/2]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention where each group of `heads / kv_heads` query heads shares one KV head.

  Query head `h` reads KV head `h // (heads / kv_heads)` (GQA, Ainslie et al. 2023;
  kv_heads = heads is multi-head attention, kv_heads = 1 multi-query attention).
  Scores and softmax run in float32.

  Args:
    q: `[batch, q_len, heads, head_dim]`.
    k: `[batch, kv_len, kv_heads, head_dim]`.
    v: `[batch, kv_len, kv_heads, head_dim]`.
    mask: `[q_len, kv_len]` bool, True where the query may attend to the key. Every query
      must see at least one key.

  Returns:
    `[batch, q_len, heads, head_dim]` in q's dtype.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqt,btkd->bqkgd", probs, v)
  return out.reshape(batch, q_len, heads, head_dim)


class CausalSelfAttention(nnx.Module):
  """Causal self-attention with RoPE, grouped KV heads and optional QK-norm; no biases.

  Projections: q `[d_model, heads·head_dim]`, k and v `[d_model, kv_heads·head_dim]`,
  o `[heads·head_dim, d_model]`, fan-in scaled (LeCun normal). QK-norm adds two RMSNorm
  scales `[head_dim]` applied to every query head and every key head before RoPE.
  """

  def __init__(
    self,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    rope_base: float,
    qk_norm: bool,
    dtype: Any,
    rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_base = rope_base
    linear = lambda fan_in, fan_out, names: nnx.Linear(
      fan_in, fan_out, use_bias=False, dtype=dtype, kernel_metadata=logical(*names), rngs=rngs
    )
    self.q_proj = linear(d_model, num_heads * head_dim, ("embed", "heads"))
    self.k_proj = linear(d_model, num_kv_heads * head_dim, ("embed", "kv_heads"))
    self.v_proj = linear(d_model, num_kv_heads * head_dim, ("embed", "kv_heads"))
    self.o_proj = linear(num_heads * head_dim, d_model, ("heads", "embed"))
    self.q_norm = RMSNorm(head_dim, axis_name="head_dim") if qk_norm else None
    self.k_norm = RMSNorm(head_dim, axis_name="head_dim") if qk_norm else None

  def __call__(
    self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None
  ) -> tuple[jax.Array, LayerCache | None]:
    """Attends every position to itself and to every earlier position.

    Args:
      x: `[batch, seq, d_model]`.
      positions: `[seq]` int32, consecutive absolute positions `start + arange(seq)`.
      cache: None, or this layer's `{'k', 'v'}` each `[batch, max_len, kv_heads,
        head_dim]`; the new keys and values are written at `positions`, and the queries
        attend to every cached slot at a position <= their own.

    Returns:
      `([batch, seq, d_model], updated cache or None)`.
    """
    batch, seq, _ = x.shape
    q = on_rows(self.q_proj, x).reshape(batch, seq, self.num_heads, self.head_dim)
    k = on_rows(self.k_proj, x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = on_rows(self.v_proj, x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_base)
    k = apply_rope(k, positions, self.rope_base)
    if cache is None:
      key_positions = positions
    else:
      slot = (0, positions[0], 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), slot)
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), slot)
      cache = {"k": k, "v": v}
      key_positions = jnp.arange(k.shape[1], dtype=jnp.int32)
    mask = key_positions[None, :] <= positions[:, None]  # [seq, kv_len]
    out = grouped_query_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    return on_rows(self.o_proj, out.reshape(batch, seq, self.num_heads * self.head_dim)), cache


class DecoderBlock(nnx.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.

  The FFN is `dense_ffn`, `moe`, or both on the same normalised input with outputs summed
  (Snowflake Arctic's dense-MoE hybrid); at least one must be given.
  """

  def __init__(
    self,
    d_model: int,
    attention: CausalSelfAttention,
    *,
    dense_ffn: FeedForward | None,
    moe: MoeLayer | None,
  ):
    if dense_ffn is None and moe is None:
      raise ValueError("DecoderBlock needs a dense_ffn, a moe layer, or both")
    self.attn_norm = RMSNorm(d_model)
    self.attention = attention
    self.ffn_norm = RMSNorm(d_model)
    self.dense_ffn = dense_ffn
    self.moe = moe

  def __call__(
    self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array] | None, LayerCache | None]:
    """`[batch, seq, d_model]` -> (`[batch, seq, d_model]`, the MoE aux dict or None, cache).

    See `CausalSelfAttention` for `positions` and `cache`.
    """
    attn_out, cache = self.attention(self.attn_norm(x), positions, cache)
    x = x + attn_out
    h = self.ffn_norm(x)
    if self.dense_ffn is not None:
      x = x + self.dense_ffn(h).astype(x.dtype)
    aux = None
    if self.moe is not None:
      moe_out, aux = self.moe(h)
      x = x + moe_out.astype(x.dtype)
    return x, aux, cache


# ----------------------------------------------------------------------------- the model


class TransformerLM(nnx.Module):
  """Decoder-only LM: embed -> `num_layers` `DecoderBlock`s -> RMSNorm -> logits.

  Built from a model `ConfigDict` (keys in `moejax/config.py`; see the module docstring
  for the MoE layer layout), for one device (`mesh=None`) or for `mesh`, which its MoE
  layers run expert-parallel on (`moejax.moe.expert_parallel`). The token embedding `[vocab, d_model]` is
  drawn from N(0, 0.02²); with `tie_embeddings` the logits reuse it, otherwise an
  `lm_head` `[d_model, vocab]` (fan-in scaled) is added.

  Attributes:
    moe_layer_indices: tuple of the 0-based indices of the MoE layers.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, mesh=None, rngs: nnx.Rngs):
    validate_config(config)
    self.dtype = DTYPES[config.dtype]
    self.num_kv_heads, self.head_dim = config.num_kv_heads, head_dim_of(config)
    self.num_experts = config.num_experts
    self.moe_layer_indices = moe_layer_indices(
      config.num_layers, config.num_experts, config.moe_layer_interval
    )
    self.embed = nnx.Embed(
      config.vocab_size,
      config.d_model,
      embedding_init=nnx.initializers.normal(EMBEDDING_STDDEV),
      embedding_metadata=logical("vocab", "embed"),
      rngs=rngs,
    )
    layers = []
    for i in range(config.num_layers):
      is_moe = i in self.moe_layer_indices
      attention = CausalSelfAttention(
        config.d_model,
        config.num_heads,
        config.num_kv_heads,
        self.head_dim,
        rope_base=config.rope_base,
        qk_norm=config.qk_norm,
        dtype=self.dtype,
        rngs=rngs,
      )
      dense_ffn = (
        FeedForward(config.d_model, config.d_ff, config.activation, dtype=self.dtype, rngs=rngs)
        if not is_moe or config.dense_moe_hybrid
        else None
      )
      moe = (
        MoeLayer(moe_config(config), d_model=config.d_model, dtype=self.dtype, mesh=mesh, rngs=rngs)
        if is_moe
        else None
      )
      layers.append(DecoderBlock(config.d_model, attention, dense_ffn=dense_ffn, moe=moe))
    self.layers = nnx.List(layers)
    self.final_norm = RMSNorm(config.d_model)
    self.lm_head = (
      None
      if config.tie_embeddings
      else nnx.Linear(
        config.d_model,
        config.vocab_size,
        use_bias=False,
        dtype=self.dtype,
        preferred_element_type=jnp.float32,
        kernel_metadata=logical("embed", "vocab"),
        rngs=rngs,
      )
    )

  def init_cache(self, batch: int, max_len: int) -> tuple[LayerCache, ...]:
    """An empty KV cache: one `{'k', 'v'}` per layer, each `[batch, max_len, kv_heads,
    head_dim]` zeros in the compute dtype. Pass it to `__call__` and thread the result."""
    shape = (batch, max_len, self.num_kv_heads, self.head_dim)
    return tuple(
      {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in self.layers
    )

  def __call__(
    self,
    tokens: jax.Array,
    *,
    cache: tuple[LayerCache, ...] | None = None,
    start: int | jax.Array = 0,
  ):
    """Next-token logits for every position.

    Args:
      tokens: `[batch, seq]` int32.
      cache: None for a plain forward pass; or the KV cache from `init_cache` (or a
        previous call), to prefill a prompt or decode one or more tokens.
      start: int or int32 scalar (may be traced), the absolute position of `tokens[:, 0]`
        (all sequences of the batch share it). With a cache, the keys/values of
        positions `< start` must already be in it, and `start + seq <= max_len`
        (checked for a Python int; a traced start past the end is clamped by XLA).

    Returns:
      Without a cache `(logits, aux)`, with one `(logits, aux, new_cache)`, where
      logits is `[batch, seq, vocab]` float32 and aux aggregates the MoE layers:
      `lb_loss`, `z_loss`, `dropped_fraction`: float32 scalars, the mean over MoE layers
      (0.0 for a dense model); `expert_load`: `[num_moe_layers, num_experts]` (shape
      `[0, 0]` for a dense model); `routing`: one dict per MoE layer (see `MoeLayer`).
    """
    seq = tokens.shape[1]
    if cache is not None and isinstance(start, int) and start + seq > cache[0]["k"].shape[1]:
      raise ValueError(
        f"start={start} + seq={seq} exceeds the cache's max_len={cache[0]['k'].shape[1]}"
      )
    positions = start + jnp.arange(seq, dtype=jnp.int32)
    x = self.embed(tokens).astype(self.dtype)
    auxes, new_cache = [], []
    for i, layer in enumerate(self.layers):
      x, aux, layer_cache = layer(x, positions, None if cache is None else cache[i])
      new_cache.append(layer_cache)
      if aux is not None:
        auxes.append(aux)
    h = self.final_norm(x)
    if self.lm_head is None:
      embedding = self.embed.embedding[...].astype(self.dtype)
      logits = on_rows(
        lambda rows: jnp.einsum("nd,vd->nv", rows, embedding, preferred_element_type=jnp.float32), h
      )
    else:
      logits = on_rows(self.lm_head, h).astype(jnp.float32)
    aux = self._aggregate_aux(auxes)
    if cache is None:
      return logits, aux
    return logits, aux, tuple(new_cache)

  def _aggregate_aux(self, auxes: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    """Means of the scalar MoE metrics over MoE layers; per-layer expert loads stacked;
    each MoE layer's routing (`MoeLayer`'s `aux['routing']`) in a tuple."""
    if not auxes:
      zero = jnp.zeros((), jnp.float32)
      return {
        "lb_loss": zero,
        "z_loss": zero,
        "dropped_fraction": zero,
        "expert_load": jnp.zeros((0, self.num_experts), jnp.float32),
        "routing": (),
      }
    mean = lambda name: jnp.mean(jnp.stack([a[name].astype(jnp.float32) for a in auxes]))
    return {
      "lb_loss": mean("lb_loss"),
      "z_loss": mean("z_loss"),
      "dropped_fraction": mean("dropped_fraction"),
      "expert_load": jnp.stack([a["expert_load"] for a in auxes]),
      "routing": tuple(a["routing"] for a in auxes),
    }
