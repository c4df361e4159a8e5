"""Decoder-only Transformer language model whose FFNs may be Mixture-of-Experts layers.

The block is the modern pre-norm LLaMA/Mixtral/OLMoE recipe:

* RMSNorm (Zhang & Sennrich 2019) before attention and before the FFN, and at the end,
  with the published model's eps (`model.norm_eps`); with `model.post_norms` also on each
  sublayer's output before the residual add ("sandwich" norms, as Grok-1 has);
* causal self-attention with RoPE, grouped key/value heads, optional QK-norm and q/k/v
  biases (`moejax.layers.attention`);
* an FFN that is a dense `FeedForward`, a `moejax.moe.MoeLayer`, or both side by side with
  their outputs summed (the dense-MoE hybrid, "residual MoE", of Snowflake Arctic).

Which layers are MoE (`layer_kinds`): the first `first_dense_layers` are dense
(DeepSeek's `first_k_dense_replace`); after them, with `moe_layer_interval = n`, the last
layer of every group of n is MoE: n=1 makes every layer MoE (Mixtral, OLMoE), n=2 every
other layer starting from the second (GShard, Switch Transformer), n=4 one in four.

The layers run as scans (`LayerStack`): the repeating period of the layout (e.g. [dense,
MoE]) is built once per repeat with its parameters stacked on a leading `layers` axis,
and `jax.lax.scan` runs the repeats, so a deeper model compiles no bigger program
(`model.scan_layers=True`). With `scan_layers=False` the same scan is unrolled into
straight-line code: the same parameters and checkpoints, a program that grows with depth,
and faster steps for small models on CPU (docs/performance.md, "What changed"). The
layout is cut into at most three stacks: the first dense layers, the periods, and a
remainder (`layer_stacks`).

Packed rows (several documents per row) pass `segment_ids` and `positions` `[batch, seq]`:
attention stays within each document and RoPE restarts at each (document masking, Zhao
et al. 2024, arXiv:2402.13991), and padding (segment 0) takes no part in the MoE layers.

Decoding uses an explicit KV cache pytree (see `TransformerLM.init_cache`):

    cache = model.init_cache(batch, max_len)
    logits, aux, cache = model(prompt, cache=cache, start=0)          # prefill
    logits, aux, cache = model(next_tok[:, None], cache=cache, start=P)  # one step

Parameters are float32; `config.dtype` is the compute dtype. Logits are always float32.
`model.embedding_multiplier` and `model.output_multiplier` scale the embeddings entering
the first block and the logits (Grok-1's `embedding_multiplier_scale` 78.38 and
`output_multiplier_scale` 0.577, in xai-org/grok-1's model.py `LanguageModel`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from moejax.layers.activations import ACTIVATIONS
from moejax.layers.attention import LayerCache, qk_norm_mode
from moejax.layers.attention_kernel import check_kernel
from moejax.layers.attention_kinds import KINDS, kind_of
from moejax.layers.document_mask import check_documents
from moejax.layers.dropout import ResidualDropout, draws_randomness
from moejax.layers.ffn import FeedForward, on_rows
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import SCALINGS
from moejax.models.remat import POLICIES, checkpointed
from moejax.moe import MoeConfig, MoeLayer
from moejax.moe.aggregate import aggregate_aux
from moejax.parallel.sharding import logical, on_batch_axes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EMBEDDING_STDDEV = 0.02
SCAN_METADATA = {nnx.PARTITION_NAME: "layers"}  # the stacked axis's logical name


# ----------------------------------------------------------------------------- config


def layer_kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """'dense' or 'moe' for each layer: after the first `first_dense_layers`, layer i is MoE
  iff `(i - first_dense_layers + 1) % moe_layer_interval == 0` (no MoE layer without
  experts)."""
  first, n = config.first_dense_layers, config.moe_layer_interval
  return tuple(
    "moe" if config.num_experts and i >= first and (i - first + 1) % n == 0 else "dense"
    for i in range(config.num_layers)
  )


def moe_layer_indices(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The 0-based indices of the MoE layers (empty for the dense baseline)."""
  return tuple(i for i, kind in enumerate(layer_kinds(config)) if kind == "moe")


