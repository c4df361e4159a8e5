"""Sample from a trained run: `python -m moejax.generate --workdir=DIR --prompt=TEXT
[--max_new_tokens=N] [--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]`

A model with its own vocabulary (an import) takes token ids instead, and prints ids:
`--prompt_ids=ID,ID,...` (tokenise with the checkpoint's tokenizer); sampling stops at
the `eos_token_id` of the imported config.json, if it has one.

Uses the newest readable checkpoint of DIR (a newer unreadable one is named and skipped)
and never writes to DIR. The model runs in eval mode with token-choice routing and no
capacity limit, so the prompt's prefill routes every token as decoding it one by one would.

The model attends to at most `train.seq_len` tokens, the context it was trained on. Past
that the window slides: when it is full, the newest `seq_len // 2` tokens are prefilled
again at positions 0.., and decoding goes on from there, so every token is predicted from
between seq_len/2 and seq_len tokens of context at the positions training used.
"""

from __future__ import annotations

from moejax.runtime import signals

if __name__ == "__main__":  # first thing: a signal at any later moment ends it cleanly
  signals.handle_signals("sampling stopped; nothing was written.")

import dataclasses  # noqa: E402
from collections.abc import Collection  # noqa: E402

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from moejax import data as data_lib
from moejax.data.tokenizer.kinds import HfTokenizer
from moejax.moe import MoeLayer
from moejax.runtime import cli
from moejax.training import workdir as workdir_lib
from moejax.training.loading import load_model

__all__ = ["filter_logits", "load_model", "sample"]


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Run directory with checkpoints (only read).")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_string(
    "prompt_ids",
    "",
    "Token ids to continue, comma-separated, instead of --prompt (for a model with its own "
    "vocabulary: an import); the sequence is printed as ids.",
  )
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens (bytes) to generate.", lower_bound=1)
  flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.", lower_bound=0.0)
  flags.DEFINE_integer(
    "top_k",
    0,
    "Sample among the K most likely tokens (at most the vocabulary); 0 = all.",
    lower_bound=0,
  )
  flags.DEFINE_float(
    "top_p", 1.0, "Nucleus sampling mass; 1.0 = off.", lower_bound=0.0, upper_bound=1.0
  )
  flags.register_validator(
    "top_p", lambda p: p > 0, message="0 is not a number in the range (0.0, 1.0]"
  )
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer(
    "step", None, "Checkpoint step to sample from (default: the newest readable)."
  )
  flags.mark_flag_as_required("workdir")


def filter_logits(logits, *, temperature: float, top_k: int, top_p: float):
  """Temperature, top-k and top-p (Holtzman et al. 2020) on `[batch, vocab]` logits.

  Filtered-out tokens get -inf. With temperature 0 only the argmax survives.
  """
  if temperature == 0.0:
    best = jnp.argmax(logits, axis=-1, keepdims=True)
    return jnp.where(jnp.arange(logits.shape[-1]) == best, 0.0, -jnp.inf)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(
  model,
  prompt_ids,
  *,
  max_new_tokens: int,
  context_len: int,
  temperature: float = 0.8,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stop_ids: Collection[int] = (data_lib.EOS_ID,),
):
  """Continues `prompt_ids` (`[prompt_len]` int) by up to `max_new_tokens` tokens.

  The model sees at most `context_len` tokens (the `train.seq_len` it was trained on):
  the newest `context_len` tokens of the prompt are prefilled into a KV cache, then one
  token is decoded per jitted step. The cache holds what this call needs, not what the
  model could attend to: min(context_len, prompt + max_new_tokens) tokens (an import's
  `max_position_embeddings` of 128k costs nothing for a short sample). When it is full
  at `context_len`, the newest `context_len // 2` tokens are prefilled again from
  position 0 (the window slides).
  Stops early at a token of `stop_ids` (not returned). Compiles three programs: the
  prompt's prefill, the slide's prefill and the decode step.

  Returns:
    `[new_tokens]` int32, the generated continuation.
  """
  if context_len < 2:
    raise ValueError(f"context_len={context_len} must be >= 2.")
  # Capacity is a training device: when sampling, every token reaches its experts
  # (capacity = all tokens), so a prefilled prompt routes as it would token by token.
  # A view of the model in eval mode with that capacity; `model` itself is unchanged.
  model = nnx.clone(model)
  model.eval()
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MoeLayer):
      module.config = dataclasses.replace(
        module.config, eval_capacity_factor=module.num_experts / module.top_k
      )
  graphdef, state = nnx.split(model)
  keep = context_len // 2
  tokens = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
  window = tokens[-context_len:]
  cache_len = min(context_len, len(window) + max_new_tokens)

  @jax.jit
  def prefill(state, tokens):
    model = nnx.merge(graphdef, state)
    logits, _, cache = model(tokens, cache=model.init_cache(1, cache_len), start=0)
    return logits[:, -1], cache

  @jax.jit
  def decode(state, token, cache, position):
    logits, _, cache = nnx.merge(graphdef, state)(token, cache=cache, start=position)
    return logits[:, -1], cache

  def choose(logits, key):
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return int(jax.random.categorical(key, filtered, axis=-1)[0])

  logits, cache = prefill(state, jnp.asarray(window, jnp.int32)[None])
  position = len(window)  # the next token's position in the cache
  key = jax.random.key(seed)
  out = []
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    token = choose(logits, sub)
    if token in stop_ids:
      break
    out.append(token)
    tokens.append(token)
    if i + 1 == max_new_tokens:
      break
    if position == cache_len:  # the window is full (only at context_len): slide it
      logits, cache = prefill(state, jnp.asarray(tokens[-keep:], jnp.int32)[None])
      position = keep
    else:
      logits, cache = decode(state, jnp.asarray([[token]], jnp.int32), cache, jnp.int32(position))
      position += 1
  return np.asarray(out, np.int32)


