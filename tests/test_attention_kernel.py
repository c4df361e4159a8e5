"""The attention kernels (`model.attention_kernel`) against a float64 NumPy loop, and against
each other inside the model.

Splash attention, the TPU kernel, runs here in the Pallas interpreter: the same kernel
program, block for block. The cuDNN path is `jax.nn.dot_product_attention` with its causal
flag and document mask; off GPU its call is checked with implementation='xla', which takes
the same arguments. What the TPU programs hold is in `tests/test_aot.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from helpers.small_models import MLA, VOCAB, dense_model_config
from moejax.layers import attention_kernel as kernels
from moejax.models.transformer import TransformerLM, validate_config
from moejax.parallel import sharding

pytestmark = pytest.mark.usefixtures("fast_compile_module")

BATCH, SEQ, HEADS, KV_HEADS, DIM, V_DIM = 2, 128, 4, 2, 16, 8


def documents(seed=0) -> np.ndarray:
  """`[BATCH, SEQ]` segment ids: documents of random lengths, then padding (segment 0)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(BATCH):
    lengths = rng.integers(5, 40, size=6)
    row = np.repeat(np.arange(1, 7), lengths)[: SEQ - 9]
    rows.append(np.concatenate([row, np.zeros(SEQ - len(row), int)]))
  return np.stack(rows).astype(np.int32)


