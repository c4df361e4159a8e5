"""The family router options (DeepSeek-V2/V3, Qwen2/3-MoE, Llama 4) against the NumPy
references of `family_reference.py`: values and gradients, plus properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import family_reference as ref
from moejax.moe import balancing, routing


def numeric_grad(f, x, eps=1e-6):
  """Central differences of a float64 scalar function; NaN where `f` raises `Skip` (a
  perturbation that flips a discrete choice)."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += eps
    down[i] -= eps
    try:
      grad[i] = (f(up) - f(down)) / (2 * eps)
    except Skip:
      grad[i] = np.nan
  return grad


class Skip(Exception):
  pass


def _logits(seed, shape, scale=1.0):
  """float32-representable logits, so that the float64 reference sees the same numbers."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------- scores, logits


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_router_scores_values_and_gradients(score_fn):
  logits = _logits(0, (5, 6), 2.0)
  weights = np.random.default_rng(1).normal(size=(5, 6))
  got = routing.router_scores(jnp.asarray(logits, jnp.float32), score_fn)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), ref.scores_of(logits, score_fn), rtol=1e-6)
  grad = jax.grad(lambda l: jnp.sum(routing.router_scores(l, score_fn) * weights))(
    jnp.asarray(logits, jnp.float32)
  )
  expected = numeric_grad(lambda l: np.sum(ref.scores_of(l, score_fn) * weights), logits)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-6)


def test_router_scores_rejects_unknown_score_fn():
  with pytest.raises(ValueError, match="score_fn='tanh'"):
    routing.router_scores(jnp.zeros((2, 3)), "tanh")


def test_router_logits_with_bias():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  kernel = rng.normal(size=(4, 5)).astype(np.float32)
  bias = rng.normal(size=5).astype(np.float32)
  upstream = rng.normal(size=(2, 3, 5))
  got = routing.router_logits(jnp.asarray(x), jnp.asarray(kernel), bias=jnp.asarray(bias))
  np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ kernel + bias, rtol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(routing.router_logits(jnp.asarray(x), jnp.asarray(kernel))),
    np.asarray(routing.router_logits(jnp.asarray(x), jnp.asarray(kernel), bias=None)),
  )

  def loss(kernel, bias):
    return jnp.sum(routing.router_logits(jnp.asarray(x), kernel, bias=bias) * upstream)

  g_kernel, g_bias = jax.grad(loss, argnums=(0, 1))(jnp.asarray(kernel), jnp.asarray(bias))
  # d/db Σ c·(xW + b) = Σ_tokens c; d/dW = xᵀ c.
  np.testing.assert_allclose(np.asarray(g_bias), upstream.sum((0, 1)), rtol=1e-5)
  expected_kernel = np.einsum("bti,bto->io", x.astype(np.float64), upstream)
  np.testing.assert_allclose(np.asarray(g_kernel), expected_kernel, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- token choice


@st.composite
def routings(draw):
  num_groups = draw(st.sampled_from([1, 2, 4]))
  per_group = draw(st.integers(1, 4))
  topk_groups = draw(st.integers(1, num_groups))
  k = draw(st.integers(1, topk_groups * per_group))
  return dict(
    tokens=4,  # one token count: each new shape costs a compilation
    num_groups=num_groups,
    per_group=per_group,
    topk_groups=topk_groups,
    group_top=draw(st.sampled_from(sorted({1, min(2, per_group)}))),
    k=k,
    score_fn=draw(st.sampled_from(["softmax", "sigmoid"])),
    use_bias=draw(st.booleans()),
    normalize=draw(st.booleans()),
    scale=draw(st.sampled_from([1.0, 2.5, 16.0])),
    seed=draw(st.integers(0, 2**16)),
  )


def _setting(r):
  num_experts = r["num_groups"] * r["per_group"]
  logits = _logits(r["seed"], (r["tokens"], num_experts), 1.5)
  bias = _logits(r["seed"] + 1, (num_experts,), 0.3) if r["use_bias"] else None
  return num_experts, logits, bias


def _choose(r, scores, bias):
  return routing.token_choice(
    jnp.asarray(scores, jnp.float32),
    r["k"],
    selection_bias=None if bias is None else jnp.asarray(bias, jnp.float32),
    num_expert_groups=r["num_groups"],
    topk_groups=r["topk_groups"],
    group_score_top=r["group_top"],
    normalize=r["normalize"],
    routed_scaling_factor=r["scale"],
  )


def _reference_route(r, scores, bias):
  return [
    ref.route_token(
      s,
      r["k"],
      bias=None if bias is None else list(bias),
      num_groups=r["num_groups"],
      topk_groups=r["topk_groups"],
      group_top=r["group_top"],
      normalize=r["normalize"],
      scale=r["scale"],
    )
    for s in scores
  ]


@settings(max_examples=40, deadline=None)
@given(r=routings())
def test_token_choice_matches_reference(r):
  num_experts, logits, bias = _setting(r)
  scores = ref.scores_of(logits, r["score_fn"])
  got = _choose(r, routing.router_scores(jnp.asarray(logits, jnp.float32), r["score_fn"]), bias)
  for t, (chosen, gates) in enumerate(_reference_route(r, scores, bias)):
    np.testing.assert_array_equal(np.asarray(got.expert_indices[t]), chosen)
    np.testing.assert_allclose(np.asarray(got.gates[t]), gates, rtol=2e-6)
  assert got.expert_indices.dtype == jnp.int32 and bool(jnp.all(got.valid))


@settings(max_examples=15, deadline=None)
@given(r=routings())
def test_token_choice_gradients_match_reference(r):
  """d(Σ gates · w)/d(logits) through the scores (the selection and the bias carry none)."""
  num_experts, logits, bias = _setting(r)
  weights = np.random.default_rng(r["seed"] + 2).normal(size=(r["tokens"], r["k"]))
  base = [c for c, _ in _reference_route(r, ref.scores_of(logits, r["score_fn"]), bias)]

  def reference_loss(l):
    routed = _reference_route(r, ref.scores_of(l, r["score_fn"]), bias)
    if [c for c, _ in routed] != base:
      raise Skip  # the perturbation changed the selection
    return sum(np.dot(g, w) for (_, g), w in zip(routed, weights, strict=True))

  def loss(l, b):
    return jnp.sum(_choose(r, routing.router_scores(l, r["score_fn"]), b).gates * weights)

  bias32 = jnp.zeros(num_experts) if bias is None else jnp.asarray(bias, jnp.float32)
  g_logits, g_bias = jax.grad(loss, argnums=(0, 1))(jnp.asarray(logits, jnp.float32), bias32)
  expected = numeric_grad(reference_loss, logits)
  known = ~np.isnan(expected)
  np.testing.assert_allclose(np.asarray(g_logits)[known], expected[known], rtol=1e-3, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(g_bias), 0.0)


@settings(max_examples=25, deadline=None)
@given(r=routings())
def test_token_choice_properties(r):
  num_experts, logits, bias = _setting(r)
  scores = routing.router_scores(jnp.asarray(logits, jnp.float32), r["score_fn"])
  got = _choose(r, scores, bias)
  indices = np.asarray(got.expert_indices)
  per_group = r["per_group"]
  for t in range(r["tokens"]):
    assert len(set(indices[t])) == r["k"]  # distinct experts
    assert len(set(indices[t] // per_group)) <= r["topk_groups"]  # within the kept groups
  # Gates are the unbiased scores of the chosen experts, rescaled the same way per token.
  raw = np.take_along_axis(np.asarray(scores), indices, -1)
  if r["normalize"]:
    np.testing.assert_allclose(np.asarray(got.gates).sum(-1), r["scale"], rtol=1e-5)
    raw = raw / raw.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got.gates), raw * r["scale"], rtol=1e-5)
  # Keeping every group is no limit; no bias and no group limit is plain top-k.
  all_groups = routing.token_choice(
    scores, r["k"], selection_bias=None if bias is None else jnp.asarray(bias, jnp.float32),
    num_expert_groups=r["num_groups"], topk_groups=r["num_groups"],
    group_score_top=r["group_top"],
  )  # fmt: skip
  plain = routing.token_choice(
    scores, r["k"], selection_bias=None if bias is None else jnp.asarray(bias, jnp.float32)
  )
  np.testing.assert_array_equal(np.asarray(all_groups.expert_indices), plain.expert_indices)
  if bias is None:
    top = jax.lax.top_k(scores, r["k"])[1]
    np.testing.assert_array_equal(np.asarray(plain.expert_indices), np.asarray(top))


def test_token_choice_works_under_vmap_over_groups():
  logits = _logits(3, (3, 5, 8))
  scores = routing.router_scores(jnp.asarray(logits, jnp.float32), "sigmoid")
  bias = jnp.asarray(_logits(4, (8,), 0.1), jnp.float32)

  def route(s):
    return routing.token_choice(
      s, 2, selection_bias=bias, num_expert_groups=4, topk_groups=2, normalize=True,
      routed_scaling_factor=2.5,
    )  # fmt: skip

  batched = jax.vmap(route)(scores)
  flat = route(scores.reshape(15, 8))
  np.testing.assert_array_equal(
    np.asarray(batched.expert_indices).reshape(15, 2), flat.expert_indices
  )
  np.testing.assert_allclose(np.asarray(batched.gates).reshape(15, 2), flat.gates, rtol=1e-6)


def test_top_k_choice_is_token_choice():
  probs = jnp.asarray(ref.scores_of(_logits(5, (7, 6)), "softmax"), jnp.float32)
  for renormalize in (False, True):
    old = routing.top_k_choice(probs, 3, renormalize=renormalize)
    new = routing.token_choice(probs, 3, normalize=renormalize)
    np.testing.assert_array_equal(old.expert_indices, new.expert_indices)
    np.testing.assert_array_equal(old.gates, new.gates)


def test_group_limited_mask_by_hand():
  scores = jnp.array([[0.9, 0.1, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4]])
  np.testing.assert_array_equal(
    routing.group_limited_mask(scores, 2, 1),
    [[False, False, True, True], [False, False, True, True]],
  )
  np.testing.assert_array_equal(
    routing.group_limited_mask(scores, 2, 1, group_score_top=1)[0], [True, True, False, False]
  )
  np.testing.assert_array_equal(routing.group_limited_mask(scores, 2, 2), np.ones((2, 4), bool))


def test_masked_groups_lose_to_negative_biased_scores():
  """A kept group's expert whose biased score s + b is negative still beats every expert of
  a masked group. (HF transformers' DeepSeek-V3 router fills masked scores with 0.0, which
  would pick expert 2 here; DeepSeek's own code and this one exclude them, -inf.)"""
  scores = jnp.array([[0.9, 0.3, 0.3, 0.3]])
  bias = jnp.array([0.0, -0.5, 0.0, 0.0])  # u = [0.9, -0.2, 0.3, 0.3]; group sums 0.7, 0.6
  choice = routing.token_choice(scores, 2, selection_bias=bias, num_expert_groups=2, topk_groups=1)
  np.testing.assert_array_equal(choice.expert_indices, [[0, 1]])
  np.testing.assert_allclose(choice.gates, [[0.9, 0.3]])
  assert ref.route_token(
    [0.9, 0.3, 0.3, 0.3], 2, bias=[0, -0.5, 0, 0], num_groups=2, topk_groups=1
  ) == (
    [0, 1],
    [0.9, 0.3],
  )


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(num_expert_groups=3, topk_groups=1), "num_expert_groups=3 must divide num_experts=8"),
    (dict(num_expert_groups=4, topk_groups=5), "topk_groups=5"),
    (dict(num_expert_groups=4, topk_groups=0), "topk_groups=0"),
    (dict(num_expert_groups=4, topk_groups=1), "top_k=3 exceeds the 2 experts"),
    (dict(num_expert_groups=8, topk_groups=4), "group_score_top=2"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0"),
    (dict(selection_bias=jnp.zeros(7)), "selection_bias must have shape"),
  ],
)
def test_token_choice_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    routing.token_choice(jnp.ones((2, 8)) / 8, 3, **kwargs)


