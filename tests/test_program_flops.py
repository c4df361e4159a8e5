"""The jaxpr matmul count (`moejax.parallel.program_flops`) against hand counts, and the
remat policies (`moejax.models.remat`): what each recomputes, counted by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_attention_kinds import SHAPES

from helpers.small_models import dense_model_config
from moejax.layers.attention_kinds import kind_of
from moejax.models import flops
from moejax.models.remat import POLICIES
from moejax.models.transformer import TransformerLM
from moejax.parallel.program_flops import matmul_flops

BATCH, SEQ = 2, 12
MOE = dict(num_experts=4, top_k=2, expert_impl="grouped_matmul")  # ragged_dot experts
MLA = SHAPES["mla"]  # with a query latent


def count(fn, *args) -> float:
  return matmul_flops(jax.make_jaxpr(fn)(*args))


def test_matmuls_loops_and_branches_counted_by_hand():
  a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
  assert count(lambda a, b: a @ b, a, b) == 2 * 3 * 4 * 5
  batched = lambda x, y: jnp.einsum("bij,bjk->bik", x, y)
  assert count(batched, jnp.ones((6, 3, 4)), jnp.ones((6, 4, 5))) == 2 * 6 * 3 * 4 * 5

  def scanned(a):  # a [2, 3] times [3, 3], 7 times
    return jax.lax.scan(lambda c, _: (c @ jnp.ones((3, 3)), None), a, length=7)[0]

  assert count(scanned, jnp.ones((2, 3))) == 7 * 2 * 2 * 3 * 3

  def looped(a):  # trip count known only at run time: counted zero times
    return jax.lax.while_loop(lambda c: c[0, 0] < 10, lambda c: c @ jnp.ones((3, 3)), a)

  assert count(looped, jnp.ones((3, 3))) == 0

  def branched(a, which):  # the dearer branch: two matmuls
    return jax.lax.cond(which, lambda x: x @ x @ x, lambda x: x @ x, a)

  assert count(branched, jnp.ones((3, 3)), True) == 2 * (2 * 3 * 3 * 3)


def test_a_grouped_matmul_and_its_gradients_cost_two_flops_per_row_weight():
  """Forward, and both backward products (one with a ragged contraction, whose output
  has one block per group): each 2 · rows · d_in · d_out, whatever the groups."""
  rows, d_in, d_out, groups = 10, 4, 3, 5
  sizes = jnp.array([1, 4, 0, 3, 2])
  f = lambda x, w: jax.lax.ragged_dot(x, w, sizes).sum()
  x, w = jnp.ones((rows, d_in)), jnp.ones((groups, d_in, d_out))
  assert count(f, x, w) == 2 * rows * d_in * d_out
  assert count(jax.grad(f, argnums=(0, 1)), x, w) == 3 * 2 * rows * d_in * d_out


def test_a_shard_map_body_counts_once_per_device():
  mesh = jax.make_mesh((8,), ("data",))
  local = jax.shard_map(
    lambda x: x @ jnp.ones((4, 5)), mesh=mesh, in_specs=P("data"), out_specs=P("data")
  )
  x = jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("data")))
  assert count(jax.jit(local), x) == 2 * 16 * 4 * 5  # 8 devices x [2, 4] @ [4, 5]


def model_counts(remat: str, **overrides) -> tuple[float, float, float]:
  """(forward FLOPs, training FLOPs, the loss) of the small MoE model under `remat`."""
  config = dense_model_config(**MOE, **overrides, remat=remat)
  graphdef, params, rest = nnx.split(TransformerLM(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, config.vocab_size)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(tokens)[0]
    return jnp.mean(logits.astype(jnp.float32) ** 2)

  forward = count(loss, params)
  train = count(jax.value_and_grad(loss), params)
  return forward, train, float(jax.jit(loss)(params))


def hand_counts(**overrides) -> dict[str, float]:
  """Per step, from the config alone: the analytic forward (`moejax.models.flops`), the
  gate-weighted combine of each MoE layer's top-k outputs (2 · tokens · k · d_model, a
  matmul the analytic count leaves out), the output projection, the scores q·kᵀ and the
  router matmul of every layer."""
  config = dense_model_config(**MOE, **overrides)
  tokens, d, layers = BATCH * SEQ, config.d_model, config.num_layers
  qk, _ = kind_of(config).score_widths(config)
  return {
    "forward": flops.flops_per_token(config, SEQ)["active"] * tokens,
    "combine": layers * 2 * tokens * config.top_k * d,
    "head": 2 * tokens * d * config.vocab_size,
    "scores": layers * 2 * tokens * SEQ * qk,
    "router": layers * 2 * tokens * d * config.num_experts,
  }


@pytest.mark.parametrize("attention", [{}, MLA], ids=["gqa", "mla"])
def test_each_policy_recomputes_what_it_does_not_keep(attention):
  """Training without remat is 3x the forward matmuls; `full` adds the forward of every
  layer (all but the output projection; the combine's output is needed by no gradient);
  `attention_ffn` adds only the scores q·kᵀ and the router. Every policy gives the same loss."""
  hand = hand_counts(**attention)
  forward, stored, loss = model_counts("none", **attention)
  assert forward == hand["forward"] + hand["combine"]
  assert stored == 3 * forward
  recomputed = {}
  for remat in POLICIES:
    _, train, policy_loss = model_counts(remat, **attention)
    np.testing.assert_allclose(policy_loss, loss, rtol=1e-6)
    recomputed[remat] = train - stored
  assert recomputed["none"] == 0
  assert recomputed["full"] == hand["forward"] - hand["head"]
  assert recomputed["attention_ffn"] == hand["scores"] + hand["router"]
  assert recomputed["offload_ffn"] == recomputed["attention_ffn"]  # moved, not recomputed
  assert 0 < recomputed["attention_ffn"] < recomputed["ffn"] < recomputed["full"]
  assert 0 < recomputed["attention_ffn"] < recomputed["attention"] < recomputed["full"]
