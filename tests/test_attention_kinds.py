"""The attention kinds (`moejax.layers.attention_kinds.KINDS`) against the modules they
build: each kind's parameter count, its HF tensors and its shrunk shape agree with a built
layer; and a kind registered under a new name is used everywhere by that one entry."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from helpers.small_models import dense_model_config
from moejax.config import apply_variant, load_config
from moejax.layers import attention_kinds
from moejax.layers.attention import GQA
from moejax.models import flops
from moejax.models.transformer import TransformerLM, validate_config
from moejax.training.tree_paths import flat

SHAPES = {
  "gqa": dict(attention="gqa", num_kv_heads=2, qk_norm="head", qkv_bias=True),
  "gqa-full-qk-norm": dict(attention="gqa", num_kv_heads=4, qk_norm="full", head_dim=12),
  "mla": dict(
    attention="mla",
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    qk_norm="none",
  ),  # fmt: skip
  "mla-no-query-latent": dict(
    attention="mla",
    q_lora_rank=None,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=4,
    qk_norm="none",
  ),  # fmt: skip
}


def _layer_params(config) -> dict[str, tuple[int, ...]]:
  """Shapes of one built attention layer's parameters, by path (`q_proj/kernel`)."""
  layer = attention_kinds.kind_of(config).build(
    config, dtype=np.float32, mesh=None, rngs=nnx.Rngs(0)
  )
  return {
    name: tuple(leaf.shape)
    for name, leaf in flat(nnx.state(layer, nnx.Param).to_pure_dict()).items()
  }


@pytest.mark.parametrize("overrides", SHAPES.values(), ids=SHAPES.keys())
def test_each_kind_counts_and_names_the_parameters_it_builds(overrides):
  config = dense_model_config(**overrides)
  validate_config(config)
  kind = attention_kinds.kind_of(config)
  built = _layer_params(config)
  matmul, vectors = kind.params(config)
  assert sum(int(np.prod(s)) for s in built.values()) == matmul + vectors
  assert sum(int(np.prod(s)) for s in built.values() if len(s) == 2) == matmul
  # The HF layout holds every parameter once, and no other; fused rows fill the parameter.
  tensors = list(kind.hf_tensors(config))
  assert sorted(t.param for t in tensors) == sorted(built)
  for t in tensors:
    shape = built[t.param]
    if t.rows is not None:
      assert t.rows[1] - t.rows[0] == (shape[1] if t.transpose else shape[0])
    if t.perm is not None:
      assert sorted(t.perm) == list(range(shape[-1]))


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_config_json_keys_round_trip(name):
  config = dense_model_config(**SHAPES[name])
  kind = attention_kinds.KINDS[name]
  hf = {"num_attention_heads": config.num_heads, "hidden_size": config.d_model}
  hf.update(kind.to_hf(config))
  back = dense_model_config(attention=name)
  kind.from_hf(hf, back)
  for key in kind.keys:
    if key in ("qk_norm", "qkv_bias"):  # fixed by the family, not by config.json
      continue
    expected = config[key] if key != "head_dim" else config.head_dim or 8
    assert back[key] == expected, key


@pytest.mark.parametrize("arg", ["smoke", "cpu"])
def test_shrunk_models_of_each_kind_are_valid(arg):
  for name in ("mixtral", "deepseek_v3", "deepseek_v2_lite", "olmoe"):
    config = load_config(f"configs/{name}.py:{arg}")
    validate_config(config.model)
    if config.model.attention == "gqa":
      assert config.model.num_heads % config.model.num_kv_heads == 0


def test_a_kind_registered_under_a_new_name_is_used_everywhere(monkeypatch):
  """One registry entry is all a new kind needs: validation, building, counting, shrinking
  and upcycling's key list all read the registry."""
  renamed = dataclasses.replace(GQA, name="gqa_copy")
  monkeypatch.setitem(attention_kinds.KINDS, "gqa_copy", renamed)
  config = dense_model_config(attention="gqa_copy")
  validate_config(config)
  model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
  assert flops.count_params(config)["total"] == flops.count_model_params(model)
  reference = dense_model_config(attention="gqa")
  assert flops.count_params(config) == flops.count_params(reference)
  assert flops.flops_per_token(config, 64) == flops.flops_per_token(reference, 64)
  shrunk = load_config("configs/mixtral.py:pod")  # the published shape
  shrunk.model.attention = "gqa_copy"
  apply_variant(shrunk, "smoke", "mixtral")
  assert shrunk.model.num_kv_heads == load_config("configs/mixtral.py:smoke").model.num_kv_heads
  with pytest.raises(ValueError, match=r"attention must be one of \('gqa', 'mla', 'gqa_copy'\)"):
    validate_config(dense_model_config(attention="gqa_cpy"))
