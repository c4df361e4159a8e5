"""Fine-tuning: `train.init_from` (a fresh run's model from another run's or an import's
checkpoint), `train.trainable` / `train.frozen` (frozen parameters: no gradient, no
optimizer state, bit for bit unchanged) and `model.dropout` (the dense residual branches)."""

import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import smoke_config

from moejax.config import load_config
from moejax.layers.dropout import ResidualDropout
from moejax.models.transformer import TransformerLM
from moejax.parallel import sharding
from moejax.training import checkpoint as checkpoint_lib
from moejax.training import run_plan, steps, train
from moejax.training.init_from import restore_init_from
from moejax.training.metrics import read_metrics
from moejax.training.trainable import PRESETS, parameter_paths

ROUTER = ("router_kernel", "noise_kernel", "router_bias")

# Each preset by what it means, written out without its regex.
EXPECTED = {
  "all": lambda p: True,
  "all_but_moe": lambda p: "moe" not in p.split("/"),
  "only_moe": lambda p: "moe" in p.split("/"),
  "only_router": lambda p: p.split("/")[-2:-1] == ["moe"] and p.split("/")[-1] in ROUTER,
  "attention_only": lambda p: "attention" in p.split("/"),
}


def leaf_name(path) -> str:
  """A state leaf's path `/`-joined, without the Variables' `.value`."""
  keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
  return "/".join(str(k) for k in keys if k is not None)


def leaves_by_path(state) -> dict[str, np.ndarray]:
  """`{path: array}` of a state's leaves (PRNG keys as their data)."""
  as_data = lambda x: jax.random.key_data(x) if checkpoint_lib.is_prng_key(x) else x
  flat = jax.tree_util.tree_leaves_with_path(state)
  return {leaf_name(p): np.asarray(jax.device_get(as_data(x))) for p, x in flat}


def abstract(config):
  model, optimizer = nnx.eval_shape(lambda: steps.build(config)[:2])
  return model, optimizer, nnx.split((model, optimizer))[1]


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("spec", ["configs/tiny.py:smoke", "configs/qwen2_moe.py:smoke"])
def test_presets_select_what_they_say_and_frozen_parameters_get_no_optimizer_state(spec):
  """Qwen2-MoE has shared experts, a shared-expert gate and q/k/v biases."""
  sizes = {}
  for preset in PRESETS:
    config = load_config(spec, {"train.trainable": preset})
    model, optimizer, state = abstract(config)
    paths = parameter_paths(model)
    selected = set(parameter_paths(nnx.state(model, optimizer.wrt)))
    assert selected == {p for p in paths if EXPECTED[preset](p)}, preset
    # Adam's two moments of every trainable element, float32, and nothing for the rest.
    elements = sum(x.size for x in jax.tree.leaves(nnx.state(model, optimizer.wrt)))
    sizes[preset] = (elements, steps.optimizer_state_bytes(state))
    names = [leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state[1]["opt_state"])]
    for moment in ("mu", "nu"):
      held = {re.sub(rf"^.*?/{moment}/", "", n) for n in names if f"/{moment}/" in n}
      assert held == selected, (preset, moment)
  all_elements, all_bytes = sizes["all"]
  for preset, (elements, nbytes) in sizes.items():
    assert all_bytes - nbytes == 2 * 4 * (all_elements - elements), preset
  assert sizes["only_router"][1] < sizes["all_but_moe"][1] < sizes["all"][1]


def test_a_regex_and_frozen_combine():
  config = load_config(
    "configs/tiny.py:smoke", {"train.trainable": "attention|router", "train.frozen": "q_proj"}
  )
  model, optimizer, _ = abstract(config)
  selected = set(parameter_paths(nnx.state(model, optimizer.wrt)))
  expected = {
    p for p in parameter_paths(model) if ("attention" in p or "router" in p) and "q_proj" not in p
  }
  assert selected == expected and any("router" in p for p in expected)


