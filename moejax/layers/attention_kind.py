"""What an attention kind (`model.attention`) owns, in one place: how its config keys are
checked, how it is built, its parameter and FLOP counts, its shape at the `cpu`/`smoke`
scale, and its tensors and keys in HF's on-disk format. Each kind's module defines one
`AttentionKind`; `moejax.layers.attention_kinds.KINDS` registers them.

Every kind's layer is called as `attention(x [batch, seq, d_model], positions ([seq] or
[batch, seq]), cache=None, segment_ids=None) -> ([batch, seq, d_model], cache)` and makes
its empty cache with `init_cache(batch, max_len, dtype)` (`CausalSelfAttention`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
from flax import nnx

# `require(ok, message)`: raises ValueError("config.model." + message) when not ok.
Require = Callable[[bool, str], None]


@dataclasses.dataclass(frozen=True)
class HfTensor:
  """One tensor of an attention layer in HF's layout.

  Attributes:
    name: its name under the layer's `self_attn.` (e.g. `q_proj.weight`).
    param: the moejax parameter under the block's `attention/` (e.g. `q_proj/kernel`).
    transpose: stored as HF's `[out, in]` (kernels), not as moejax's `[in, out]`.
    rows: the rows of the HF tensor this parameter holds (a fused tensor), or None.
    perm: a permutation of the parameter's output columns on disk (RoPE layouts), or None.
  """

  name: str
  param: str
  transpose: bool = True
  rows: tuple[int, int] | None = None
  perm: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  """One value of `model.attention`.

  Attributes:
    name: the value of `model.attention`.
    keys: the model config keys only this kind reads (carried over unchanged by upcycling).
    validate: `(model_config, require)`: checks those keys, one `require` per rule.
    build: `(model_config, *, dtype, mesh, rngs) -> nnx.Module`: one layer's attention, its
      kernel (`model.attention_kernel`) chosen for `mesh`'s platform (None: this process's).
    params: `model_config -> (matmul weights, vector parameters)` of one layer.
    score_widths: `model_config -> (q·k width, value width)`, summed over the heads: the
      attention FLOPs per token and context position are 2 · (sum of the two).
    shrink: `(published, model_config, small)`: sets the kind's keys of `model_config`
      for the `smoke` (small) or `cpu` model, in place, after d_model and num_heads are
      shrunk; `published` is the model config before shrinking.
    hf_tensors: `model_config -> HfTensor`s of one layer, in HF's on-disk order.
    from_hf: `(config_json, model_config)`: sets the kind's keys from HF's `config.json`.
    to_hf: `model_config -> dict`: the kind's `config.json` keys.
  """

  name: str
  keys: tuple[str, ...]
  validate: Callable[[ml_collections.ConfigDict, Require], None]
  build: Callable[..., nnx.Module]
  params: Callable[[ml_collections.ConfigDict], tuple[int, int]]
  score_widths: Callable[[ml_collections.ConfigDict], tuple[int, int]]
  shrink: Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict, bool], None]
  hf_tensors: Callable[[ml_collections.ConfigDict], Iterator[HfTensor]]
  from_hf: Callable[[dict[str, Any], ml_collections.ConfigDict], None]
  to_hf: Callable[[ml_collections.ConfigDict], dict[str, Any]]
