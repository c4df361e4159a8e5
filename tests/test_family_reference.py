"""The NumPy family references (`family_reference.py`) on cases small enough to do by hand.

Every expected number here is a closed form worked out from the papers' formulas, not a
value computed by the code under test: so the references that the routing, MLA and layer
tests trust are themselves checked.
"""

import math

import numpy as np
import pytest

from helpers import family_reference as ref

LN3 = math.log(3.0)  # σ(ln 3) = 3/4, so silu(ln 3) = ln 3 · 3/4


def _swiglu_1d(w_in, w_gate, w_out):
  """A SwiGLU FFN on d_model = 1, hidden = 1: `[1, 1]` matrices."""
  return {"w_in": np.array([[w_in]]), "w_gate": np.array([[w_gate]]), "w_out": np.array([[w_out]])}


def _two_experts():
  """Router logits [0, ln 3] for x = [1]: sigmoid scores [1/2, 3/4], softmax [1/4, 3/4].

  Expert 0: silu(ln3)·2·1 = 1.5 ln3. Expert 1: silu(ln3)·1·3 = 2.25 ln3. Shared: 0.75 ln3.
  """
  e0, e1 = _swiglu_1d(2.0, LN3, 1.0), _swiglu_1d(1.0, LN3, 3.0)
  stack = lambda name: np.stack([e0[name], e1[name]])
  return {
    "router": np.array([[0.0, LN3]]),
    "w_in": stack("w_in"),
    "w_gate": stack("w_gate"),
    "w_out": stack("w_out"),
    "shared": _swiglu_1d(1.0, LN3, 1.0),
  }


def test_route_token_by_hand():
  scores = [0.5, 0.75]
  assert ref.route_token(scores, 1) == ([1], [0.75])
  assert ref.route_token(scores, 1, normalize=True, scale=2.5) == ([1], [2.5])
  # The bias moves the selection (0.5 + 0.5 > 0.75) but not the gate (still s = 0.5).
  assert ref.route_token(scores, 1, bias=[0.5, 0.0]) == ([0], [0.5])
  assert ref.route_token(scores, 1, bias=[0.5, 0.0], scale=2.5) == ([0], [1.25])
  chosen, gates = ref.route_token(scores, 2, normalize=True, scale=2.5)
  assert chosen == [1, 0]
  np.testing.assert_allclose(gates, [0.75 / 1.25 * 2.5, 0.5 / 1.25 * 2.5])


def test_route_token_groups_by_hand():
  # Groups {0, 1} and {2, 3}. Top-2 sums: 1.0 and 1.5, so V3 keeps group 1 and picks expert 2
  # although expert 0 has the best score; by the group max (V2) group 0 wins.
  scores = [0.9, 0.1, 0.8, 0.7]
  assert ref.route_token(scores, 1, num_groups=2, topk_groups=1)[0] == [2]
  assert ref.route_token(scores, 1, num_groups=2, topk_groups=1, group_top=1)[0] == [0]
  assert ref.route_token(scores, 2, num_groups=2, topk_groups=1)[0] == [2, 3]
  assert ref.route_token(scores, 2, num_groups=2, topk_groups=2)[0] == [0, 2]
  # A bias of +0.5 on expert 1 makes group 0's top-2 sum 1.5 + 0.9 = 2.4 > 1.5.
  chosen, gates = ref.route_token(scores, 1, bias=[0, 0.5, 0, 0], num_groups=2, topk_groups=1)
  assert (chosen, gates) == ([0], [0.9])


def test_deepseek_v3_block_by_hand():
  params = _two_experts()
  x = np.array([[1.0]])
  # k=1: expert 1 (s = 3/4), normalised gate 1, times 2.5; plus the ungated shared expert.
  y, chosen = ref.deepseek_v3_moe(x, params, top_k=1, routed_scaling_factor=2.5)
  assert chosen.tolist() == [[1]]
  assert y[0, 0] == pytest.approx(2.5 * 2.25 * LN3 + 0.75 * LN3, rel=1e-12)
  # k=2: gates 0.5/1.25 and 0.75/1.25, times 2.5: 1.0 and 1.5.
  y, _ = ref.deepseek_v3_moe(x, params, top_k=2, routed_scaling_factor=2.5)
  assert y[0, 0] == pytest.approx(1.0 * 1.5 * LN3 + 1.5 * 2.25 * LN3 + 0.75 * LN3, rel=1e-12)
  # The selection bias picks expert 0; its gate is its own unbiased score, normalised: 1.
  y, chosen = ref.deepseek_v3_moe(x, {**params, "bias": np.array([0.5, 0.0])}, top_k=1)
  assert chosen.tolist() == [[0]]
  assert y[0, 0] == pytest.approx(1.5 * LN3 + 0.75 * LN3, rel=1e-12)
  # Without normalisation the gate is the raw sigmoid score.
  y, _ = ref.deepseek_v3_moe(x, {**params, "shared": None}, top_k=1, normalize=False)
  assert y[0, 0] == pytest.approx(0.75 * 2.25 * LN3, rel=1e-12)


