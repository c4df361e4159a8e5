"""Multi-head latent attention (`moejax.layers.mla`) against the float64 NumPy reference written
from DeepSeek-V2 §2.1 (`family_reference.mla`): the forward, its gradients, the latent KV
cache (prefill then token by token equals the full forward), causality and the RoPE layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import family_reference as ref
from moejax.layers.mla import MultiHeadLatentAttention
from moejax.parallel.sharding import LOGICAL_AXIS_RULES

DIMS = dict(
  d_model=16,
  num_heads=3,
  kv_lora_rank=5,
  qk_nope_head_dim=4,
  qk_rope_head_dim=6,
  v_head_dim=3,  # differs from every other size, so a mixed-up split fails
  rope_base=100.0,
  norm_eps=1e-6,
)


def make(q_lora_rank=7, seed=0, **overrides):
  """An MLA layer with random (not unit) RMSNorm scales, so that the test sees them."""
  layer = MultiHeadLatentAttention(
    **{**DIMS, **overrides}, q_lora_rank=q_lora_rank, rngs=nnx.Rngs(seed)
  )
  rng = np.random.default_rng(seed + 100)
  for norm in (layer.q_norm, layer.kv_norm):
    if norm is not None:
      norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
  return layer


def params_of(layer):
  """float64 copies of the layer's weights, named as `family_reference.mla` reads them."""
  get = lambda module, name: np.asarray(getattr(module, name)[...], np.float64)
  params = {
    "kv_down": get(layer.kv_down, "kernel"),
    "kv_norm": get(layer.kv_norm, "scale"),
    "kv_up": get(layer.kv_up, "kernel"),
    "k_rope": get(layer.k_rope, "kernel"),
    "o": get(layer.o_proj, "kernel"),
  }
  if layer.q_proj is not None:
    params["q"] = get(layer.q_proj, "kernel")
  else:
    params.update(
      q_down=get(layer.q_down, "kernel"),
      q_norm=get(layer.q_norm, "scale"),
      q_up=get(layer.q_up, "kernel"),
    )
  return params


def reference(layer, x, positions, rope_layout="half", params=None):
  return ref.mla(
    np.asarray(x, np.float64),
    params_of(layer) if params is None else params,
    num_heads=layer.num_heads,
    qk_nope_head_dim=layer.qk_nope_head_dim,
    qk_rope_head_dim=layer.qk_rope_head_dim,
    v_head_dim=layer.v_head_dim,
    rope_base=layer.rope.base,
    eps=DIMS["norm_eps"],
    positions=np.asarray(positions),
    rope_layout=rope_layout,
  )


def relative_error(got, expected):
  return float(np.max(np.abs(np.asarray(got, np.float64) - expected)) / np.max(np.abs(expected)))


def inputs(seed=1, batch=2, seq=6):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=(batch, seq, DIMS["d_model"])), jnp.float32
  )


@pytest.mark.parametrize("q_lora_rank", [7, None, 0])
def test_forward_matches_reference(q_lora_rank):
  layer = make(q_lora_rank)
  assert (layer.q_proj is None) == bool(q_lora_rank)
  x = inputs()
  positions = 3 + jnp.arange(6, dtype=jnp.int32)
  out, cache = layer(x, positions)
  assert cache is None and out.shape == x.shape and out.dtype == jnp.float32
  assert relative_error(out, reference(layer, x, positions)) < 1e-5


def test_gradients_match_reference():
  small = dict(d_model=6, num_heads=2, kv_lora_rank=3, qk_nope_head_dim=2, qk_rope_head_dim=2)
  layer = make(q_lora_rank=4, seed=2, **small)  # small: every entry is differenced
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 3, 6)), jnp.float32)
  positions = jnp.arange(3, dtype=jnp.int32)
  upstream = np.random.default_rng(4).normal(size=x.shape)
  params = params_of(layer)

  graphdef, state = nnx.split(layer)

  def loss(x, state):
    return jnp.sum(nnx.merge(graphdef, state)(x, positions)[0] * upstream)

  g_x, g_state = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, state)
  g_kv_up = g_state["kv_up"]["kernel"][...]

  def numeric(name, value):
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
      step = np.zeros_like(value)
      step[i] = 1e-6
      if name == "x":
        up, down = (
          reference(layer, value + step, positions, params=params),
          reference(layer, value - step, positions, params=params),
        )
      else:
        up = reference(layer, x, positions, params={**params, name: value + step})
        down = reference(layer, x, positions, params={**params, name: value - step})
      grad[i] = np.sum((up - down) * upstream) / 2e-6
    return grad

  np.testing.assert_allclose(
    np.asarray(g_x), numeric("x", np.asarray(x, np.float64)), rtol=1e-3, atol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(g_kv_up), numeric("kv_up", params["kv_up"]), rtol=1e-3, atol=1e-5
  )


