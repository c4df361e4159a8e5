"""Grok-1's blocks against the NumPy reference written from xai-org/grok-1's model.py
(`helpers.grok_reference`): the whole tiny model with Grok's options (soft-capped
attention, sandwich norms, embedding and output multipliers, tanh-GELU experts, tied
output), one decoder block, each option on its own (capped attention's values and
gradients, the multipliers), the KV-cache decode with the cap on, and the keys' checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import grok_reference as ref
from helpers.small_models import dense_model_config
from moejax.layers.activations import hidden_activation
from moejax.layers.attention import grouped_query_attention
from moejax.models.transformer import TransformerLM, validate_config
from moejax.training.tree_paths import flat, path_name

BATCH, SEQ, VOCAB = 2, 6, 260
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8  # the tiny model's GQA: d_model 32
# Grok-1's options (run.py, model.py) on the tiny 2-layer model.
GROK = dict(
  qk_norm="none",
  activation="geglu_tanh",
  norm_eps=ref.RMS_EPS,
  rope_base=float(ref.ROPE_BASE),
  attention_logit_cap=ref.MAX_ATTN_VAL,
  post_norms=True,
  embedding_multiplier=ref.EMBEDDING_MULTIPLIER,
  output_multiplier=ref.OUTPUT_MULTIPLIER,
  tie_embeddings=True,
)
GROK_MOE = dict(GROK, num_experts=4, top_k=2, expert_d_ff=16, renormalize=False)
DIMS = dict(
  num_q_heads=HEADS,
  num_kv_heads=KV_HEADS,
  key_size=HEAD_DIM,
  num_selected_experts=2,
  attn_output_multiplier=HEAD_DIM**-0.5,  # Grok's 0.0884 is 128^-0.5 for its heads of 128
)

ATTENTION_DIMS = dict(
  num_q_heads=HEADS, num_kv_heads=KV_HEADS, key_size=HEAD_DIM, multiplier=HEAD_DIM**-0.5
)


def _draw(rng, name, shape):
  """Random weights at a scale where every option matters: norm scales in [0.5, 1.5]
  (not ones), q and k kernels large enough that attention logits reach tens (the cap's
  non-linear range), a router wide enough that no two experts nearly tie."""
  if name.endswith("scale"):
    return rng.uniform(0.5, 1.5, shape)
  if name.startswith("embed"):
    return rng.normal(0.0, 0.02, shape)
  if "q_proj" in name or "k_proj" in name:
    return rng.normal(0.0, 0.5, shape)
  if "router" in name:
    return rng.normal(0.0, 1.0, shape)
  return rng.normal(0.0, shape[-2] ** -0.5, shape)


def grok_model(seed=0, **overrides) -> TransformerLM:
  """The tiny model with `GROK_MOE` (and `overrides`), every parameter drawn by `_draw`."""
  model = TransformerLM(dense_model_config(**{**GROK_MOE, **overrides}), rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 100)
  state = nnx.state(model, nnx.Param)
  draw = lambda path, a: jnp.asarray(_draw(rng, path_name(path), a.shape), jnp.float32)
  state.replace_by_pure_dict(jax.tree_util.tree_map_with_path(draw, state.to_pure_dict()))
  nnx.update(model, state)
  return model


def grok_params(model: TransformerLM) -> dict:
  """The model's weights under Grok-1's Haiku names (`grok_reference`'s docstring), float64."""
  p = flat(nnx.state(model, nnx.Param).to_pure_dict())
  layers = []
  for i in range(model.num_layers):  # one stack of one block a period: i is the repeat
    get = lambda name, i=i: np.asarray(p[f"stacks/0/period/blocks/0/{name}"][i], np.float64)
    layer = {
      "rms_norm": get("attn_norm/scale"),
      "rms_norm_1": get("post_attn_norm/scale"),
      "rms_norm_2": get("ffn_norm/scale"),
      "rms_norm_3": get("post_ffn_norm/scale"),
      "attn": {
        "query": get("attention/q_proj/kernel"),
        "key": get("attention/k_proj/kernel"),
        "value": get("attention/v_proj/kernel"),
        "linear": get("attention/o_proj/kernel"),
      },
    }
    # Grok's `linear` is gelu'd (moejax's gate), `linear_v` multiplies it (moejax's w_in).
    if model.num_experts:
      layer["router"] = get("moe/router_kernel")
      names = ("moe/experts/w_gate", "moe/experts/w_in", "moe/experts/w_out")
    else:
      names = ("dense_ffn/w_gate", "dense_ffn/w_in", "dense_ffn/w_out")
    ffn = dict(zip(("linear", "linear_v", "linear_1"), map(get, names), strict=True))
    layer["moe" if model.num_experts else "dense"] = ffn
    layers.append(layer)
  table = np.asarray(p["embed/embedding"], np.float64)
  return {"in_out_embed": table, "rms_norm": np.asarray(p["final_norm/scale"]), "layers": layers}


def tokens(seed=0):
  """`[batch, seq]` ids in 1..vocab-1: 0 is Grok's padding."""
  return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (BATCH, SEQ)), jnp.int32)