def qkv(seed=1):
  rng = np.random.default_rng(seed)
  shapes = ((BATCH, SEQ, HEADS, DIM), (BATCH, SEQ, KV_HEADS, DIM), (BATCH, SEQ, KV_HEADS, V_DIM))
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def numpy_attention(q, k, v, segments, scale, cap=None) -> np.ndarray:
  """float64 loop: query t of head h sees keys j <= t of its segment (KV head h // group)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  out = np.zeros((*q.shape[:3], v.shape[-1]))
  for b in range(q.shape[0]):
    for t in range(q.shape[1]):
      seen = [j for j in range(t + 1) if segments is None or segments[b, j] == segments[b, t]]
      for h in range(q.shape[2]):
        scores = k[b, seen, h // group] @ q[b, t, h] * scale
        if cap:
          scores = cap * np.tanh(scores / cap)
        p = np.exp(scores - scores.max())
        out[b, t, h] = (p / p.sum()) @ v[b, seen, h // group]
  return out


def attend(kernel, q, k, v, segments, *, scale=None, cap=None, mesh=None):
  if kernel == "cudnn_call":  # the cuDNN path's call, run by XLA off GPU
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    return kernels._cudnn(q, k, v, segments, scale=scale, implementation="xla")
  positions = jnp.arange(q.shape[1])
  return kernels.causal_attention(
    q, k, v, positions=positions, segment_ids=segments, kernel=kernel, mesh=mesh, scale=scale,
    logit_cap=cap,
  )  # fmt: skip


@pytest.mark.parametrize("kernel", ["xla", "splash", "cudnn_call"])
@pytest.mark.parametrize("packed", [True, False])
def test_each_kernel_matches_the_numpy_loop(kernel, packed):
  """GQA (4 query heads on 2 KV heads), a value head narrower than the key's, documents and
  padding packed in each row (or one document per row)."""
  q, k, v = qkv()
  segments = jnp.asarray(documents()) if packed else None
  expected = numpy_attention(q, k, v, None if segments is None else documents(), DIM**-0.5)
  got = jax.jit(lambda q, k, v, s: attend(kernel, q, k, v, s))(q, k, v, segments)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel", ["xla", "splash"])
def test_soft_cap_and_scale_match_the_numpy_loop(kernel):
  """Grok-1's soft cap `c · tanh(s / c)` on the scaled scores, at a cap that bites (2), and a
  scale other than 1/sqrt(head_dim) (MLA's)."""
  q, k, v = qkv(seed=2)
  segments = documents(seed=3)
  expected = numpy_attention(3 * q, k, v, segments, 0.4, cap=2.0)
  got = attend(kernel, 3 * q, k, v, jnp.asarray(segments), scale=0.4, cap=2.0)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kernel", ["splash", "cudnn_call"])
def test_gradients_equal_the_einsums(kernel):
  """d(loss)/d(q, k, v) of each fused path equal those of the einsum, through documents."""
  q, k, v = qkv(seed=4)
  segments = jnp.asarray(documents(seed=5))
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(BATCH, SEQ, HEADS, V_DIM)))

  def grads(name):
    loss = lambda q, k, v: jnp.sum(attend(name, q, k, v, segments) * weights)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for got, expected in zip(grads(kernel), grads("xla"), strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_splash_on_a_mesh_runs_per_batch_shard():
  """On 8 devices (data 2 × expert 4) the kernel runs inside shard_map, one batch shard per
  device, and gives the one-device result."""
  mesh = sharding.make_mesh(ConfigDict(dict(data=2, fsdp=1, expert=4)), keep_order=True)
  q, k, v = (jnp.concatenate([a] * 4) for a in qkv(seed=7))  # batch 8
  segments = jnp.asarray(np.concatenate([documents(seed=8)] * 4))
  alone = attend("splash", q, k, v, segments)
  on_mesh = jax.jit(lambda q, k, v, s: attend("splash", q, k, v, s, mesh=mesh))(q, k, v, segments)
  np.testing.assert_allclose(on_mesh, alone, rtol=1e-6, atol=1e-6)
  text = jax.jit(lambda q, k, v, s: attend("splash", q, k, v, s, mesh=mesh)).lower(
    q, k, v, segments
  )
  assert "shard_map" in text.as_text() or "sdy.manual_computation" in text.as_text()


# ----------------------------------------------------------------------------- in the model


def packed_rows(seed=9):
  tokens = jax.random.randint(jax.random.key(seed), (BATCH, SEQ), 0, VOCAB, jnp.int32)
  segments = documents(seed=seed)
  positions = np.zeros_like(segments)
  for b in range(BATCH):
    for segment in np.unique(segments[b]):
      where = segments[b] == segment
      positions[b, where] = np.arange(where.sum())
  return tokens, jnp.asarray(segments), jnp.asarray(positions)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_the_model_gives_the_same_logits_with_splash(attention):
  """The same parameters, `attention_kernel` 'xla' and 'splash': equal logits on packed rows.
  ('xla' equals each document alone: `tests/test_document_masking.py`.)"""
  extra = MLA if attention == "mla" else {}
  logits = {}
  for kernel in ("xla", "splash"):
    config = dense_model_config(attention_kernel=kernel, **extra)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    tokens, segments, positions = packed_rows()
    logits[kernel], _ = nnx.jit(
      lambda m, t, s, p: m(t, segment_ids=s, positions=p)
    )(model, tokens, segments, positions)  # fmt: skip
  np.testing.assert_allclose(logits["splash"], logits["xla"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- choosing


@pytest.mark.parametrize(
  "platform, seq, dims, dtype, cap, expected",
  [
    ("tpu", 1024, (128,), jnp.bfloat16, None, "splash"),
    ("tpu", 1024, (192, 128), jnp.bfloat16, None, "splash"),  # MLA's heads
    ("tpu", 1000, (128,), jnp.bfloat16, None, "xla"),  # not a multiple of 128
    ("tpu", 1024, (128,), jnp.bfloat16, 30.0, "splash"),  # splash soft-caps
    ("gpu", 1000, (128,), jnp.bfloat16, None, "cudnn"),
    ("gpu", 1024, (128,), jnp.float32, None, "xla"),  # cuDNN flash: 16-bit only
    ("gpu", 1024, (192, 128), jnp.bfloat16, None, "xla"),  # head dim over 128
    ("gpu", 1024, (128,), jnp.bfloat16, 30.0, "xla"),  # no soft cap
    ("cpu", 1024, (128,), jnp.bfloat16, None, "xla"),
  ],
)
def test_auto_picks_the_platforms_kernel_where_it_fits(platform, seq, dims, dtype, cap, expected):
  got = kernels.kernel_for("auto", platform, seq=seq, head_dims=dims, dtype=dtype, logit_cap=cap)
  assert got == expected
  # An explicit choice is kept as asked.
  assert (
    kernels.kernel_for("xla", platform, seq=seq, head_dims=dims, dtype=dtype, logit_cap=cap)
    == "xla"
  )


def test_bad_kernel_settings_are_one_line():
  config = dense_model_config(attention_kernel="flash")
  with pytest.raises(ValueError, match=r"^config\.model\.attention_kernel must be one of"):
    validate_config(config)
  config = dense_model_config(attention_kernel="cudnn", attention_logit_cap=30.0)
  with pytest.raises(ValueError, match=r"^config\.model\.attention_kernel='cudnn' cannot soft-cap"):
    validate_config(config)
  q, k, v = (a[:, :100] for a in qkv())
  with pytest.raises(ValueError, match="needs seq_len a multiple of 128, got 100"):
    attend("splash", q, k, v, None)