def test_llama4_routing_is_top1_sigmoid_without_normalisation():
  """Llama 4 (HF `Llama4Router`): top-1 by logit, gate σ(top logit). The options express it:
  score_fn='sigmoid', top_k=1, no normalisation, scaling 1 (σ is monotone, so the top score
  is the top logit's). Normalising would make every gate 1."""
  logits = _logits(6, (9, 16), 2.0)
  choice = routing.token_choice(
    routing.router_scores(jnp.asarray(logits, jnp.float32), "sigmoid"), 1
  )
  np.testing.assert_array_equal(np.asarray(choice.expert_indices[:, 0]), logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(choice.gates[:, 0]), ref.sigmoid(logits.max(-1)), rtol=1e-6)
  normalised = routing.token_choice(
    routing.router_scores(jnp.asarray(logits, jnp.float32), "sigmoid"), 1, normalize=True
  )
  np.testing.assert_allclose(np.asarray(normalised.gates), 1.0)


# ----------------------------------------------------------------------------- bias balancing


@settings(max_examples=30, deadline=None)
@given(
  num_experts=st.sampled_from([1, 5, 12]),
  rate=st.sampled_from([0.0, 1e-3, 0.1]),
  seed=st.integers(0, 2**16),
)
def test_update_selection_bias_matches_reference(num_experts, rate, seed):
  rng = np.random.default_rng(seed)
  bias = rng.normal(size=num_experts).astype(np.float32)
  counts = rng.integers(0, 5, size=num_experts).astype(np.float32)
  got = balancing.update_selection_bias(jnp.asarray(bias), jnp.asarray(counts), rate)
  expected = ref.update_bias(bias.astype(np.float64), counts, rate)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7)
  assert np.all(np.abs(np.asarray(got) - bias) <= rate + 1e-6)  # float32 rounding
  # Only the signs of c̄ - c_i matter: scaled counts (0.25, exact in float32) give the same.
  scaled = balancing.update_selection_bias(jnp.asarray(bias), jnp.asarray(counts * 0.25), rate)
  np.testing.assert_array_equal(np.asarray(scaled), np.asarray(got))
  # No gradient flows through the update.
  grad = jax.grad(
    lambda b, c: jnp.sum(balancing.update_selection_bias(b, c, rate) ** 2), argnums=(0, 1)
  )(jnp.asarray(bias), jnp.asarray(counts))
  assert not np.any(np.asarray(grad[0])) and not np.any(np.asarray(grad[1]))