def relative_error(got, expected):
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_tiny_grok_equals_the_reference(kind):
  """Logits of the 2-layer model with every Grok option equal model.py's computation; each
  option off (the same weights) misses it by far more, so each one is checked here."""
  overrides = {} if kind == "moe" else dict(num_experts=0, d_ff=16)
  model = grok_model(**overrides)
  x = tokens()
  expected = ref.language_model(np.asarray(x), grok_params(model), **DIMS)
  logits, _ = model(x)
  assert relative_error(logits, expected) < 2e-5
  if kind == "dense":
    return
  for name, off in [
    ("attention_logit_cap", None),
    ("activation", "geglu"),  # the exact GELU: within 1e-3 of the tanh form
    ("embedding_multiplier", 1.0),
    ("output_multiplier", 1.0),
  ]:
    other = TransformerLM(dense_model_config(**{**GROK_MOE, name: off}), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model, nnx.Param))
    assert relative_error(other(x)[0], expected) > 1e-4, name


def test_a_decoder_block_equals_grok_decoder_layer():
  """One block: the norms sit before and after the attention and the MoE (rms_norm,
  rms_norm_1, rms_norm_2, rms_norm_3), the post-norms on each sublayer's output before
  its residual add."""
  model = grok_model(seed=1)
  block = model.layer(1)
  h = np.random.default_rng(2).normal(0.0, 1.5, (BATCH, SEQ, 32)).astype(np.float32)
  out, _, _ = block(jnp.asarray(h), jnp.arange(SEQ, dtype=jnp.int32))
  layer = grok_params(model)["layers"][1]
  expected = np.stack([ref.decoder_layer(row.astype(np.float64), layer, **DIMS) for row in h])
  assert relative_error(out, expected) < 2e-5
  # The post-norms' scales reach the output; pre-norm (no rms_norm_1/_3) would not match.
  no_post = {**layer, "rms_norm_1": 1.0, "rms_norm_3": 1.0}
  plain = np.stack([ref.decoder_layer(row.astype(np.float64), no_post, **DIMS) for row in h])
  assert relative_error(out, plain) > 1e-3


def test_a_hybrid_blocks_post_norm_normalises_the_sum_of_its_branches():
  """With a dense FFN beside the experts (Arctic's hybrid), the FFN post-norm takes their
  sum, in NumPy from the block's own weights: `x + norm(dense(f) + moe(f))`."""
  model = grok_model(seed=8, dense_moe_hybrid=True)
  block = model.layer(0)
  h = np.random.default_rng(9).normal(0.0, 1.5, (BATCH, SEQ, 32)).astype(np.float32)
  out, _, _ = block(jnp.asarray(h), jnp.arange(SEQ, dtype=jnp.int32))
  p = grok_params(model)["layers"][0]
  w = {
    k: np.asarray(getattr(block.dense_ffn, k)[...], np.float64) for k in ("w_in", "w_gate", "w_out")
  }
  dense = {"linear": w["w_gate"], "linear_v": w["w_in"], "linear_1": w["w_out"]}
  for row, got in zip(h.astype(np.float64), np.asarray(out), strict=True):
    attn = ref.attention(ref.rms_norm(row, p["rms_norm"]), p["attn"], **ATTENTION_DIMS)
    x = row + ref.rms_norm(attn, p["rms_norm_1"])
    f = ref.rms_norm(x, p["rms_norm_2"])
    branches = np.stack([ref.dense_block(v, dense) for v in f])
    branches += ref.moe(f, p["router"], p["moe"], num_selected_experts=2)
    assert relative_error(got, x + ref.rms_norm(branches, p["rms_norm_3"])) < 2e-5


