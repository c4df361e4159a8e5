"""Tests of moejax.models.transformer: shapes, causality, KV-cache decoding, GQA, RoPE, MoE layout, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.small_models import dense_model_config as tiny_config
from moejax.layers.attention import apply_rope, grouped_query_attention
from moejax.layers.norms import RMSNorm
from moejax.models.transformer import TransformerLM

VOCAB, BATCH, SEQ = 260, 2, 12


MOE = dict(num_experts=4, top_k=2)


def tokens(seed=0, batch=BATCH, seq=SEQ):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB, jnp.int32)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
  "overrides",
  [{}, MOE, dict(MOE, dtype="bfloat16", tie_embeddings=True)],
  ids=["dense", "moe", "moe-bf16-tied"],
)
def test_forward_shapes_and_aux(overrides):
  config = tiny_config(**overrides)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  logits, aux = model(tokens())
  assert logits.shape == (BATCH, SEQ, VOCAB) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert set(aux) == {
    "lb_loss",
    "seq_aux_loss",
    "z_loss",
    "dropped_fraction",
    "expert_load",
    "routing",
  }
  for name in ("lb_loss", "z_loss", "dropped_fraction"):
    assert aux[name].shape == ()
  num_moe = len(model.moe_layer_indices)
  assert aux["expert_load"].shape == (num_moe, config.num_experts)
  assert len(aux["routing"]) == num_moe
  for routing in aux["routing"]:
    assert routing["probs"].shape == (BATCH * SEQ, config.num_experts)
    assert routing["expert_indices"].shape == routing["kept"].shape == (BATCH * SEQ, config.top_k)
  if num_moe == 0:
    assert float(aux["lb_loss"]) == float(aux["z_loss"]) == float(aux["dropped_fraction"]) == 0.0
  else:
    assert float(aux["lb_loss"]) > 0 and float(aux["z_loss"]) > 0
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)


def test_aux_is_the_mean_over_moe_layers():
  model = TransformerLM(tiny_config(**MOE), rngs=nnx.Rngs(0))
  model.eval()
  x = tokens()
  _, aux = model(x)
  h, positions, per_layer = model.embed(x), jnp.arange(SEQ, dtype=jnp.int32), []
  for layer in map(model.layer, range(model.num_layers)):
    h, layer_aux, _ = layer(h, positions)
    per_layer.append(layer_aux)
  for name in ("lb_loss", "z_loss", "dropped_fraction"):
    np.testing.assert_allclose(aux[name], np.mean([a[name] for a in per_layer]), rtol=1e-6)
  np.testing.assert_allclose(
    aux["expert_load"], np.stack([a["expert_load"] for a in per_layer]), rtol=1e-6
  )


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    dict(num_kv_heads=1, qk_norm="none"),
    dict(MOE, dispatch="dropless"),
    dict(MOE, dispatch="dropless", dense_moe_hybrid=True, moe_layer_interval=2),
  ],
  ids=["dense", "dense-mqa", "moe-dropless", "hybrid-dropless"],
)
def test_causality(overrides):
  """Changing the tokens after position t never changes the logits at positions <= t.

  Capacity-based dispatch is left out on purpose: tokens of a sequence compete for expert
  capacity, so a later token can push an earlier one out of an expert (not causal).
  """
  model = TransformerLM(tiny_config(**overrides), rngs=nnx.Rngs(1))
  model.eval()
  x = tokens(2)
  logits, _ = model(x)
  for t in (0, 5, SEQ - 2):
    changed = x.at[:, t + 1 :].set(tokens(3)[:, t + 1 :])
    assert bool(jnp.any(changed != x))
    changed_logits, _ = model(changed)
    np.testing.assert_allclose(changed_logits[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=1e-5)
    assert not np.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
  "overrides",
  [{}, dict(MOE, dispatch="dropless", tie_embeddings=True)],
  ids=["dense", "moe-dropless"],
)
def test_kv_cache_decoding_matches_full_forward(overrides):
  """Prefill 5 tokens, then decode one token at a time with a jitted step (traced start)."""
  model = TransformerLM(tiny_config(**overrides), rngs=nnx.Rngs(2))
  model.eval()
  x = tokens(4)
  full_logits, _ = model(x)

  @nnx.jit
  def step(model, token, cache, start):
    logits, _, cache = model(token, cache=cache, start=start)
    return logits, cache

  prompt = 5
  cache = model.init_cache(BATCH, max_len=SEQ + 3)
  # One stack of the 2 layers, one block per period: [layers, batch, max_len, kv, head_dim].
  assert cache[0][0]["k"].shape == (2, BATCH, SEQ + 3, 2, 8)
  logits, _, cache = model(x[:, :prompt], cache=cache, start=0)
  decoded = [logits]
  for pos in range(prompt, SEQ):
    logits, cache = step(model, x[:, pos : pos + 1], cache, jnp.int32(pos))
    decoded.append(logits)
  np.testing.assert_allclose(jnp.concatenate(decoded, axis=1), full_logits, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunked_prefill_matches_full_forward():
  """A prompt may also be fed in chunks of several tokens."""
  model = TransformerLM(tiny_config(qk_norm="none", num_kv_heads=4), rngs=nnx.Rngs(3))
  x = tokens(5)
  full_logits, _ = model(x)
  cache = model.init_cache(BATCH, SEQ)
  first, _, cache = model(x[:, :7], cache=cache, start=0)
  second, _, cache = model(x[:, 7:], cache=cache, start=7)
  np.testing.assert_allclose(
    jnp.concatenate([first, second], axis=1), full_logits, atol=1e-5, rtol=1e-5
  )


def test_writing_past_the_cache_is_an_error():
  model = TransformerLM(tiny_config(), rngs=nnx.Rngs(0))
  cache = model.init_cache(BATCH, max_len=6)
  with pytest.raises(ValueError, match="max_len=6"):
    model(tokens(seq=3), cache=cache, start=4)


# ----------------------------------------------------------------------------- attention


def numpy_attention(q, k, v):
  """Causal attention, one query head at a time; query head h reads KV head h // group."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, seq, heads, dim = q.shape
  group = heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(heads):
      scores = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(dim)
      scores[np.triu(np.ones((seq, seq), bool), 1)] = -np.inf
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[b, :, h] = probs @ v[b, :, h // group]
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_grouped_query_attention_matches_numpy(heads, kv_heads):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 5, heads, 8), np.float32)
  k = rng.standard_normal((2, 5, kv_heads, 8), np.float32)
  v = rng.standard_normal((2, 5, kv_heads, 8), np.float32)
  mask = np.tril(np.ones((5, 5), bool))
  out = jax.jit(grouped_query_attention)(q, k, v, mask)
  np.testing.assert_allclose(out, numpy_attention(q, k, v), atol=1e-5)