def test_update_selection_bias_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="must both have shape"):
    balancing.update_selection_bias(jnp.zeros(4), jnp.zeros(5), 0.1)


def test_expert_counts():
  indices = jnp.array([[0, 2], [2, 3], [2, 0]])
  np.testing.assert_array_equal(balancing.expert_counts(indices, 5), [2, 0, 3, 1, 0])
  valid = jnp.array([[True, False], [True, True], [False, True]])
  np.testing.assert_array_equal(balancing.expert_counts(indices, 5, valid), [2, 0, 1, 1, 0])


def test_bias_updates_balance_a_skewed_router():
  """Aux-loss-free balancing (Wang et al. 2024) drives a router that prefers a few experts
  towards balance without touching its scores: max load / mean load falls a lot."""
  tokens, num_experts, k = 512, 8, 2
  logits = _logits(7, (tokens, num_experts)) + np.linspace(2.0, -2.0, num_experts)
  scores = routing.router_scores(jnp.asarray(logits, jnp.float32), "sigmoid")

  def imbalance(bias):
    choice = routing.token_choice(scores, k, selection_bias=bias, normalize=True)
    counts = balancing.expert_counts(choice.expert_indices, num_experts)
    return float(jnp.max(counts) / jnp.mean(counts)), counts

  bias = jnp.zeros(num_experts)
  before, counts = imbalance(bias)
  for _ in range(300):
    bias = balancing.update_selection_bias(bias, counts, 0.01)
    after, counts = imbalance(bias)
  assert before > 2.5
  assert after < 1.25