@pytest.mark.parametrize(
  "overrides, needle",
  [
    ({"train.trainable": "only_routr"}, "config.train.trainable='only_routr' matches no parameter"),
    ({"train.trainable": "("}, "config.train.trainable='(' is not a regular expression"),
    ({"train.frozen": "nothing_like_this"}, "config.train.frozen='nothing_like_this' matches no"),
    ({"train.trainable": "only_router", "train.frozen": "moe"}, "nothing would train"),
    ({"train.trainable": "only_router", "model.num_experts": 0}, "has none of the parameters"),
    ({"model.dropout": 1.0}, "config.model.dropout=1.0 must be a rate in [0, 1)"),
  ],
)
def test_bad_settings_fail_with_one_line_naming_them(overrides, needle):
  config = load_config("configs/tiny.py:smoke", overrides)
  with pytest.raises(ValueError) as error:
    abstract(config)
  assert needle in str(error.value) and "\n" not in str(error.value)
  if "only_routr" in needle:  # the presets are named
    assert all(name in str(error.value) for name in PRESETS)


# ----------------------------------------------------------------------------- init_from


# The source models and the fine-tunes: aux-loss-free balancing, a selection bias that is
# model state but no parameter.
BALANCED = {"model.score_fn": "sigmoid", "model.bias_update_rate": 0.01}


@pytest.fixture(scope="module")
def initial():
  """The config the sources are saved with and a fresh `(model, optimizer)` state of it."""
  config = load_config("configs/tiny.py:smoke", BALANCED)
  return config, steps.init_state(config, run_plan.make_run_mesh(config))[1]


def moved(state, offset: float):
  """A copy of `state` with `offset` added to every parameter: a model unlike the fresh one."""
  shift = lambda v: v.replace(v[...] + offset) if isinstance(v, nnx.Param) else v
  return jax.tree.map(shift, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.fixture(scope="module")
def source(initial, tmp_path_factory):
  """A run directory with full training checkpoints (model and optimizer) at steps 1 and 2,
  of two different models; returns it and the newest model's parameters."""
  config, state = initial
  directory = tmp_path_factory.mktemp("source")
  checkpoints = checkpoint_lib.Checkpointer(directory, keep=10)
  for step in (1, 2):
    checkpoints.save(step, moved(state, 0.01 * step), {}, config)
  checkpoints.close()
  return str(directory), leaves_by_path(moved(state, 0.02)[0].filter(nnx.Param))


def test_fine_tune_starts_from_the_newest_model_and_resumes_without_it(
  initial, source, tmp_path, capsys
):
  """Fine-tune with the MoE layers frozen: they end as the source's newest model has them
  (so they were read from it, and kept bit for bit); the rest trained. Then the run resumes
  exactly with the source gone: `init_from` is read once."""
  directory, newest = source
  config = smoke_config(
    **{
      "train.init_from": directory,
      "train.trainable": "all_but_moe",
      "train.num_steps": 2,
      "train.warmup_steps": 1,
      "train.checkpoint_every": 1,
      "train.eval_every": 2,
      "mesh.fsdp": 2,  # the reduced optimizer state sharded, saved and restored
      "mesh.expert": 2,
      **BALANCED,  # the selection bias: state a resume must keep
    }
  )
  workdir = str(tmp_path / "run")
  # show_progress: the startup line (no bar off a terminal)
  train.train_and_evaluate(config, workdir, show_progress=True)
  startup = next(line for line in capsys.readouterr().out.splitlines() if "step 0 of 2" in line)
  plan_bytes = steps.optimizer_state_bytes(abstract(config)[2])
  assert f"the model from {directory} at step 2" in startup
  assert f"optimizer state {plan_bytes:,} bytes" in startup
  # The run's model, read as a fine-tune of it would be (`restore_init_from`, whose reading
  # the next test checks bit for bit).
  mesh = run_plan.make_run_mesh(initial[0])
  tuned = leaves_by_path(restore_init_from(workdir, initial[1][0], mesh)[0].filter(nnx.Param))
  for path, was in newest.items():
    if "moe" in path.split("/"):
      assert was.tobytes() == tuned[path].tobytes(), path
    else:
      assert not np.array_equal(was, tuned[path]), path
  # The checkpoint holds optimizer state for the trained parameters only.
  checkpoints = checkpoint_lib.Checkpointer(workdir, keep=10, create=False)
  assert not checkpoints.holds_model_only(2)
  checkpoints.check_fits(abstract(config)[2], 2)
  with pytest.raises(ValueError, match="opt_state"):
    checkpoints.check_fits(abstract(smoke_config(**BALANCED))[2], 2)
  checkpoints.close()

  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "2"))
  shutil.move(directory, directory + ".gone")
  try:
    result = train.train_and_evaluate(config, copy, show_progress=True)
  finally:
    shutil.move(directory + ".gone", directory)
  assert result["start_step"] == 1
  assert "resuming at step 1 of 2" in capsys.readouterr().out
  comparable = lambda d: {
    (r["step"], k): v
    for r in read_metrics(d)
    for k, v in r.items()
    if k.startswith(("train/", "eval/")) and k != "train/tokens_per_sec"
  }
  got, expected = comparable(copy), comparable(workdir)
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=str(key))