def _token_ids(text: str, vocab: int) -> list[int]:
  """`--prompt_ids` as a list of ids, each in [0, vocab)."""
  try:
    ids = [int(part) for part in text.split(",")]
  except ValueError:
    raise ValueError(f"--prompt_ids={text!r} must be token ids separated by commas.") from None
  wrong = [i for i in ids if not 0 <= i < vocab]
  if wrong:
    raise ValueError(f"--prompt_ids: {wrong[0]} is not a token id of this model's [0, {vocab}).")
  return ids


def _context_and_stop_ids(workdir: str, config) -> tuple[int, tuple[int, ...]]:
  """The tokens the model attends to, and the ids sampling stops at. A moejax run: its
  `train.seq_len`, and its tokenizer's EOS (moejax's for bytes). An import: the
  `max_position_embeddings` and `eos_token_id` (an id or a list of them) of its
  config.json. A run fine-tuned from an import has its own `train.seq_len` and no EOS."""
  from moejax.convert.transfer import import_record

  hf = (import_record(workdir) or {}).get("config", {})
  context = int(hf.get("max_position_embeddings", config.train.seq_len))
  text = _text_tokenizer(workdir, config)
  if text is not None and not hf:
    return context, (text[0].eos_id,)
  if config.model.vocab_size == data_lib.VOCAB_SIZE:
    return context, (data_lib.EOS_ID,)
  eos = hf.get("eos_token_id")
  return context, tuple(eos) if isinstance(eos, list) else () if eos is None else (eos,)


def _text_tokenizer(workdir: str, config):
  """(tokenizer, ids put before a `--prompt`'s) of the run in `workdir`, from the
  tokenizer files it keeps (a run on token stores copies its stores', an import its
  source's): a run on token stores reads documents that follow no BOS, an import gets what
  its file's post-processor puts first; else the byte tokenizer, after BOS unless the run
  read byte token stores; None when the run's tokenizer is unknown."""
  stores = data_lib.uses_token_stores(config.data)
  directory = workdir_lib.resolve(workdir)
  for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "spm")):
    if (directory / name).exists():
      tokenizer = data_lib.load_tokenizer(f"{kind}:{directory / name}")
      prefix = []
      if isinstance(tokenizer, HfTokenizer) and not stores:
        prefix = tokenizer.prompt_prefix()
      return tokenizer, prefix
  if config.model.vocab_size == data_lib.VOCAB_SIZE:
    return data_lib.load_tokenizer("bytes"), [] if stores else [data_lib.BOS_ID]
  return None


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  if FLAGS.prompt and FLAGS.prompt_ids:
    raise ValueError("--prompt and --prompt_ids: give one of them.")
  model, config, step = load_model(FLAGS.workdir, FLAGS.step)
  vocab = config.model.vocab_size
  text = _text_tokenizer(FLAGS.workdir, config)
  if text is None and not FLAGS.prompt_ids:
    raise ValueError(
      f"this model has a vocabulary of {vocab} tokens, not moejax's {data_lib.VOCAB_SIZE} "
      "bytes (an imported checkpoint with its own tokenizer): tokenise with the "
      "checkpoint's tokenizer and pass --prompt_ids=ID,ID,... instead of --prompt."
    )
  if FLAGS.top_k > vocab:
    raise ValueError(
      f"--top_k={FLAGS.top_k} is not an integer in the range [0, {vocab}] (this model has "
      f"{vocab} tokens)."
    )
  if FLAGS.prompt_ids:
    prompt = _token_ids(FLAGS.prompt_ids, vocab)
  else:
    tokenizer, prefix = text
    prompt = [*prefix, *(int(i) for i in tokenizer.encode(FLAGS.prompt))]
    prompt = prompt or [tokenizer.eos_id]  # nothing to continue: start after a document
  context, stop_ids = _context_and_stop_ids(FLAGS.workdir, config)
  if not stop_ids:
    print(f"(no end-of-sequence id is known for this vocabulary: {FLAGS.max_new_tokens} tokens)")
  new = sample(
    model,
    prompt,
    max_new_tokens=FLAGS.max_new_tokens,
    context_len=context,
    temperature=FLAGS.temperature,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
    seed=FLAGS.seed,
    stop_ids=stop_ids,
  )
  slid = len(prompt) + len(new) > context
  note = f"; past its {context}-token context, the window slid" if slid else ""
  print(f"--- sample from step {step}{note} ---")
  if FLAGS.prompt_ids:
    print(",".join(str(i) for i in [*prompt, *new]), flush=True)
  else:
    print(FLAGS.prompt + text[0].decode(new), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