# ----------------------------------------------------------------------------- balance losses


# (batch or groups, seq or group size, experts, k): a few shapes, each compiled once.
SHAPES = [(1, 5, 4, 1), (3, 4, 6, 2), (2, 6, 5, 3)]


@settings(max_examples=15, deadline=None)
@given(
  shape=st.sampled_from(SHAPES),
  score_fn=st.sampled_from(["softmax", "sigmoid"]),
  seed=st.integers(0, 2**16),
)
def test_sequence_aux_loss_matches_reference(shape, score_fn, seed):
  batch, seq, num_experts, k = shape
  logits = _logits(seed, (batch, seq, num_experts), 1.5)
  scores = ref.scores_of(logits, score_fn)
  indices = np.argsort(-scores, -1, kind="stable")[..., :k]
  got = balancing.sequence_aux_loss(
    routing.router_scores(jnp.asarray(logits, jnp.float32), score_fn),
    jnp.asarray(indices),
    num_experts,
  )
  expected = ref.sequence_aux_loss(scores, indices, num_experts)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  grad = jax.grad(
    lambda l: balancing.sequence_aux_loss(routing.router_scores(l, score_fn), indices, num_experts)
  )(jnp.asarray(logits, jnp.float32))
  expected_grad = numeric_grad(
    lambda l: ref.sequence_aux_loss(ref.scores_of(l, score_fn), indices, num_experts), logits
  )
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-3, atol=1e-5)