rope = jax.jit(apply_rope, static_argnums=2)


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 16), np.float32)
  rotate = lambda x, pos: np.asarray(rope(x, np.array([pos], np.int32), 10_000.0))[0, 0, 0]
  dot = lambda m, n: float(np.dot(rotate(q, m), rotate(k, n)))
  for m, n in [(3, 1), (7, 7), (0, 9)]:
    for shift in (1, 13, 200):
      assert dot(m, n) == pytest.approx(dot(m + shift, n + shift), rel=1e-4, abs=1e-4)
  assert abs(dot(3, 1) - dot(4, 1)) > 1e-3  # ...and does depend on it.
  np.testing.assert_allclose(rotate(q, 0), q[0, 0, 0], atol=1e-6)  # Position 0: identity.
  np.testing.assert_allclose(np.linalg.norm(rotate(q, 57)), np.linalg.norm(q), rtol=1e-5)


def test_rope_base_changes_the_rotation():
  x = np.random.default_rng(2).standard_normal((1, 3, 2, 8), np.float32)
  positions = np.arange(3, dtype=np.int32)
  assert not np.allclose(rope(x, positions, 10_000.0), rope(x, positions, 100.0))


def test_rms_norm():
  norm = RMSNorm(6)
  x = jax.random.normal(jax.random.key(3), (2, 6)) * 5.0
  y = norm(x)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, axis=-1)), 1.0, rtol=1e-4)
  assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- MoE layout


@pytest.mark.parametrize("interval,expected", [(1, (0, 1, 2, 3)), (2, (1, 3)), (4, (3,))])
def test_moe_layer_placement(interval, expected):
  config = tiny_config(**MOE, num_layers=4, moe_layer_interval=interval)
  model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
  assert model.moe_layer_indices == expected
  for i, layer in enumerate(map(model.layer, range(model.num_layers))):
    assert (layer.moe is not None) == (i in expected)
    assert (layer.dense_ffn is not None) == (i not in expected)