def layer_stacks(config: ml_collections.ConfigDict) -> tuple[tuple[tuple[str, ...], int], ...]:
  """The layout as scans: `((period kinds, repeats), ...)` in layer order; the first dense
  layers, then repeats of the `moe_layer_interval`-layer period, then any remainder."""
  kinds = layer_kinds(config)
  first = config.first_dense_layers if config.num_experts else 0
  period = config.moe_layer_interval if config.num_experts else 1
  repeats = (len(kinds) - first) // period
  rest = first + repeats * period
  stacks = [(("dense",), first), (kinds[first : first + period], repeats), (kinds[rest:], 1)]
  return tuple((kinds_, r) for kinds_, r in stacks if kinds_ and r)


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
    config.remat in POLICIES,
    f"remat must be one of {tuple(POLICIES)}, got {config.remat!r}",
  )
  if config.attention not in KINDS:
    require(False, f"attention must be one of {tuple(KINDS)}, got {config.attention!r}")
  try:
    check_kernel(config.attention_kernel, config.attention_logit_cap)
  except ValueError as error:
    require(False, str(error))
  KINDS[config.attention].validate(config, require)
  require(config.rope_base > 0, f"rope_base must be > 0, got {config.rope_base}")
  require(
    config.rope_scaling in SCALINGS,
    f"rope_scaling must be one of {SCALINGS}, got {config.rope_scaling!r}",
  )
  if config.rope_scaling == "yarn":
    require(config.rope_factor >= 1, f"rope_factor must be >= 1, got {config.rope_factor}")
    require(
      isinstance(config.rope_original_max_len, int) and config.rope_original_max_len >= 1,
      f"rope_original_max_len must be a positive int, got {config.rope_original_max_len!r}",
    )
    require(
      config.yarn_beta_fast >= config.yarn_beta_slow > 0,
      f"yarn_beta_fast >= yarn_beta_slow > 0 is needed, got {config.yarn_beta_fast} and "
      f"{config.yarn_beta_slow}",
    )
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
  require(
    isinstance(config.first_dense_layers, int) and config.first_dense_layers >= 0,
    f"first_dense_layers must be an int >= 0, got {config.first_dense_layers!r}",
  )
  require(config.norm_eps > 0, f"norm_eps must be > 0, got {config.norm_eps}")
  require(
    isinstance(config.post_norms, bool),
    f"post_norms must be True or False, got {config.post_norms!r}",
  )
  for key in ("embedding_multiplier", "output_multiplier"):
    require(0 < config[key] < math.inf, f"{key} must be a finite number > 0, got {config[key]}")
  try:
    qk_norm_mode(config.qk_norm)
  except ValueError as error:
    require(False, str(error))
  if config.num_experts > 0:
    require(
      config.num_layers >= config.first_dense_layers + config.moe_layer_interval,
      f"num_layers={config.num_layers} must be >= first_dense_layers + moe_layer_interval="
      f"{config.first_dense_layers + config.moe_layer_interval} so that some layer is MoE",
    )
    moe_config(config)


def moe_config(config: ml_collections.ConfigDict) -> MoeConfig:
  """The `MoeConfig` of a model config with experts; its one-line errors name the key."""
  try:
    return MoeConfig.from_model_config(config)
  except (ValueError, TypeError) as error:
    raise ValueError(f"config.model.{error}") from None


# ----------------------------------------------------------------------------- layers


