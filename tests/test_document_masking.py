"""Document masking for packed rows (Zhao et al. 2024, arXiv:2402.13991): `segment_ids` and
`positions` `[batch, seq]` make every document of a row compute what it computes alone.

The key test packs a document B between two others (A | B | C, segment ids 1, 2, 3,
positions restarting) and checks that B's logits equal those of B alone in a row, for GQA
and MLA, every dispatch form, and under expert parallelism on an 8-device mesh. The
attention layers are checked against NumPy references of the masked attention; calling
without segments is the model as it was (one document per row). Padding (segment 0) in
the MoE layers: it takes no capacity, counts in no balance statistic, gets a zero output,
and leaves the real tokens' logits and the model's MoE metrics as they are without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from helpers import family_reference as ref
from helpers.small_models import MLA, VOCAB, dense_model_config
from moejax.layers.attention import CausalSelfAttention, apply_rope
from moejax.layers.document_mask import self_attention_mask
from moejax.layers.mla import MultiHeadLatentAttention
from moejax.models.transformer import TransformerLM
from moejax.moe import MoeConfig, MoeLayer, balancing
from moejax.moe.dispatch import FORMS
from moejax.parallel import sharding

pytestmark = pytest.mark.usefixtures("fast_compile_module")

# 8 rows of 15 tokens; row r packs A (r + 1 tokens) | B (6 tokens) | C (8 - r tokens).
ROWS, SEQ, DOC = 8, 15, 6
TOL = dict(rtol=1e-5, atol=1e-5)


def moe_config(attention="gqa", dispatch="dropless", **overrides):
  """The 2-layer tiny model with 4 experts, top-2; capacity factor 4 makes every capacity the
  whole routing group (cf·S·k/E = 2S, capped at S), so no assignment is ever dropped."""
  return dense_model_config(
    **(MLA if attention == "mla" else {}),
    num_experts=4,
    top_k=2,
    dispatch=dispatch,
    capacity_factor=4.0,
    eval_capacity_factor=4.0,
    min_capacity=1,
    dropless_buffer_factor=8.0,  # no dropless row overflows a receive buffer on any mesh
    **overrides,
  )


def packed_batch(seed=0):
  """`(tokens, segment_ids, positions)` `[ROWS, SEQ]` of the A | B | C rows, and `alone`
  `[ROWS, DOC]`: each row's B by itself, and `b_start` `[ROWS]`, where B begins."""
  tokens = np.asarray(jax.random.randint(jax.random.key(seed), (ROWS, SEQ), 0, VOCAB, jnp.int32))
  segment_ids, positions, b_start = [], [], []
  for r in range(ROWS):
    lengths = (r + 1, DOC, SEQ - DOC - r - 1)
    segment_ids.append(np.repeat([1, 2, 3], lengths))
    positions.append(np.concatenate([np.arange(n) for n in lengths]))
    b_start.append(r + 1)
  alone = np.stack([tokens[r, s : s + DOC] for r, s in enumerate(b_start)])
  as_int = lambda a: jnp.asarray(np.asarray(a), jnp.int32)
  return as_int(tokens), as_int(segment_ids), as_int(positions), as_int(alone), b_start


@nnx.jit
def packed_and_alone(model, tokens, segment_ids, positions, alone):
  packed_logits, packed_aux = model(tokens, segment_ids=segment_ids, positions=positions)
  alone_logits, alone_aux = model(alone)
  return packed_logits, packed_aux["dropped_fraction"], alone_logits, alone_aux["dropped_fraction"]


def check_packed_document_matches_alone(model):
  tokens, segment_ids, positions, alone, b_start = packed_batch()
  model.eval()
  packed, packed_dropped, single, single_dropped = packed_and_alone(
    model, tokens, segment_ids, positions, alone
  )
  assert float(packed_dropped) == float(single_dropped) == 0.0
  got = np.stack([np.asarray(packed)[r, s : s + DOC] for r, s in enumerate(b_start)])
  np.testing.assert_allclose(got, single, **TOL)
  # Without the segments B would see A: the test would notice.
  unmasked, _ = model(tokens)
  assert not np.allclose(np.asarray(unmasked)[0, 1 : 1 + DOC], single[0], **TOL)