def test_dense_model_has_no_moe_layers():
  model = nnx.eval_shape(lambda: TransformerLM(tiny_config(), rngs=nnx.Rngs(0)))
  assert model.moe_layer_indices == ()
  assert all(
    layer.moe is None and layer.dense_ffn is not None
    for layer in map(model.layer, range(model.num_layers))
  )


def test_dense_moe_hybrid_has_both_in_moe_layers():
  config = tiny_config(**MOE, num_layers=4, moe_layer_interval=2, dense_moe_hybrid=True)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  for i, layer in enumerate(map(model.layer, range(model.num_layers))):
    assert layer.dense_ffn is not None
    assert (layer.moe is not None) == (i in (1, 3))
  logits, aux = model(tokens())
  assert logits.shape == (BATCH, SEQ, VOCAB) and aux["expert_load"].shape == (2, 4)


def test_hybrid_output_is_the_sum_of_dense_and_moe():
  config = tiny_config(**MOE, num_layers=1, dense_moe_hybrid=True)
  block = TransformerLM(config, rngs=nnx.Rngs(0)).layer(0)
  x = jax.random.normal(jax.random.key(4), (BATCH, SEQ, 32))
  positions = jnp.arange(SEQ, dtype=jnp.int32)
  out, _, _ = block(x, positions)
  mid = x + block.attention(block.attn_norm(x), positions)[0]
  h = block.ffn_norm(mid)
  np.testing.assert_allclose(out, mid + block.dense_ffn(h) + block.moe(h)[0], atol=1e-5)


def test_eval_and_train_toggle_the_moe_layers():
  model = TransformerLM(tiny_config(**MOE), rngs=nnx.Rngs(0))
  model.eval()
  assert all(layer.moe.deterministic for layer in map(model.layer, range(model.num_layers)))
  model.train()
  assert not any(layer.moe.deterministic for layer in map(model.layer, range(model.num_layers)))


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "overrides,key",
  [
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(num_heads=5, num_kv_heads=5, head_dim=None), "head_dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(d_model=0), "d_model"),
    (dict(activation="tanh"), "activation"),
    (dict(dtype="float16"), "dtype"),
    (dict(rope_base=0.0), "rope_base"),
    (dict(num_experts=-1), "num_experts"),
    (dict(MOE, moe_layer_interval=0), "moe_layer_interval"),
    (dict(MOE, num_layers=2, moe_layer_interval=3), "num_layers"),
    (dict(MOE, top_k=5), "top_k"),
    (dict(MOE, router="hash"), "router"),
    (dict(MOE, dispatch="magic"), "dispatch"),
    (dict(dense_moe_hybrid=True), "dense_moe_hybrid"),
    (dict(remat="everything"), "remat"),
  ],
)
def test_config_validation(overrides, key):
  with pytest.raises(ValueError, match=rf"config\.model\.{key}") as error:
    TransformerLM(tiny_config(**overrides), rngs=nnx.Rngs(0))
  assert "\n" not in str(error.value)


def test_dense_config_ignores_moe_keys():
  """A dense model (num_experts=0) builds whatever the MoE-only keys hold."""
  TransformerLM(tiny_config(top_k=99, router="unused", moe_layer_interval=7), rngs=nnx.Rngs(0))


def test_unrolled_layers_compute_what_the_scanned_loop_computes():
  config = tiny_config(**MOE, num_layers=4, moe_layer_interval=2)
  scanned = TransformerLM(config, rngs=nnx.Rngs(0))
  config.scan_layers = False
  unrolled = TransformerLM(config, rngs=nnx.Rngs(0))
  grads = lambda model: nnx.grad(lambda m: jnp.mean(m(tokens())[0] ** 2))(model)
  np.testing.assert_allclose(scanned(tokens())[0], unrolled(tokens())[0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads(scanned)), jax.tree.leaves(grads(unrolled)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "attention_ffn", "offload_ffn"])
def test_recomputed_layers_give_the_gradients_of_stored_ones(remat):
  """`model.remat` changes what the backward pass keeps (or, offloading, where it keeps
  it), never what it computes."""
  config = tiny_config(**MOE, router_jitter=0.1)  # 2 MoE layers, scanned
  grads = lambda model: nnx.grad(lambda m: jnp.mean(m(tokens())[0] ** 2))(model)
  stored = grads(TransformerLM(config, rngs=nnx.Rngs(0)))
  config.remat = remat
  recomputed = grads(TransformerLM(config, rngs=nnx.Rngs(0)))
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(recomputed), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # XLA fuses the two otherwise