def test_sequence_aux_loss_is_one_when_uniform_and_per_sequence():
  num_experts, seq = 4, 8
  indices = (np.arange(seq)[:, None] + np.arange(2)[None]) % num_experts  # balanced, k=2
  uniform = jnp.full((3, seq, num_experts), 0.3)
  loss = balancing.sequence_aux_loss(uniform, jnp.asarray(np.stack([indices] * 3)), num_experts)
  assert float(loss) == pytest.approx(1.0, rel=1e-6)
  # Each sequence balanced on its own is not the same as the batch balanced: two
  # sequences each collapsed on a different expert give a balanced batch but a high loss.
  scores = jnp.asarray([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4])
  collapsed = jnp.asarray([[[0]] * 4, [[1]] * 4])
  assert float(balancing.sequence_aux_loss(scores, collapsed, 2)) == pytest.approx(1.8, rel=1e-6)
  flat_probs = scores.reshape(8, 2) / scores.reshape(8, 2).sum(-1, keepdims=True)
  assert float(
    balancing.load_balancing_loss(flat_probs, collapsed.reshape(8, 1), 2)
  ) == pytest.approx(1.0)


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_pooled_load_balancing_losses_match_reference(shape, seed):
  groups, group_size, num_experts, k = shape
  logits = _logits(seed, (groups, group_size, num_experts), 1.5)
  probs = ref.scores_of(logits, "softmax")
  indices = np.argsort(-probs, -1, kind="stable")[..., :k]
  cases = {
    "call": lambda p: ref.switch_lb(p, indices, num_experts),
    "group": lambda p: ref.group_lb(p, indices, num_experts),
  }
  for pooling, reference in cases.items():

    def loss(l, pooling=pooling):
      return balancing.pooled_load_balancing_loss(
        jax.nn.softmax(l), jnp.asarray(indices), num_experts, pooling
      )

    l32 = jnp.asarray(logits, jnp.float32)
    np.testing.assert_allclose(float(loss(l32)), reference(probs), rtol=1e-5, err_msg=pooling)
    expected_grad = numeric_grad(
      lambda l, reference=reference: reference(ref.scores_of(l, "softmax")), logits
    )
    np.testing.assert_allclose(
      np.asarray(jax.grad(loss)(l32)), expected_grad, rtol=1e-3, atol=1e-5, err_msg=pooling
    )
  # One group makes 'group' equal 'call'.
  p32 = jnp.asarray(probs, jnp.float32)
  call = balancing.pooled_load_balancing_loss(p32, jnp.asarray(indices), num_experts, "call")
  if groups == 1:
    group = balancing.pooled_load_balancing_loss(p32, jnp.asarray(indices), num_experts, "group")
    np.testing.assert_allclose(float(group), float(call), rtol=1e-6)


def test_pooled_load_balancing_loss_rejects_bad_settings():
  probs, indices = jnp.full((2, 3, 4), 0.25), jnp.zeros((2, 3, 1), jnp.int32)
  with pytest.raises(ValueError, match="lb_pooling='batch'"):
    balancing.pooled_load_balancing_loss(probs, indices, 4, "batch")
  with pytest.raises(ValueError, match="lb_pooling='group' needs"):
    balancing.pooled_load_balancing_loss(probs.reshape(6, 4), indices.reshape(6, 1), 4, "group")