def test_fine_tuning_an_import_trains_only_its_routers(initial, tmp_path):
  """An import's model-only checkpoint (saved without dropout) fills a fine-tune model with
  dropout: every parameter and the selection bias from the checkpoint, the RNG streams the
  run's own. Three train steps (the loop's jitted step, weight decay on) with only the
  routers training: every other parameter keeps the imported bits, the routers move.
  Resuming the import's directory itself is refused."""
  saved_config, state = initial
  saved = moved(state, 0.5)[0]
  moe = saved["stacks"][0]["period"]["blocks"][0]["moe"]
  shape = moe["selection_bias"].shape
  moe["selection_bias"] = moe["selection_bias"].replace(
    jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
  )
  imported = str(tmp_path / "imported")
  checkpoints = checkpoint_lib.Checkpointer(imported, keep=1)
  checkpoints.save_model(3, saved, saved_config)
  checkpoints.close()

  config = smoke_config(
    **{
      "train.init_from": imported,
      "train.trainable": "only_router",
      "train.weight_decay": 0.5,
      "model.dropout": 0.1,
      **BALANCED,
    }
  )
  plan = run_plan.plan_run(config, str(tmp_path / "new"))
  assert plan.init_from_step == 3 and not (tmp_path / "new").exists()
  graphdef, state, shardings = steps.init_state(config, plan.mesh)
  fresh = leaves_by_path(state[0])
  model_state, step = restore_init_from(imported, state[0], plan.mesh)
  assert step == 3
  got, expected = leaves_by_path(model_state), leaves_by_path(saved)
  for path, value in got.items():
    if "rng" in path.split("/")[-2]:  # router_rng, dropout/rng: the run's own
      assert np.array_equal(value, fresh[path]), path
    else:
      assert value.tobytes() == expected[path].tobytes(), path
  assert any("dropout/rng" in p for p in got)

  state = nnx.merge_state(state, {0: model_state})
  train_step = train.jit_train_step(
    steps.make_steps(graphdef, config.model)[0], plan.mesh, shardings
  )
  tally = train.no_nonfinite_tally()
  rng = np.random.default_rng(0)
  for i in range(3):
    tokens = rng.integers(0, 256, (8, 33), dtype=np.int32)
    batch = sharding.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, plan.mesh)
    state, tally, _ = train_step(state, tally, batch, np.int32(i + 1))
  assert int(tally["skipped"]) == 0
  after = leaves_by_path(state[0].filter(nnx.Param))
  model, optimizer = nnx.merge(graphdef, state)
  trainable = set(parameter_paths(nnx.state(model, optimizer.wrt)))
  assert trainable == {p for p in after if EXPECTED["only_router"](p)}
  for path, now in after.items():
    if path in trainable:
      assert not np.array_equal(now, expected[path]), path
    else:
      assert now.tobytes() == expected[path].tobytes(), path

  with pytest.raises(ValueError) as error:
    run_plan.plan_run(saved_config, imported)
  message = str(error.value)
  assert "imported/upcycled weights only" in message and "\n" not in message
  assert f"--config.train.init_from={imported} --workdir=NEW_DIR" in message


