"""Sample from the latest checkpoint of a run with a KV cache.

`python -m moejax.generate --workdir=DIR --prompt=TEXT [--max_new_tokens=N]
[--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]`

The model runs in eval mode with token-choice routing and no capacity limit, so the
prompt's prefill routes every token as decoding it token by token would.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from moejax import checkpoint as checkpoint_lib
from moejax import data as data_lib
from moejax import train as train_lib
from moejax.moe import MoeLayer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the K most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1.0 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
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
  prompt_ids: np.ndarray,
  *,
  max_new_tokens: int,
  temperature: float = 0.8,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
) -> np.ndarray:
  """Continues `prompt_ids` (`[prompt_len]` int) by `max_new_tokens` tokens.

  Prefills the prompt into a KV cache once, then decodes one token per step with a
  jitted step (one compile for every position). Stops early at EOS.

  Returns:
    `[new_tokens]` int32, the generated continuation.
  """
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
  prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
  max_len = prompt.shape[1] + max_new_tokens

  @jax.jit
  def prefill(state, tokens):
    model = nnx.merge(graphdef, state)
    logits, _, cache = model(tokens, cache=model.init_cache(1, max_len), start=0)
    return logits[:, -1], cache

  @jax.jit
  def decode(state, token, cache, position):
    logits, _, cache = nnx.merge(graphdef, state)(token, cache=cache, start=position)
    return logits[:, -1], cache

  def choose(logits, key):
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

  key = jax.random.key(seed)
  logits, cache = prefill(state, prompt)
  out = []
  for i in range(max_new_tokens):
    key, sub = jax.random.split(key)
    token = choose(logits, sub)
    token_id = int(token[0])
    if token_id == data_lib.EOS_ID:
      break
    out.append(token_id)
    if i + 1 < max_new_tokens:
      logits, cache = decode(state, token[:, None], cache, jnp.int32(prompt.shape[1] + i))
  return np.asarray(out, np.int32)


def load_model(workdir: str):
  """The model of the latest checkpoint in `workdir`, with its config."""
  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=1_000_000)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}: train first with moejax.main.")
  config = checkpoints.restore_config()
  model, optimizer, _ = train_lib.build(config)
  graphdef, state = nnx.split((model, optimizer))
  step, state, _ = checkpoints.restore(state)
  checkpoints.close()
  model, _ = nnx.merge(graphdef, state)
  return model, config, step


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax info lines out of the sample
  try:
    if not _WORKDIR.value:
      raise ValueError("--workdir is required.")
    if (
      _MAX_NEW.value < 1 or _TEMPERATURE.value < 0 or not 0 < _TOP_P.value <= 1 or _TOP_K.value < 0
    ):
      raise ValueError(
        "need --max_new_tokens >= 1, --temperature >= 0, 0 < --top_p <= 1, --top_k >= 0."
      )
    model, _, step = load_model(_WORKDIR.value)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  prompt = np.concatenate([[data_lib.BOS_ID], data_lib.encode(_PROMPT.value)])
  new = sample(
    model,
    prompt,
    max_new_tokens=_MAX_NEW.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    seed=_SEED.value,
  )
  print(f"--- sample from step {step} ---")
  print(_PROMPT.value + data_lib.decode(new))


if __name__ == "__main__":
  app.run(main)