@pytest.mark.parametrize("q_lora_rank", [7, None])
def test_cached_decode_equals_full_forward(q_lora_rank):
  """Prefill 3 tokens into the latent cache, then decode 4 one at a time: the outputs are
  the full forward's (the cached path attends in the latent space, the full one expands
  keys and values: the same function in two orders)."""
  layer = make(q_lora_rank, seed=5)
  batch, seq, prompt, max_len = 2, 7, 3, 9
  x = inputs(seed=6, batch=batch, seq=seq)
  full, _ = layer(x, jnp.arange(seq, dtype=jnp.int32))
  cache = layer.init_cache(batch, max_len, jnp.float32)
  step = jax.jit(lambda x, positions, cache: layer(x, positions, cache))
  outs = []
  out, cache = step(x[:, :prompt], jnp.arange(prompt, dtype=jnp.int32), cache)
  outs.append(out)
  for t in range(prompt, seq):
    out, cache = step(x[:, t : t + 1], jnp.array([t], jnp.int32), cache)
    outs.append(out)
  decoded = jnp.concatenate(outs, axis=1)
  assert relative_error(decoded, np.asarray(full, np.float64)) < 1e-5
  assert relative_error(decoded, reference(layer, x, np.arange(seq))) < 1e-5

  # The cache holds the normalised latent c_KV and the rotated shared rope key, and zeros
  # past the last written position.
  params = params_of(layer)
  x64 = np.asarray(x, np.float64)
  latent = np.array(
    [
      [ref.rms_norm(v @ params["kv_down"], params["kv_norm"], DIMS["norm_eps"]) for v in row]
      for row in x64
    ]
  )
  k_rope = np.array(
    [
      [ref.rope(v @ params["k_rope"], t, DIMS["rope_base"]) for t, v in enumerate(row)]
      for row in x64
    ]
  )
  assert cache["latent"].shape == (batch, max_len, DIMS["kv_lora_rank"])
  assert cache["k_rope"].shape == (batch, max_len, DIMS["qk_rope_head_dim"])
  np.testing.assert_allclose(np.asarray(cache["latent"][:, :seq]), latent, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(cache["k_rope"][:, :seq]), k_rope, rtol=1e-4, atol=1e-5)
  assert not np.any(np.asarray(cache["latent"][:, seq:])) and not np.any(
    np.asarray(cache["k_rope"][:, seq:])
  )


def test_causal():
  """Changing later tokens changes no earlier output, with or without a cache."""
  layer = make(seed=7)
  x = inputs(seed=8, batch=1, seq=6)
  changed = x.at[:, 4:].set(
    jnp.asarray(np.random.default_rng(9).normal(size=(1, 2, DIMS["d_model"])))
  )
  positions = jnp.arange(6, dtype=jnp.int32)
  a, _ = layer(x, positions)
  b, _ = layer(changed, positions)
  np.testing.assert_array_equal(np.asarray(a[:, :4]), np.asarray(b[:, :4]))
  assert not np.allclose(np.asarray(a[:, 4:]), np.asarray(b[:, 4:]))
  a, _ = layer(x, positions, layer.init_cache(1, 8))
  b, _ = layer(changed, positions, layer.init_cache(1, 8))
  np.testing.assert_allclose(np.asarray(a[:, :4]), np.asarray(b[:, :4]), rtol=1e-6, atol=1e-7)