# ----------------------------------------------------------------------------- the key test


@pytest.mark.parametrize("dispatch", sorted(FORMS))
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_packed_document_gives_the_logits_of_the_document_alone(attention, dispatch):
  # GQA runs the layers as a scanned loop, MLA unrolled with a first dense layer (2 stacks).
  layout = {} if attention == "gqa" else dict(scan_layers=False, num_layers=3, first_dense_layers=1)
  model = TransformerLM(moe_config(attention, dispatch, **layout), rngs=nnx.Rngs(0))
  check_packed_document_matches_alone(model)


def expert_parallel_mesh():
  """8 simulated devices: 2-way data parallel, 4-way expert parallel (4 experts, one each)."""
  assert len(jax.devices()) == 8
  return sharding.make_mesh(ConfigDict(dict(data=2, fsdp=1, expert=4)), keep_order=True)


@pytest.mark.parametrize("dispatch", sorted(FORMS))
def test_packed_document_matches_alone_under_expert_parallelism(dispatch):
  mesh = expert_parallel_mesh()
  model = TransformerLM(moe_config("gqa", dispatch), mesh=mesh, rngs=nnx.Rngs(0))
  check_packed_document_matches_alone(model)


# ----------------------------------------------------------------------------- attention

# Two rows of 7: documents 1 | 2 | padding, and 3 | 4 | padding; positions restart at each
# segment (padding's too).
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 3, 4, 4, 4, 4, 0]], np.int32)


def restarting_positions(segment_ids):
  """Each token's index within its run of equal segment ids."""
  positions = np.zeros_like(segment_ids)
  for b, row in enumerate(segment_ids):
    for t in range(1, len(row)):
      positions[b, t] = positions[b, t - 1] + 1 if row[t] == row[t - 1] else 0
  return positions


def runs(row):
  """`(start, end)` of each run of equal values in `row`."""
  edges = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
  return list(zip(edges[:-1], edges[1:], strict=True))


def test_mask_is_causal_and_same_segment():
  mask = np.asarray(self_attention_mask(jnp.asarray(restarting_positions(SEGMENTS)), SEGMENTS))
  batch, seq = SEGMENTS.shape
  for b in range(batch):
    for q in range(seq):
      for k in range(seq):
        assert mask[b, q, k] == (k <= q and SEGMENTS[b, q] == SEGMENTS[b, k])
  one_row = np.asarray(self_attention_mask(jnp.arange(seq)))  # no segments: causal, [q, kv]
  np.testing.assert_array_equal(one_row, np.tril(np.ones((seq, seq), bool)))


def test_rope_takes_one_row_of_positions_per_row():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 3, 8)), jnp.float32)
  positions = jnp.asarray(restarting_positions(SEGMENTS))
  per_row = [apply_rope(x[b : b + 1], positions[b], 100.0) for b in range(2)]
  np.testing.assert_array_equal(apply_rope(x, positions, 100.0), jnp.concatenate(per_row))


def numpy_rope(v, position, base):
  """Rotate-half RoPE of `v` `[..., D]` at one position, float64."""
  half = v.shape[-1] // 2
  angle = position * base ** (-np.arange(half) / half)
  v1, v2 = v[..., :half], v[..., half:]
  return np.concatenate(
    [v1 * np.cos(angle) - v2 * np.sin(angle), v2 * np.cos(angle) + v1 * np.sin(angle)], -1
  )