class DecoderBlock(nnx.Module):
  """Pre-norm block: `x + drop(attn(norm(x)))`, then `x + drop(ffn(norm(x)))` (`model.dropout`).

  `kind` 'dense' has a dense FFN; 'moe' an MoE layer, beside a dense FFN with
  `dense_moe_hybrid` (Snowflake Arctic), their outputs summed. With `post_norms` each
  sublayer's output is normalised before it joins the residual stream: `x +
  drop(norm(attn(norm(x))))`, then `x + drop(norm(ffn(norm(x))))`, the FFN's branches
  summed before the norm and dropped out only if one is dense (xai-org/grok-1's model.py
  `DecoderLayer`: `rms_norm` before and `rms_norm_1` after the attention, `rms_norm_2`
  before and `rms_norm_3` after the MoE).
  """

  def __init__(self, config: ml_collections.ConfigDict, kind: str, *, dtype, mesh, rngs: nnx.Rngs):
    d = config.d_model
    self.attn_norm = RMSNorm(d, eps=config.norm_eps)
    self.attention = kind_of(config).build(config, dtype=dtype, mesh=mesh, rngs=rngs)
    self.ffn_norm = RMSNorm(d, eps=config.norm_eps)
    post_norm = lambda: RMSNorm(d, eps=config.norm_eps) if config.post_norms else None
    self.post_attn_norm, self.post_ffn_norm = post_norm(), post_norm()
    self.dropout = ResidualDropout(config.dropout, rngs=rngs)  # dense branches; experts: their own
    has_dense = kind == "dense" or config.dense_moe_hybrid
    self.dense_ffn = (
      FeedForward(d, config.d_ff, config.activation, dtype=dtype, rngs=rngs) if has_dense else None
    )
    self.moe = (
      MoeLayer(moe_config(config), d_model=d, dtype=dtype, mesh=mesh, rngs=rngs)
      if kind == "moe"
      else None
    )

  def __call__(
    self, x: jax.Array, positions: jax.Array, cache: LayerCache | None = None, segment_ids=None
  ) -> tuple[jax.Array, dict[str, jax.Array] | None, LayerCache | None]:
    """`[batch, seq, d_model]` -> (`[batch, seq, d_model]`, the MoE aux dict or None, cache).

    See `moejax.layers.attention.CausalSelfAttention` for `positions` (`[seq]` or `[batch, seq]`),
    `cache` and `segment_ids` (`[batch, seq]`; its padding, 0, is masked out of the MoE).
    """
    attn_out, cache = self.attention(self.attn_norm(x), positions, cache, segment_ids)
    if self.post_attn_norm is not None:
      attn_out = self.post_attn_norm(attn_out)
    x = x + self.dropout(attn_out)
    h = self.ffn_norm(x)
    dense_out = None if self.dense_ffn is None else self.dense_ffn(h)
    moe_out = aux = None
    if self.moe is not None:
      moe_out, aux = self.moe(h, token_mask=None if segment_ids is None else segment_ids > 0)
    if self.post_ffn_norm is None:  # each branch joins the residual stream
      if dense_out is not None:
        x = x + self.dropout(dense_out).astype(x.dtype)
      if moe_out is not None:
        x = x + moe_out.astype(x.dtype)
    else:  # the branches' sum, normalised; dropped out if it has a dense branch
      branches = [o for o in (dense_out, moe_out) if o is not None]
      out = self.post_ffn_norm(functools.reduce(jnp.add, branches))
      x = x + (out if dense_out is None else self.dropout(out)).astype(x.dtype)
    return x, aux, cache


class Period(nnx.Module):
  """The blocks of one repeat of a `LayerStack`, applied in order."""

  def __init__(self, config, kinds: tuple[str, ...], *, dtype, mesh, rngs: nnx.Rngs):
    self.blocks = nnx.List(
      [DecoderBlock(config, kind, dtype=dtype, mesh=mesh, rngs=rngs) for kind in kinds]
    )

  def __call__(self, x, positions, caches, segment_ids=None):
    """-> (x, the MoE blocks' aux dicts in order, the blocks' caches or None)."""
    auxes, new_caches = [], []
    for i, block in enumerate(self.blocks):
      x, aux, cache = block(x, positions, None if caches is None else caches[i], segment_ids)
      new_caches.append(cache)
      if aux is not None:
        auxes.append(aux)
    return x, tuple(auxes), None if caches is None else tuple(new_caches)