def test_multipliers_scale_the_embeddings_and_the_logits():
  """Other multipliers than Grok's, each against the reference: the embedding multiplier
  scales what enters the first block (not the tied output), the output multiplier the
  logits."""
  base = grok_model(seed=3, num_experts=0, d_ff=16)
  x = tokens(1)
  params = grok_params(base)
  for embedding, output in [(1.0, 1.0), (3.0, 0.25)]:
    dense = {**GROK_MOE, "num_experts": 0, "d_ff": 16}
    dense.update(embedding_multiplier=embedding, output_multiplier=output)
    model = TransformerLM(dense_model_config(**dense), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(base, nnx.Param))
    expected = ref.language_model(
      np.asarray(x), params, embedding_multiplier=embedding, output_multiplier=output, **DIMS
    )
    assert relative_error(model(x)[0], expected) < 2e-5, (embedding, output)


# ----------------------------------------------------------------------------- soft-capping


def _capped_attention_inputs():
  rng = np.random.default_rng(4)
  q = rng.normal(0.0, 3.0, (1, 4, 2, 4))  # [batch, seq, heads, head_dim]: logits of ~±10
  k = rng.normal(0.0, 3.0, (1, 4, 1, 4))
  v = rng.normal(0.0, 1.0, (1, 4, 1, 4))
  return q, k, v


@pytest.mark.parametrize("cap", [None, 30.0, 4.0])
def test_soft_capped_attention_values_and_gradients(cap):
  """`grouped_query_attention` with `logit_cap` equals `cap · tanh(s / cap)` before the
  softmax (the reference's `attend`), and so do its gradients with respect to q, k and v
  (central differences of the float64 reference)."""
  q, k, v = _capped_attention_inputs()
  upstream = np.random.default_rng(5).normal(size=q.shape)
  mask = jnp.tril(jnp.ones((4, 4), bool))

  def ours(q, k, v):
    return grouped_query_attention(q, k, v, mask, cap)

  def reference(q, k, v):
    return ref.attend(q[0], k[0], v[0], multiplier=0.5, max_attn_val=cap)[None]  # 4^-0.5

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  out = jax.jit(ours)(f32(q), f32(k), f32(v))
  expected = reference(q, k, v)
  assert relative_error(out, expected) < 1e-5
  uncapped = ref.attend(q[0], k[0], v[0], multiplier=0.5, max_attn_val=None)[None]
  if cap is not None:  # the cap changes the output 50-1000 times more than float32 errs
    assert relative_error(out, uncapped) > 1e-4

  loss = lambda q, k, v: jnp.sum(ours(q, k, v) * upstream)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(f32(q), f32(k), f32(v))
  args = [q, k, v]
  for i, grad in enumerate(grads):
    numeric = np.zeros_like(args[i])
    for index in np.ndindex(args[i].shape):
      step = np.zeros_like(args[i])
      step[index] = 1e-6
      up = [a + step if j == i else a for j, a in enumerate(args)]
      down = [a - step if j == i else a for j, a in enumerate(args)]
      numeric[index] = np.sum((reference(*up) - reference(*down)) * upstream) / 2e-6
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-3, atol=1e-4)


