"""The 2024-26 MoE blocks through the whole `MoeLayer`, against the NumPy references written
from the papers and model cards (`family_reference.py`): DeepSeek-V3 (sigmoid scores,
selection bias, group-limited top-k, normalised and scaled gates, a shared expert),
Qwen2-MoE (a gated shared expert of its own width) and Qwen3-MoE; the aux-loss-free bias
update of a train step; the sequence-wise loss in the training objective."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import family_reference as ref
from moejax.config import load_config
from moejax.moe import MoeConfig, MoeLayer
from moejax.training import steps

D_MODEL, D_FF, TOKENS = 8, 6, 24


def layer_and_params(config: MoeConfig, seed: int = 0):
  layer = MoeLayer(config, d_model=D_MODEL, rngs=nnx.Rngs(seed))
  layer.router_kernel[...] = jax.random.normal(jax.random.key(seed + 7), layer.router_kernel.shape)
  get = lambda v: None if v is None else np.asarray(v[...], np.float64)
  params = {
    "router": get(layer.router_kernel),
    **{n: get(getattr(layer.experts, n)) for n in ("w_in", "w_gate", "w_out")},
    "bias": None,
    "shared": None
    if layer.shared is None
    else {n: get(getattr(layer.shared, n)) for n in ("w_in", "w_gate", "w_out")},
    "shared_gate": get(layer.shared_gate),
  }
  if layer.selection_bias is not None:  # a bias that changes the choices
    bias = jax.random.uniform(
      jax.random.key(seed + 9), (config.num_experts,), minval=-0.3, maxval=0.3
    )
    layer.selection_bias[...] = bias
    params["bias"] = np.asarray(bias, np.float64)
  return layer, params


def relative_error(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def tokens(seed=1):
  return jax.random.normal(jax.random.key(seed), (2, TOKENS // 2, D_MODEL))


@pytest.mark.parametrize("dispatch", ["dropless", "sort"])
def test_deepseek_v3_block_matches_the_reference(dispatch):
  config = MoeConfig(
    num_experts=16, d_ff=D_FF, top_k=4, score_fn="sigmoid", renormalize=True,
    routed_scaling_factor=2.5, num_expert_groups=4, topk_groups=2, bias_update_rate=0.001,
    num_shared_experts=1, dispatch=dispatch, capacity_factor=16.0,  # no drops: same function
  )  # fmt: skip
  layer, params = layer_and_params(config)
  x = tokens()
  y, aux = layer(x)
  want, chosen = ref.deepseek_v3_moe(
    np.asarray(x).reshape(TOKENS, D_MODEL), params, top_k=4, num_groups=4, topk_groups=2,
    routed_scaling_factor=2.5, normalize=True, score_fn="sigmoid",
  )  # fmt: skip
  assert relative_error(np.asarray(y).reshape(TOKENS, D_MODEL), want) <= 1e-5
  np.testing.assert_array_equal(np.asarray(aux["routing"]["expert_indices"]), chosen)
  # The bias changed the choices: without it the reference picks other experts.
  _, unbiased = ref.deepseek_v3_moe(
    np.asarray(x).reshape(TOKENS, D_MODEL), {**params, "bias": None}, top_k=4, num_groups=4,
    topk_groups=2, routed_scaling_factor=2.5,
  )  # fmt: skip
  assert (np.sort(unbiased, 1) != np.sort(chosen, 1)).any()


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen_moe_blocks_match_the_reference(norm_topk_prob):
  """Qwen2-MoE (Qwen1.5-MoE-A2.7B: raw top-4 softmax gates, a shared expert of its own
  width scaled by sigmoid(x · w)); with normalised gates and no shared expert, Qwen3-MoE."""
  shared = {} if norm_topk_prob else dict(
    num_shared_experts=1, shared_expert_d_ff=10, shared_expert_gate=True
  )  # fmt: skip
  config = MoeConfig(
    num_experts=12, d_ff=D_FF, top_k=4, renormalize=norm_topk_prob, dispatch="dropless", **shared
  )
  layer, params = layer_and_params(config, seed=3)
  if not norm_topk_prob:
    assert params["shared"]["w_in"].shape == (D_MODEL, 10)
  x = tokens(4)
  y, _ = layer(x)
  want = ref.qwen2_moe(np.asarray(x).reshape(TOKENS, D_MODEL), params, top_k=4,
                       norm_topk_prob=norm_topk_prob)  # fmt: skip
  assert relative_error(np.asarray(y).reshape(TOKENS, D_MODEL), want) <= 1e-5


def test_llama4_routing_is_top1_sigmoid_gates():
  """Llama 4's routing: the top expert by logit, gated by sigmoid(logit), with a shared
  expert (HF's Llama 4 then scales the expert's input rather than its output)."""
  config = MoeConfig(num_experts=8, d_ff=D_FF, top_k=1, score_fn="sigmoid", dispatch="dropless")
  layer, params = layer_and_params(config, seed=5)
  x = tokens(6)
  _, aux = layer(x)
  logits = np.asarray(x, np.float64).reshape(TOKENS, D_MODEL) @ params["router"]
  np.testing.assert_array_equal(
    np.asarray(aux["routing"]["expert_indices"])[:, 0], logits.argmax(1)
  )
  want = ref.deepseek_v3_moe(
    np.asarray(x).reshape(TOKENS, D_MODEL), params, top_k=1, normalize=False, score_fn="sigmoid"
  )[0]
  assert relative_error(np.asarray(layer(x)[0]).reshape(TOKENS, D_MODEL), want) <= 1e-5


def smoke_config(**model):
  overrides = {"model." + k: v for k, v in model.items()}
  return load_config("configs/tiny.py:smoke", overrides)


def test_a_train_step_moves_the_selection_bias_by_the_rule():
  """bias += rate · sign(mean load - load), from the step's own expert loads (Wang et al.
  2024, Algorithm 1), outside the gradient; the bias is state, not a parameter."""
  config = smoke_config(bias_update_rate=0.01, score_fn="sigmoid", renormalize=True)
  model, optimizer, _ = steps.build(config)
  assert not any(
    "selection_bias" in jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  )
  graphdef, state = nnx.split((model, optimizer))
  train_step, _ = steps.make_steps(graphdef, config.model)
  rng = np.random.default_rng(0)
  batch_tokens = rng.integers(0, 256, (config.train.batch_size, config.train.seq_len + 1))
  batch = {"inputs": jnp.asarray(batch_tokens[:, :-1]), "targets": jnp.asarray(batch_tokens[:, 1:])}
  new_state, metrics = jax.jit(train_step)(state, batch)
  model, _ = nnx.merge(graphdef, new_state)
  load = np.asarray(metrics["expert_load"])  # [layers, E]
  bias = np.asarray(model.stacks[0].period.blocks[0].moe.selection_bias[...])  # [layers, E]
  np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean(1, keepdims=True) - load), atol=1e-7)
  assert np.any(bias != 0)


def test_the_sequence_loss_enters_the_objective_per_moe_layer():
  config = smoke_config(seq_aux_loss_weight=0.5, lb_loss_weight=0.0, z_loss_weight=0.0)
  model, optimizer, _ = steps.build(config)
  graphdef, state = nnx.split((model, optimizer))
  train_step, _ = steps.make_steps(graphdef, config.model)
  batch = {"inputs": jnp.ones((8, 32), jnp.int32), "targets": jnp.ones((8, 32), jnp.int32)}
  _, metrics = jax.jit(train_step)(state, batch)
  moe_layers = 2
  expected = float(metrics["ce_loss"]) + moe_layers * 0.5 * float(metrics["seq_aux_loss"])
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["seq_aux_loss"]) > 0


def test_lb_pooling_group_averages_per_group_losses():
  config = MoeConfig(num_experts=4, d_ff=D_FF, top_k=1, group_size=6, lb_pooling="group",
                     dispatch="sort", capacity_factor=4.0)  # fmt: skip
  layer, params = layer_and_params(config, seed=8)
  x = tokens(9)
  _, aux = layer(x)
  probs = ref.softmax(np.asarray(x, np.float64).reshape(TOKENS, D_MODEL) @ params["router"])
  chosen = probs.argmax(1)
  per_group = [
    4 * sum(np.mean(chosen[g : g + 6] == e) * probs[g : g + 6, e].mean() for e in range(4))
    for g in range(0, TOKENS, 6)
  ]
  assert float(aux["lb_loss"]) == pytest.approx(np.mean(per_group), rel=1e-5)
  call = MoeLayer(dataclasses.replace(config, lb_pooling="call"), d_model=D_MODEL, rngs=nnx.Rngs(8))
  call.router_kernel[...] = layer.router_kernel[...]
  assert float(call(x)[1]["lb_loss"]) != pytest.approx(float(aux["lb_loss"]), rel=1e-3)