def test_qwen2_block_by_hand():
  params = {**_two_experts(), "shared_gate": np.array([[LN3]])}  # σ(ln 3) = 3/4
  x = np.array([[1.0]])
  # softmax [1/4, 3/4]; k=1, raw gate 3/4 (norm_topk_prob False); shared × 3/4.
  y = ref.qwen2_moe(x, params, top_k=1)
  assert y[0, 0] == pytest.approx(0.75 * 2.25 * LN3 + 0.75 * 0.75 * LN3, rel=1e-12)
  y = ref.qwen2_moe(x, params, top_k=1, norm_topk_prob=True)
  assert y[0, 0] == pytest.approx(2.25 * LN3 + 0.75 * 0.75 * LN3, rel=1e-12)
  y = ref.qwen2_moe(x, params, top_k=2)  # both experts, raw softmax gates
  assert y[0, 0] == pytest.approx(0.25 * 1.5 * LN3 + 0.75 * 2.25 * LN3 + 0.5625 * LN3, rel=1e-12)


def test_llama4_block_by_hand():
  params = _two_experts()
  # Top-1 by logit: expert 1, gate σ(ln 3) = 3/4 on the input: x' = 3/4, so the expert
  # computes silu(0.75 ln3) · 0.75 · 3 with silu(v) = v / (1 + e^-v) and e^-(0.75 ln3) = 3^-0.75.
  y = ref.llama4_moe(np.array([[1.0]]), params)
  silu = 0.75 * LN3 / (1 + 3.0**-0.75)
  assert y[0, 0] == pytest.approx(silu * 0.75 * 3.0 + 0.75 * LN3, rel=1e-12)
  # Gating the output instead would give 0.75 · 2.25 ln3: a different number.
  assert y[0, 0] != pytest.approx(0.75 * 2.25 * LN3 + 0.75 * LN3, rel=1e-3)


def test_balance_losses_by_hand():
  # One sequence of 2 tokens, 2 experts, k=1, both tokens on expert 0.
  scores = np.array([[[1.0, 1.0], [3.0, 1.0]]])  # s' = [.5, .5], [.75, .25]: P = [.625, .375]
  indices = np.array([[[0], [0]]])  # f = [2 / (1 · 2) · 2, 0] = [2, 0]
  assert ref.sequence_aux_loss(scores, indices, 2) == pytest.approx(1.25)
  # Uniform scores and balanced choices give 1.
  assert ref.sequence_aux_loss(np.ones((1, 2, 2)), np.array([[[0], [1]]]), 2) == pytest.approx(1.0)
  # Switch LB: f = [1, 0], P = [.8, .2]: 2 · .8.
  probs = np.array([[0.8, 0.2], [0.8, 0.2]])
  assert ref.switch_lb(probs, np.array([[0], [0]]), 2) == pytest.approx(1.6)
  # k = 2: f is over the T·k = 4 assignments, [.5, .5]: 2 · (.5 · .8 + .5 · .2) = 1.
  assert ref.switch_lb(probs, np.array([[0, 1], [1, 0]]), 2) == pytest.approx(1.0)
  # Group 0 as above (1.6); group 1: f = [0, 1], P = [.5, .5]: 1.0. Their mean is 1.3,
  # while pooling both groups gives f = [.5, .5], P = [.65, .35]: 1.0.
  groups_p = np.array([probs, [[0.5, 0.5], [0.5, 0.5]]])
  groups_i = np.array([[[0], [0]], [[1], [1]]])
  assert ref.group_lb(groups_p, groups_i, 2) == pytest.approx(1.3)
  assert ref.switch_lb(groups_p, groups_i, 2) == pytest.approx(1.0)
  # Global: f from counts [1, 3], P = [.8, .2]: 2 · (.25 · .8 + .75 · .2) = 0.7.


def test_update_bias_by_hand():
  np.testing.assert_allclose(ref.update_bias([0.0, 0.0], [3, 1], 0.1), [-0.1, 0.1])
  np.testing.assert_allclose(ref.update_bias([0.2, -0.3, 0.0], [2, 2, 2], 0.1), [0.2, -0.3, 0.0])
  np.testing.assert_allclose(ref.update_bias([0.0, 0.0, 0.0], [4, 1, 1], 1.0), [-1, 1, 1])