def test_cached_decode_with_the_cap_equals_the_full_forward():
  """Prefill 3 tokens, then decode one at a time (a jitted step, traced start), with a cap
  of 2 that every logit feels: the same logits as the full forward pass."""
  model = grok_model(seed=6, attention_logit_cap=2.0)
  model.eval()
  x = tokens(2)
  full, _ = model(x)
  uncapped = TransformerLM(
    dense_model_config(**{**GROK_MOE, "attention_logit_cap": None}), rngs=nnx.Rngs(0)
  )
  nnx.update(uncapped, nnx.state(model, nnx.Param))
  assert relative_error(uncapped(x)[0], full) > 1e-2  # the cap bites

  @nnx.jit
  def step(model, token, cache, start):
    logits, _, cache = model(token, cache=cache, start=start)
    return logits, cache

  cache = model.init_cache(BATCH, max_len=SEQ)
  logits, _, cache = model(x[:, :3], cache=cache, start=0)
  decoded = [logits]
  for pos in range(3, SEQ):
    logits, cache = step(model, x[:, pos : pos + 1], cache, jnp.int32(pos))
    decoded.append(logits)
  np.testing.assert_allclose(jnp.concatenate(decoded, axis=1), full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the rest


def test_geglu_tanh_gates_with_the_tanh_gelu():
  """'geglu_tanh' is `jax.nn.gelu`'s default (tanh) form, as Grok's DenseBlock calls it;
  'geglu' is the exact one, which differs by up to about 1e-3."""
  gate = np.linspace(-4.0, 4.0, 41)
  pre = np.random.default_rng(7).normal(size=gate.shape)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  ours = hidden_activation("geglu_tanh", f32(pre), f32(gate))
  np.testing.assert_allclose(ours, ref.gelu(gate) * pre, rtol=1e-5, atol=1e-6)
  exact = hidden_activation("geglu", f32(pre), f32(gate))
  assert float(jnp.max(jnp.abs(exact - ours))) > 1e-4


MLA = dict(attention="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4)


@pytest.mark.parametrize(
  "overrides,key",
  [
    (dict(attention_logit_cap=-1.0), "attention_logit_cap"),
    (dict(attention_logit_cap=math.inf), "attention_logit_cap"),
    (dict(MLA, attention_logit_cap=30.0), "attention_logit_cap"),
    (dict(embedding_multiplier=0.0), "embedding_multiplier"),
    (dict(output_multiplier=-0.5), "output_multiplier"),
    (dict(output_multiplier=math.nan), "output_multiplier"),
  ],
)
def test_grok_keys_are_checked(overrides, key):
  with pytest.raises(ValueError, match=rf"^config\.model\.{key}") as error:
    validate_config(dense_model_config(qk_norm="none", **overrides))
  assert "\n" not in str(error.value)


def test_post_norms_must_be_a_bool():
  config = dense_model_config()
  with config.ignore_type():
    config.post_norms = "yes"
  with pytest.raises(ValueError, match=r"^config\.model\.post_norms must be True or False"):
    validate_config(config)


def test_off_by_default_and_zero_cap_is_off():
  """The defaults build no post-norms and no cap; a cap of 0 is no cap."""
  config = dense_model_config()
  assert config.attention_logit_cap is None and not config.post_norms
  assert config.embedding_multiplier == config.output_multiplier == 1.0
  model = nnx.eval_shape(
    lambda: TransformerLM(dense_model_config(attention_logit_cap=0.0), rngs=nnx.Rngs(0))
  )
  block = model.layer(0)
  assert block.post_attn_norm is None and block.post_ffn_norm is None
  assert block.attention.logit_cap is None


@pytest.mark.parametrize(
  "key, value",
  [
    ("attention_logit_cap", 30.0),
    ("post_norms", True),
    ("embedding_multiplier", 78.38),
    ("output_multiplier", 0.577),
  ],
)
def test_export_refuses_grok_blocks_no_hf_family_holds(key, value):
  from moejax.config import load_config
  from moejax.convert import families

  model = load_config("configs/mixtral.py:smoke").model
  families.check_expressible(model, families.FAMILIES["mixtral"])  # as published: writable
  model.unlock()
  model[key] = value
  with pytest.raises(ValueError, match=rf"model\.{key}=.* cannot be written as mixtral"):
    families.check_expressible(model, families.FAMILIES["mixtral"])
