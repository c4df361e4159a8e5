"""Rematerialisation policies (`model.remat`): what a scanned period keeps for its
backward pass, and what it recomputes.

Each policy is a `jax.checkpoint` policy over one period of layers (Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost"). Named policies keep the activations
tagged in `moejax.layers.saved_names`:

| policy | kept | recomputed in the backward pass |
|---|---|---|
| `none` | everything (no checkpoint) | nothing |
| `full` | the period's input | the whole forward pass |
| `dots` | every matmul output without batch dims | attention scores, norms, activations; grouped expert matmuls (`ragged_dot` is not a `dot_general`) |
| `attention` | q, k, v, the context, the output projection | the attention scores, every FFN and router (and the exchanges feeding them) |
| `ffn` | every FFN's input rows, first matmuls and output | the attention block, the router |
| `attention_ffn` | both | the attention scores, norms, activations, the router |
| `offload_ffn` | attention's names on device; the FFN's in host memory | as `attention_ffn`, plus the host transfers |

The FLOPs each one recomputes are counted from the program itself
(`moejax.parallel.program_flops`), not assumed.
"""

from __future__ import annotations

import jax

from moejax.layers.saved_names import ATTENTION, FFN

_policies = jax.checkpoint_policies

POLICIES = {
  "none": None,
  "full": _policies.nothing_saveable,
  "dots": _policies.dots_with_no_batch_dims_saveable,
  "attention": _policies.save_only_these_names(*ATTENTION),
  "ffn": _policies.save_only_these_names(*FFN),
  "attention_ffn": _policies.save_only_these_names(*ATTENTION, *FFN),
  "offload_ffn": _policies.save_and_offload_only_these_names(
    names_which_can_be_saved=list(ATTENTION),
    names_which_can_be_offloaded=list(FFN),
    offload_src="device",
    offload_dst="pinned_host",
  ),
}


def checkpointed(step, remat: str):
  """`step` (a scan body) under the policy named `remat`; unchanged for `'none'`."""
  if remat == "none":
    return step
  return jax.checkpoint(step, policy=POLICIES[remat], prevent_cse=False)