def test_shapes_that_do_not_fit_fail_with_one_line_naming_init_from(source, tmp_path):
  directory, _ = source
  config = smoke_config(**{"train.init_from": directory, "model.expert_d_ff": 16, **BALANCED})
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, str(tmp_path / "new"), show_progress=False)
  message = str(error.value)
  assert message.startswith(f"config.train.init_from={directory}: ") and "\n" not in message
  assert "at step 2" in message and "moe/experts/w_in" in message and "router" not in message
  assert not (tmp_path / "new").exists()
  config = smoke_config(**{"train.init_from": str(tmp_path / "nowhere")})
  with pytest.raises(ValueError, match="config.train.init_from=.*holds no checkpoints/"):
    run_plan.plan_run(config, str(tmp_path / "new"))


# ----------------------------------------------------------------------------- dropout


def test_dropout_acts_in_training_only_and_draws_nothing_at_zero():
  """Dense models (no MoE capacity that differs between the modes) with the same weights,
  without dropout and with `model.dropout=0.3`, each called in both modes in one program."""
  base = {"model.num_experts": 0}
  off = TransformerLM(load_config("configs/tiny.py:smoke", base).model, rngs=nnx.Rngs(0))
  on = TransformerLM(
    load_config("configs/tiny.py:smoke", {**base, "model.dropout": 0.3}).model, rngs=nnx.Rngs(0)
  )
  nnx.update(on, nnx.state(off, nnx.Param))  # the same weights
  assert not any("dropout" in p for p in leaves_by_path(nnx.state(off, nnx.RngState)))
  (graph_off, state_off), (graph_on, state_on) = nnx.split(off), nnx.split(on)

  def call(graphdef, state, tokens, train_mode: bool):
    model = nnx.merge(graphdef, state)
    model.train() if train_mode else model.eval()
    return model(tokens)[0]

  def logits(states, tokens):
    return [
      call(graphdef, state, tokens, mode)
      for graphdef, state in zip((graph_off, graph_on), states, strict=True)
      for mode in (False, True)
    ]

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  off_eval, off_train, on_eval, on_train = map(
    np.asarray, jax.jit(logits)((state_off, state_on), tokens)
  )
  np.testing.assert_array_equal(on_eval, off_eval)
  np.testing.assert_array_equal(off_train, off_eval)
  assert not np.allclose(on_train, off_eval, atol=1e-3)
  # Rate 0 draws no random bits in training mode; 0.3 does.
  for graphdef, state, draws in ((graph_off, state_off, False), (graph_on, state_on, True)):
    jaxpr = str(jax.make_jaxpr(lambda s, t, g=graphdef: call(g, s, t, True))(state, tokens))
    assert ("random_bits" in jaxpr) == draws


def test_residual_dropout_zeroes_and_rescales():
  layer = ResidualDropout(0.25, rngs=nnx.Rngs(0))
  y = np.asarray(layer(jnp.ones((200, 100))))
  assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
  assert abs((y == 0).mean() - 0.25) < 0.02
  assert not np.array_equal(y, np.asarray(layer(jnp.ones((200, 100)))))  # a fresh mask
  layer.eval()
  np.testing.assert_array_equal(np.asarray(layer(jnp.ones((3, 4)))), np.ones((3, 4)))
