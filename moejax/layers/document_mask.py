"""Packed documents: a row that holds several documents, each computed as if alone.

Document masking (Zhao et al. 2024, "Analysing The Impact of Sequence Composition on
Language Model Pre-Training", arXiv:2402.13991): a packed row comes with `segment_ids`
`[batch, seq]` (the document of each token, 1, 2, ...; 0 marks padding) and `positions`
`[batch, seq]` (each token's position within its document, restarting at 0). A token
attends only to earlier tokens of its own document (`self_attention_mask`), RoPE rotates
by the in-document positions, and the MoE layers leave padding out (`MoeLayer`'s
`token_mask`), so a document gets the logits it would get alone in a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def self_attention_mask(positions: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """Which keys each query of a row may attend to: causal, and within its document.

  Causal: query slot i sees key slots j <= i (without `segment_ids` and with `[seq]`
  positions, computed from the positions, consecutive, as before packing existed). With
  `segment_ids` `[batch, seq]` (the document of each token; 0 marks padding), also only
  keys of the query's own segment (document masking, Zhao et al. 2024, arXiv:2402.13991).
  Padding is one more segment: a padding token sees the padding before it and itself, and
  no real token sees it. The diagonal is always True: every query sees at least one key.

  Args:
    positions: `[seq]` or `[batch, seq]` int, the tokens' positions.
    segment_ids: None or `[batch, seq]` int.

  Returns:
    `[seq, seq]` bool without `segment_ids`; `[batch, seq, seq]` with them.
  """
  if segment_ids is None and positions.ndim == 1:
    return positions[None, :] <= positions[:, None]  # [q, kv]
  index = jnp.arange(positions.shape[-1], dtype=jnp.int32)
  causal = index[None, :] <= index[:, None]  # [q, kv]
  if segment_ids is None:
    return causal
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, q, kv]
  return causal[None] & same


def check_segments(x: jax.Array, positions: jax.Array, segment_ids, cache) -> None:
  """One-line ValueErrors for the attention layers' `positions`/`segment_ids` arguments:
  with a cache only `[seq]` positions and no segments; shapes `[batch, seq]` otherwise."""
  batch, seq = x.shape[:2]
  if cache is not None and (segment_ids is not None or positions.ndim != 1):
    raise ValueError("decoding with a KV cache takes positions [seq] and no segment_ids.")
  if positions.shape not in ((seq,), (batch, seq)):
    raise ValueError(f"positions must be [seq] or [batch, seq], got {positions.shape}.")
  if segment_ids is not None and segment_ids.shape != (batch, seq):
    raise ValueError(f"segment_ids must be [batch, seq]=({batch}, {seq}), got {segment_ids.shape}.")


def check_documents(tokens, segment_ids, positions, cache, start) -> None:
  """One-line ValueErrors for `TransformerLM.__call__`'s packing arguments: both or
  neither, each `[batch, seq]` like `tokens`, no cache and `start` 0 with them."""
  if segment_ids is None and positions is None:
    return
  if cache is not None:
    raise ValueError("segment_ids/positions are for the forward pass; decode without them.")
  if segment_ids is None or positions is None:
    missing = "positions" if positions is None else "segment_ids"
    raise ValueError(f"segment_ids and positions go together: {missing} is missing.")
  for name, array in (("segment_ids", segment_ids), ("positions", positions)):
    if array.shape != tokens.shape:
      raise ValueError(f"{name} must be [batch, seq]={tokens.shape}, got {array.shape}.")
  if not (isinstance(start, int) and start == 0):
    raise ValueError(f"start={start!r} must be 0 when positions are given.")