def test_rope_by_hand():
  p = 0.7
  # D = 2: one pair, angle p · base^0 = p, in either layout.
  for layout in ("half", "interleaved"):
    np.testing.assert_allclose(ref.rope([1.0, 0.0], p, 10.0, layout), [math.cos(p), math.sin(p)])
  # D = 4, channel 0 pairs with 2 (half) or with 1 (interleaved), at angle p.
  np.testing.assert_allclose(
    ref.rope([1, 0, 0, 0], p, 10.0, "half"), [math.cos(p), 0, math.sin(p), 0]
  )
  np.testing.assert_allclose(
    ref.rope([1, 0, 0, 0], p, 10.0, "interleaved"), [math.cos(p), math.sin(p), 0, 0]
  )
  # The second pair turns at p · 10^(-2/4).
  angle = p * 10.0**-0.5
  np.testing.assert_allclose(
    ref.rope([0, 1, 0, 0], p, 10.0, "half"), [0, math.cos(angle), 0, math.sin(angle)]
  )
  np.testing.assert_allclose(ref.rope([1, 2, 3, 4], 0, 10.0, "interleaved"), [1, 2, 3, 4])


def test_interleaved_rope_is_half_rope_on_permuted_channels():
  rng = np.random.default_rng(0)
  v = rng.normal(size=8)
  perm = ref.interleaved_to_half(8)
  np.testing.assert_array_equal(perm, [0, 2, 4, 6, 1, 3, 5, 7])
  np.testing.assert_allclose(
    ref.rope(v[perm], 3, 100.0, "half"), ref.rope(v, 3, 100.0, "interleaved")[perm], atol=1e-12
  )


def _mla_1d_params():
  """heads 1, nope 1, rope 2, v 1, kv_lora 2, d_model 2, no query compression."""
  return {
    "q": np.zeros((2, 3)),  # all query channels zero: every score is 0
    "kv_down": np.eye(2),
    "kv_norm": np.ones(2),
    "kv_up": np.array([[1.0, 2.0], [0.0, 1.0]]),  # [k_nope, v] = c · kv_up
    "k_rope": np.ones((2, 2)),
    "o": np.array([[1.0, -1.0]]),
  }


def test_mla_by_hand():
  kwargs = dict(
    num_heads=1, qk_nope_head_dim=1, qk_rope_head_dim=2, v_head_dim=1, rope_base=10.0, eps=1e-12
  )
  params = _mla_1d_params()
  # Token 0: x = [1, 1], rms 1, c = [1, 1], v = 1·2 + 1·1 = 3; it sees only itself: y = 3·[1, -1].
  # Token 1: x = [2, 0], rms √2, c = [√2, 0], v = 2√2; zero queries: uniform over both tokens.
  x = np.array([[[1.0, 1.0], [2.0, 0.0]]])
  y = ref.mla(x, params, **kwargs)
  np.testing.assert_allclose(y[0, 0], [3.0, -3.0], rtol=1e-9)
  v1 = (3.0 + 2 * math.sqrt(2)) / 2
  np.testing.assert_allclose(y[0, 1], [v1, -v1], rtol=1e-9)
  # With a query that sees only the nope key: token 1's scores are q·k_nope / sqrt(3), with
  # k_nope = c[0]: 1 and √2; q_nope = x · [1, 0] = 2.
  params["q"] = np.array([[1.0, 0, 0], [0, 0, 0]])
  y = ref.mla(x, params, **kwargs)
  w = np.exp(np.array([2 * 1.0, 2 * math.sqrt(2)]) / math.sqrt(3))
  w = w / w.sum()
  expected = w[0] * 3.0 + w[1] * 2 * math.sqrt(2)
  np.testing.assert_allclose(y[0, 1], [expected, -expected], rtol=1e-9)


def test_mla_reference_depends_on_relative_positions_only():
  rng = np.random.default_rng(1)
  d, heads, nope, rope, v, r = 6, 2, 3, 4, 2, 5
  params = {
    "q_down": rng.normal(size=(d, 3)),
    "q_norm": rng.normal(size=3),
    "q_up": rng.normal(size=(3, heads * (nope + rope))),
    "kv_down": rng.normal(size=(d, r)),
    "kv_norm": rng.normal(size=r),
    "kv_up": rng.normal(size=(r, heads * (nope + v))),
    "k_rope": rng.normal(size=(d, rope)),
    "o": rng.normal(size=(heads * v, d)),
  }
  x = rng.normal(size=(1, 4, d))
  kwargs = dict(
    num_heads=heads, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
    rope_base=100.0, eps=1e-6,
  )  # fmt: skip
  y0 = ref.mla(x, params, **kwargs)
  y7 = ref.mla(x, params, positions=np.arange(4) + 7, **kwargs)
  np.testing.assert_allclose(y7, y0, rtol=1e-9, atol=1e-12)
  # The rope part matters: zeroing it changes the output.
  y_norope = ref.mla(x, {**params, "k_rope": np.zeros((d, rope))}, **kwargs)
  assert not np.allclose(y_norope, y0)
