"""Names of the activations a rematerialisation policy may keep (`model.remat`).

Each is tagged with `jax.ad_checkpoint.checkpoint_name` where it is computed; the
policies of `moejax.models.remat` save (or offload) tensors by these names, and the
backward pass recomputes everything else of a layer from the layer's input.

- `ATTENTION_QKV`: the outputs of the query, key and value projections, before
  QK-norm and RoPE (`[batch, seq, heads·head_dim]`, `[batch, seq, kv_heads·head_dim]`;
  MLA: the query (and its low-rank latent), the key/value latent, the shared rotary key,
  and the keys and values expanded from the latent), so the backward pass recomputes
  only elementwise work before the scores;
- `ATTENTION_CONTEXT`: softmax(q·kᵀ)·v before the output projection
  (`[batch, seq, heads·head_dim]`);
- `ATTENTION_OUT`: the output projection (`[batch, seq, d_model]`);
- `FFN_IN`: the rows an FFN reads: a dense FFN's input, or an expert's rows after dispatch
  and the expert-parallel exchange (`[rows, d_model]` or `[experts, rows, d_model]`);
- `FFN_PRE`: the FFN's first matmuls, x·W_in and x·W_gate (`[..., d_ff]`);
- `FFN_OUT`: the FFN's output, before it is combined or sent back (`[..., d_model]`).

Attention scores and probabilities (`[batch, heads, seq, seq]`) are never named: they are
the largest activations, and recomputing them from q and k is cheap next to storing them.
"""

ATTENTION_QKV = "attention_qkv"
ATTENTION_CONTEXT = "attention_context"
ATTENTION_OUT = "attention_out"
FFN_IN = "ffn_in"
FFN_PRE = "ffn_pre"
FFN_OUT = "ffn_out"

ATTENTION = (ATTENTION_QKV, ATTENTION_CONTEXT, ATTENTION_OUT)
FFN = (FFN_IN, FFN_PRE, FFN_OUT)
