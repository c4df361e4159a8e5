"""The CPU default: a 4-layer byte-level MoE LM on the Shakespeare plays (`make demo`).

8 experts, top-2, every layer MoE, SwiGLU experts of hidden 256. ARG: '' (the demo run,
a few minutes on 2 CPU cores), 'smoke' (a handful of steps, for tests), or 'bpe': the same
model on subword text, the Shakespeare plays and the King James Bible tokenized by the
built-in byte-level BPE of 2,048 tokens (`make demo-bpe`, which prepares the token stores
first: `moejax.data.builtin`), with document masking.
"""

from moejax.config import apply_variant, base_config
from moejax.data import builtin


def get_config(arg: str = ""):
  config = base_config()
  m = config.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 4, 128, 4, 4
  m.d_ff = 512
  m.num_experts, m.top_k, m.expert_d_ff = 8, 2, 256
  m.dispatch = "auto"
  m.scan_layers = False  # 4 small layers: unrolled steps run faster on CPU

  t = config.train
  t.num_steps, t.batch_size, t.seq_len = 600, 32, 128
  t.learning_rate, t.warmup_steps = 3e-3, 60
  t.log_every, t.eval_every, t.checkpoint_every = 20, 200, 200
  config.data.eval_batches = 8

  if arg == "smoke":
    return apply_variant(config, arg, "tiny")
  if arg == "bpe":
    m.vocab_size = 2048
    config.data.tokenizer = builtin.BPE_2048
    config.data.tokens_dir = builtin.store_dir("bpe2048", "train")
    config.data.eval_tokens_dir = builtin.store_dir("bpe2048", "validation")
    return config
  if arg:
    raise ValueError(f"configs/tiny.py: unknown ARG {arg!r}; allowed: '', 'smoke' or 'bpe'.")
  return config