class LayerStack(nnx.Module):
  """`repeats` copies of a `Period` of blocks (`kinds`), parameters stacked on a leading
  `layers` axis (`[repeats, ...]`), run by `nnx.scan`: one compiled period whatever the
  depth."""

  def __init__(self, config, kinds, repeats: int, *, dtype, mesh, rngs: nnx.Rngs):
    self.kinds, self.repeats = tuple(kinds), repeats
    # `scan_layers=False` unrolls the loop into straight-line code (same parameters).
    self.unroll = 1 if config.scan_layers else repeats
    self.remat = config.remat

    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=SCAN_METADATA)
    def build(rngs):
      return Period(config, self.kinds, dtype=dtype, mesh=mesh, rngs=rngs)

    self.period = build(rngs)

  def init_cache(self, batch: int, max_len: int, dtype):
    """An empty cache for every block: `[repeats, batch, max_len, ...]` zeros."""
    stacked = lambda z: jnp.zeros((self.repeats,) + z.shape, z.dtype)
    return tuple(
      jax.tree.map(stacked, block.attention.init_cache(batch, max_len, dtype))
      for block in self.period.blocks
    )

  def __call__(self, x, positions, cache, segment_ids=None):
    """-> (x, the MoE blocks' aux dicts stacked `[repeats, ...]`, the cache or None).

    A `jax.lax.scan` over the stacked state (split once; each step merges its slice), so
    it runs under any JAX transform. When a block draws randomness (training with dropout,
    router jitter or noise, random routing, expert dropout), the RNG streams' advanced counters
    come back as the scan's output and are written to the module.
    """
    graphdef, params, rest = nnx.split(self.period, nnx.Param, ...)
    random = any(draws_randomness(b) for b in self.period.blocks)

    def step(x, sliced):
      params, rest, cache = sliced
      period = nnx.merge(graphdef, params, rest)
      x, auxes, cache = period(x, positions, cache, segment_ids)
      return x, (auxes, cache, nnx.state(period, nnx.Not(nnx.Param)) if random else None)

    step = checkpointed(step, self.remat)
    x, (auxes, cache, rest) = jax.lax.scan(step, x, (params, rest, cache), unroll=self.unroll)
    if random:
      nnx.update(self.period, rest)
    return x, auxes, cache


# ----------------------------------------------------------------------------- the model