def test_deepseek_interleaved_rope_is_a_column_permutation():
  """DeepSeek's released code rotates interleaved channel pairs; this layer rotates halves.
  Loading DeepSeek weights = permuting the rope columns of the query projection (per head)
  and of the rope-key projection by evens-then-odds: then the outputs agree."""
  layer = make(seed=10)
  x = inputs(seed=11, batch=1, seq=5)
  positions = jnp.arange(5, dtype=jnp.int32)
  deepseek = params_of(layer)  # read as weights in DeepSeek's interleaved layout
  nope, rope, heads = DIMS["qk_nope_head_dim"], DIMS["qk_rope_head_dim"], DIMS["num_heads"]
  perm = ref.interleaved_to_half(rope)
  per_head = np.concatenate([np.arange(nope), nope + perm])
  q_columns = np.concatenate([h * (nope + rope) + per_head for h in range(heads)])
  layer.q_up.kernel[...] = jnp.asarray(deepseek["q_up"][:, q_columns], jnp.float32)
  layer.k_rope.kernel[...] = jnp.asarray(deepseek["k_rope"][:, perm], jnp.float32)
  out, _ = layer(x, positions)
  expected = reference(layer, x, positions, rope_layout="interleaved", params=deepseek)
  assert relative_error(out, expected) < 1e-5
  # Without the permutation the two layouts disagree.
  unpermuted = reference(layer, x, positions, rope_layout="half", params=deepseek)
  assert relative_error(unpermuted, expected) > 1e-3


def test_bfloat16_compute_is_close():
  layer = make(seed=12)
  x = inputs(seed=13)
  positions = jnp.arange(6, dtype=jnp.int32)
  full, _ = layer(x, positions)
  layer.dtype = jnp.bfloat16
  for module in (layer.q_down, layer.q_up, layer.kv_down, layer.kv_up, layer.k_rope, layer.o_proj):
    module.dtype = jnp.bfloat16
  half, _ = layer(x.astype(jnp.bfloat16), positions)
  assert half.dtype == jnp.bfloat16
  assert relative_error(half.astype(jnp.float32), np.asarray(full, np.float64)) < 5e-2
  cache = layer.init_cache(2, 8)
  assert cache["latent"].dtype == jnp.bfloat16


def test_parameters_carry_logical_axes():
  known = {name for name, _ in LOGICAL_AXIS_RULES} | {"q_lora", "kv_lora"}
  for q_lora_rank in (7, None):
    layer = make(q_lora_rank)
    count = 0
    for path, var in nnx.iter_graph(layer):
      if isinstance(var, nnx.Param):
        names = var.get_metadata().get("out_sharding")
        assert names and len(names) == var[...].ndim, path
        assert set(names) <= known, (path, names)
        count += 1
    assert count == (8 if q_lora_rank else 6)


def test_deepseek_v3_cache_is_576_numbers_a_token():
  """MLA's point, at DeepSeek-V3's sizes (config.json: 128 heads, q_lora_rank 1536,
  kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128; hidden
  7168): 512 + 64 cached numbers per token and layer against 2 · 128 · 192 for the keys and
  values of plain multi-head attention. Built abstractly (no memory)."""
  layer = nnx.eval_shape(
    lambda: MultiHeadLatentAttention(
      7168, 128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
      qk_rope_head_dim=64, v_head_dim=128, rope_base=10000.0, rngs=nnx.Rngs(0),
    )
  )  # fmt: skip
  assert layer.q_up.kernel.shape == (1536, 128 * 192)
  assert layer.kv_up.kernel.shape == (512, 128 * 256)
  cache = jax.eval_shape(lambda: layer.init_cache(1, 10, jnp.bfloat16))
  assert cache["latent"].shape == (1, 10, 512) and cache["k_rope"].shape == (1, 10, 64)
  assert sum(v.shape[-1] for v in cache.values()) == 576


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim=5 must be even"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0 must be a positive int"),
    (dict(q_lora_rank=-1), "q_lora_rank=-1 must be a positive int"),
    (dict(v_head_dim=2.0), "v_head_dim=2.0 must be a positive int"),
    (dict(norm_eps=0.0), "norm_eps=0.0 must be > 0"),
  ],
)
def test_rejects_bad_settings(overrides, match):
  q_lora_rank = overrides.pop("q_lora_rank", 7)
  with pytest.raises(ValueError, match=match):
    make(q_lora_rank, **overrides)