def test_gqa_layer_matches_numpy_masked_attention():
  """CausalSelfAttention (4 query heads on 2 KV heads) against float64 NumPy loops: scores of
  RoPE'd queries and keys, masked to causal & same segment, softmax, values, output."""
  heads, kv_heads, dim, base = 4, 2, 8, 100.0
  layer = CausalSelfAttention(
    16, heads, kv_heads, dim, rope_base=base, dtype=jnp.float32, rngs=nnx.Rngs(0)
  )
  x = np.random.default_rng(1).normal(size=(2, 7, 16))
  positions = restarting_positions(SEGMENTS)
  out, cache = layer(
    jnp.asarray(x, jnp.float32), jnp.asarray(positions), segment_ids=jnp.asarray(SEGMENTS)
  )
  assert cache is None
  w = {
    n: np.asarray(getattr(layer, n).kernel[...], np.float64)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj")
  }
  expected = np.zeros_like(x)
  for b in range(2):
    q = (x[b] @ w["q_proj"]).reshape(7, heads, dim)
    k = (x[b] @ w["k_proj"]).reshape(7, kv_heads, dim)
    v = (x[b] @ w["v_proj"]).reshape(7, kv_heads, dim)
    q = np.stack([numpy_rope(q[t], positions[b, t], base) for t in range(7)])
    k = np.stack([numpy_rope(k[t], positions[b, t], base) for t in range(7)])
    heads_out = np.zeros((7, heads, dim))
    for t in range(7):
      seen = [j for j in range(t + 1) if SEGMENTS[b, j] == SEGMENTS[b, t]]
      for h in range(heads):
        scores = np.array([q[t, h] @ k[j, h // (heads // kv_heads)] for j in seen]) / np.sqrt(dim)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        heads_out[t, h] = sum(
          pj * v[j, h // (heads // kv_heads)] for pj, j in zip(p, seen, strict=True)
        )
    expected[b] = heads_out.reshape(7, heads * dim) @ w["o_proj"]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_mla_layer_matches_the_reference_document_by_document():
  """A packed MLA layer gives, on every segment (padding too), the float64 reference
  (`family_reference.mla`, DeepSeek-V2 §2.1) of that segment alone at positions 0.."""
  dims = dict(kv_lora_rank=5, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=3)
  layer = MultiHeadLatentAttention(16, 3, q_lora_rank=7, rope_base=100.0, **dims, rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(2, 7, 16))
  positions = restarting_positions(SEGMENTS)
  out, _ = layer(
    jnp.asarray(x, jnp.float32), jnp.asarray(positions), segment_ids=jnp.asarray(SEGMENTS)
  )
  get = lambda module, name="kernel": np.asarray(getattr(module, name)[...], np.float64)
  params = dict(
    q_down=get(layer.q_down), q_norm=get(layer.q_norm, "scale"), q_up=get(layer.q_up),
    kv_down=get(layer.kv_down), kv_norm=get(layer.kv_norm, "scale"), kv_up=get(layer.kv_up),
    k_rope=get(layer.k_rope), o=get(layer.o_proj),
  )  # fmt: skip
  for b in range(2):
    for start, end in runs(SEGMENTS[b]):
      expected = ref.mla(
        x[b : b + 1, start:end],
        params,
        num_heads=3,
        qk_nope_head_dim=4,
        qk_rope_head_dim=6,
        v_head_dim=3,
        rope_base=100.0,
        eps=1e-6,
      )
      np.testing.assert_allclose(out[b : b + 1, start:end], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the model


def test_without_segments_each_row_is_one_document():
  """segment_ids=positions=None is one document per row at start + arange(seq): the same
  logits and MoE metrics as segments of ones with those positions given."""
  model = TransformerLM(moe_config("gqa", "sort"), rngs=nnx.Rngs(0))
  model.eval()
  tokens = packed_batch()[0][:2]
  ones = jnp.ones(tokens.shape, jnp.int32)
  arange = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), tokens.shape)

  @nnx.jit
  def both(model, tokens):
    return model(tokens), model(tokens, segment_ids=ones, positions=arange)

  (plain, plain_aux), (packed, packed_aux) = both(model, tokens)
  np.testing.assert_allclose(packed, plain, rtol=1e-6, atol=1e-6)
  for name in ("lb_loss", "z_loss", "seq_aux_loss", "dropped_fraction", "expert_load"):
    np.testing.assert_allclose(packed_aux[name], plain_aux[name], rtol=1e-6, atol=1e-7)


def test_packing_argument_errors():
  model = TransformerLM(dense_model_config(), rngs=nnx.Rngs(0))
  tokens = jnp.zeros((2, 4), jnp.int32)
  ones = jnp.ones((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="positions is missing"):
    model(tokens, segment_ids=ones)
  with pytest.raises(ValueError, match="segment_ids is missing"):
    model(tokens, positions=ones)
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\]"):
    model(tokens, segment_ids=ones[:, :3], positions=ones)
  with pytest.raises(ValueError, match="start=2 must be 0"):
    model(tokens, segment_ids=ones, positions=ones, start=2)
  with pytest.raises(ValueError, match="decode without them"):
    model(tokens, segment_ids=ones, positions=ones, cache=model.init_cache(2, 8))
  layer = model.layer(0).attention
  with pytest.raises(ValueError, match="KV cache takes positions"):
    layer(jnp.zeros((2, 4, 32)), ones, layer.init_cache(2, 8, jnp.float32))


# ----------------------------------------------------------------------------- padding in MoE

REAL, PAD = 10, 5  # 8 rows of 10 real tokens and 5 padding: even rows end with it, odd start


def padded_batch(seed=3):
  """`(tokens, segment_ids, positions)` `[ROWS, REAL + PAD]`, `plain` `[ROWS, REAL]` (the
  real tokens alone) and `is_real` `[ROWS, REAL + PAD]` bool."""
  keys = jax.random.split(jax.random.key(seed))
  plain = np.asarray(jax.random.randint(keys[0], (ROWS, REAL), 0, VOCAB, jnp.int32))
  tokens = np.array(jax.random.randint(keys[1], (ROWS, REAL + PAD), 0, VOCAB, jnp.int32))
  is_real = np.zeros(tokens.shape, bool)
  positions = np.zeros(tokens.shape, np.int32)
  for r in range(ROWS):
    where = slice(0, REAL) if r % 2 == 0 else slice(PAD, PAD + REAL)
    tokens[r, where], is_real[r, where], positions[r, where] = plain[r], True, np.arange(REAL)
  as_int = lambda a: jnp.asarray(a, jnp.int32)
  return as_int(tokens), as_int(is_real), as_int(positions), as_int(plain), is_real


@nnx.jit
def padded_and_plain(model, tokens, segment_ids, positions, plain):
  return model(tokens, segment_ids=segment_ids, positions=positions), model(plain)


@pytest.mark.parametrize(
  "dispatch,on_mesh",
  [(d, False) for d in sorted(FORMS)] + [("dropless", True), ("sort", True)],
  ids=lambda v: {True: "mesh", False: "one-device"}.get(v, v),
)
def test_padding_changes_nothing_for_the_real_tokens(dispatch, on_mesh):
  """A row with padding (segment 0) gives its real tokens the logits, and the model the
  balance losses and expert loads, of the rows without it; padding takes no expert."""
  mesh = expert_parallel_mesh() if on_mesh else None
  model = TransformerLM(moe_config("gqa", dispatch), mesh=mesh, rngs=nnx.Rngs(0))
  model.eval()
  tokens, segment_ids, positions, plain, is_real = padded_batch()
  (logits, aux), (plain_logits, plain_aux) = padded_and_plain(
    model, tokens, segment_ids, positions, plain
  )
  np.testing.assert_allclose(
    np.asarray(logits)[is_real], np.asarray(plain_logits).reshape(-1, VOCAB), **TOL
  )
  assert np.all(np.isfinite(logits))  # padding's logits too
  assert float(aux["dropped_fraction"]) == float(plain_aux["dropped_fraction"]) == 0.0
  for name in ("lb_loss", "z_loss", "seq_aux_loss"):
    np.testing.assert_allclose(aux[name], plain_aux[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(aux["expert_load"], plain_aux["expert_load"], atol=1e-6)
  for routing in aux["routing"]:
    kept = np.asarray(routing["kept"]).reshape(ROWS, REAL + PAD, -1)
    assert not kept[~is_real].any() and kept[is_real].all()


@pytest.mark.parametrize(
  "router,dispatch",
  [
    ("top_k", "einsum"),
    ("top_k", "sort"),
    ("top_k", "dropless"),
    ("expert_choice", "sort"),
    ("expert_choice", "einsum"),
  ],
)
def test_padding_gets_no_capacity_and_a_zero_output(router, dispatch):
  """The layer with a shared expert and capacity factor 0.5 (real tokens dropped): padding's
  output is exactly zero, and what padding holds changes nothing else, although it comes
  first in its row and would take capacity (top-k: token order) or be chosen (expert
  choice: the largest router probabilities) were it not masked."""
  config = MoeConfig(
    num_experts=4, d_ff=12, top_k=2, router=router, dispatch=dispatch, num_shared_experts=1,
    eval_capacity_factor=0.5, min_capacity=1,
  )  # fmt: skip
  layer = MoeLayer(config, d_model=8, rngs=nnx.Rngs(0))
  layer.router_kernel[...] = jax.random.normal(jax.random.key(7), layer.router_kernel.shape)
  layer.eval()
  x = jax.random.normal(jax.random.key(0), (2, 10, 8))
  mask = np.ones((2, 10), bool)
  mask[0, 6:] = mask[1, :4] = False
  other = jnp.where(mask[..., None], x, 50.0 * x + 3.0)  # other padding, and loud
  run = nnx.jit(lambda layer, x, m: layer(x, token_mask=m))
  (y, aux), (y_other, aux_other) = run(layer, x, mask), run(layer, other, mask)
  assert np.all(np.asarray(y)[~mask] == 0.0) and np.all(np.asarray(y_other)[~mask] == 0.0)
  np.testing.assert_allclose(y_other, y, rtol=1e-6, atol=1e-6)
  for name in ("lb_loss", "z_loss", "seq_aux_loss", "dropped_fraction", "expert_load"):
    np.testing.assert_allclose(aux_other[name], aux[name], rtol=1e-6, err_msg=name)
  if router == "expert_choice":
    picked = np.asarray(aux["routing"]["token_indices"])  # [groups = rows, E, C]
    taken = np.zeros((2, 11), bool)
    for g in range(2):
      taken[g, picked[g].reshape(-1)] = True
    assert not taken[:, :10][~mask].any()
    np.testing.assert_allclose(aux["dropped_fraction"], 1.0 - taken[:, :10][mask].mean(), rtol=1e-6)
  else:
    kept = np.asarray(aux["routing"]["kept"]).reshape(2, 10, -1)
    assert not kept[~mask].any()
    assert kept[mask].all() if dispatch == "dropless" else 0 < kept[mask].mean() < 1
    np.testing.assert_allclose(aux["dropped_fraction"], 1.0 - kept[mask].mean(), rtol=1e-6)


def test_balance_statistics_count_real_tokens_only():
  """The masked LB loss ('call' and 'group' pooling), z-loss and sequence loss are the
  unmasked ones of the real tokens alone; a group or sequence of padding only is left out."""
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)  # 3 groups (sequences) of 6
  probs = jax.nn.softmax(logits)
  indices = jax.lax.top_k(logits, 2)[1]
  mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]], bool)
  rows = [g for g in range(3) if mask[g].any()]
  lb = balancing.pooled_load_balancing_loss(probs, indices, 4, "call", jnp.asarray(mask))
  np.testing.assert_allclose(
    lb, balancing.load_balancing_loss(probs[mask], indices[mask], 4), rtol=1e-6
  )
  per_group = [
    balancing.load_balancing_loss(probs[g][mask[g]], indices[g][mask[g]], 4) for g in rows
  ]
  lb_group = balancing.pooled_load_balancing_loss(probs, indices, 4, "group", jnp.asarray(mask))
  np.testing.assert_allclose(lb_group, np.mean(per_group), rtol=1e-6)
  z = balancing.router_z_loss(logits, jnp.asarray(mask))
  np.testing.assert_allclose(z, balancing.router_z_loss(logits[mask]), rtol=1e-6)
  per_row = [
    balancing.sequence_aux_loss(probs[g][None, mask[g]], indices[g][None, mask[g]], 4) for g in rows
  ]
  seq = balancing.sequence_aux_loss(probs, indices, 4, jnp.asarray(mask))
  np.testing.assert_allclose(seq, np.mean(per_row), rtol=1e-6)