class TransformerLM(nnx.Module):
  """Decoder-only LM: embed -> the `LayerStack`s -> RMSNorm -> logits.

  Built from a model `ConfigDict` (keys in `moejax/config/defaults.py`; see the module docstring
  for the layer layout), for one device (`mesh=None`) or for `mesh`, which its MoE layers
  run expert-parallel on (`moejax.moe.expert_parallel`). The token embedding `[vocab,
  d_model]` is drawn from N(0, 0.02²); with `tie_embeddings` the logits reuse it,
  otherwise an `lm_head` `[d_model, vocab]` (fan-in scaled) is added. The embeddings
  `[batch, seq, d_model]` are multiplied by `embedding_multiplier`, the logits `[batch,
  seq, vocab]` by `output_multiplier` (Grok-1).

  Attributes:
    num_layers: the decoder blocks (`layer(i)` gives one).
    moe_layer_indices: tuple of the 0-based indices of the MoE layers.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, mesh=None, rngs: nnx.Rngs):
    validate_config(config)
    self.dtype, self.mesh = DTYPES[config.dtype], mesh
    self.num_experts, self.num_layers = config.num_experts, config.num_layers
    self.moe_layer_indices = moe_layer_indices(config)
    self.embedding_multiplier = config.embedding_multiplier
    self.output_multiplier = config.output_multiplier
    self.embed = nnx.Embed(
      config.vocab_size,
      config.d_model,
      embedding_init=nnx.initializers.normal(EMBEDDING_STDDEV),
      embedding_metadata=logical("vocab", "embed"),
      rngs=rngs,
    )
    self.stacks = nnx.List(
      [
        LayerStack(config, kinds, repeats, dtype=self.dtype, mesh=mesh, rngs=rngs)
        for kinds, repeats in layer_stacks(config)
      ]
    )
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
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

  def layer(self, i: int) -> DecoderBlock:
    """Layer `i` as a `DecoderBlock` of its own: a copy of its slice of the stacked
    parameters (changing it does not change the model)."""
    if not 0 <= i < self.num_layers:
      raise IndexError(f"layer {i} of a {self.num_layers}-layer model")
    for stack in self.stacks:
      size = stack.repeats * len(stack.kinds)
      if i < size:
        repeat, slot = divmod(i, len(stack.kinds))
        graphdef, state = nnx.split(stack.period.blocks[slot])
        take = lambda a, repeat=repeat: (
          jax.ShapeDtypeStruct(a.shape[1:], a.dtype)  # under nnx.eval_shape
          if isinstance(a, jax.ShapeDtypeStruct)
          else a[repeat]
        )
        return nnx.merge(graphdef, jax.tree.map(take, state))
      i -= size
    raise AssertionError("the stacks hold every layer")

  def update_selection_biases(self, expert_load: jax.Array) -> None:
    """Aux-loss-free balancing after a step: every MoE layer with `bias_update_rate` > 0
    moves its selection bias (`MoeLayer.update_selection_bias`) by its row of
    `expert_load` `[num_moe_layers, experts]` (the model's `aux['expert_load']`: shares
    of the step's assignments over the global batch, so the same on every mesh)."""
    row = 0
    for stack in self.stacks:
      slots = [j for j, kind in enumerate(stack.kinds) if kind == "moe"]
      for position, j in enumerate(slots):
        moe = stack.period.blocks[j].moe
        if moe.selection_bias is not None:  # rows of this slot: repeat-major layer order
          moe.update_selection_bias(expert_load[row + position :: len(slots)][: stack.repeats])
      row += stack.repeats * len(slots)

  def init_cache(self, batch: int, max_len: int):
    """An empty KV cache for every layer, in the compute dtype (one tuple per stack). Pass it
    to `__call__` and thread the result."""
    return tuple(stack.init_cache(batch, max_len, self.dtype) for stack in self.stacks)

  def __call__(
    self, tokens, *, segment_ids=None, positions=None, cache=None, start: int | jax.Array = 0
  ):
    """Next-token logits for every position.

    Args:
      tokens: `[batch, seq]` int32.
      segment_ids: None (one document per row), or `[batch, seq]` int32, the document of
        each token within its row (>= 1; 0 = padding); needs `positions`. A token attends
        only to earlier tokens of its segment (padding, one segment of its own, too; see
        `moejax.layers.document_mask.self_attention_mask`), and padding takes no part in the MoE
        layers (no capacity, no balance statistics, zero MoE output).
      positions: None (`start + arange(seq)`), or `[batch, seq]` int32, each token's
        position within its document (0 at each document's first token); needs
        `segment_ids`. Neither is derived from the other.
      cache: None for a plain forward pass; or the KV cache from `init_cache` (or a
        previous call), to prefill a prompt or decode one or more tokens.
      start: int or int32 scalar (may be traced), the absolute position of `tokens[:, 0]`
        (all sequences of the batch share it). With a cache, the keys/values of
        positions `< start` must already be in it, and `start + seq <= max_len`
        (checked for a Python int; a traced start past the end is clamped by XLA).

    Returns:
      Without a cache `(logits, aux)`, with one `(logits, aux, new_cache)`, where
      logits is `[batch, seq, vocab]` float32 and aux aggregates the MoE layers:
      `lb_loss`, `seq_aux_loss`, `z_loss`, `dropped_fraction`: float32 scalars, the mean
      over MoE layers
      (0.0 for a dense model); `expert_load`: `[num_moe_layers, num_experts]` (shape
      `[0, 0]` for a dense model); `routing`: one dict per MoE layer (see `MoeLayer`).
    """
    seq = tokens.shape[1]
    check_documents(tokens, segment_ids, positions, cache, start)
    if cache is not None and isinstance(start, int):
      max_len = jax.tree.leaves(cache)[0].shape[2]  # [repeats, batch, max_len, ...]
      if start + seq > max_len:
        raise ValueError(f"start={start} + seq={seq} exceeds the cache's max_len={max_len}")
    if positions is None:
      positions = start + jnp.arange(seq, dtype=jnp.int32)
    x = on_batch_axes(self.embed(tokens).astype(self.dtype), self.mesh)
    if self.embedding_multiplier != 1.0:
      x = x * self.embedding_multiplier  # a Python float: x keeps its dtype
    auxes, new_cache = [], []
    for i, stack in enumerate(self.stacks):
      x, stack_auxes, stack_cache = stack(
        x, positions, None if cache is None else cache[i], segment_ids
      )
      new_cache.append(stack_cache)
      # Layer order within a stack: repeat-major, then the MoE blocks of the period.
      auxes += [
        jax.tree.map(lambda a, r=r: a[r], aux) for r in range(stack.repeats) for aux in stack_auxes
      ]
    h = self.final_norm(x)
    if self.lm_head is None:
      embedding = self.embed.embedding[...].astype(self.dtype)
      logits = on_rows(
        lambda rows: jnp.einsum("nd,vd->nv", rows, embedding, preferred_element_type=jnp.float32), h
      )
    else:
      logits = on_rows(self.lm_head, h).astype(jnp.float32)
    if self.output_multiplier != 1.0:
      logits = logits * self.output_multiplier
    logits, aux = on_batch_axes(logits, self.mesh), aggregate_aux(auxes, self.num_experts)
    if cache is None:
      return logits, aux
    return logits, aux, tuple(new_cache)
