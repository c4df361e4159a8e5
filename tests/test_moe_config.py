"""`MoeConfig`: one place that checks every MoE option, and the forms it resolves per platform."""

import dataclasses

import pytest

from moejax.config import load_config
from moejax.models.transformer import moe_config
from moejax.moe import MoeConfig


def make(**overrides) -> MoeConfig:
  return MoeConfig(**{"num_experts": 4, "d_ff": 8, "top_k": 2, **overrides})


@pytest.mark.parametrize(
  "overrides,needle",
  [
    (dict(top_k=0), "top_k"),
    (dict(top_k=5), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    (dict(min_capacity=0), "min_capacity"),
    (dict(router="hash"), "router"),
    (dict(dispatch="scatter"), "dispatch"),
    (dict(expert_impl="cuda"), "expert_impl"),
    (dict(activation="tanh"), "activation"),
    (dict(router="dense", top_k=2), "top_k=num_experts"),
    (dict(router="expert_choice", dispatch="dropless"), "dropless"),
    (dict(second_expert_policy="random", top_k=1), "second_expert_policy"),
    (dict(second_expert_policy="random", router="expert_choice"), "second_expert_policy"),
    (dict(second_expert_policy="sometimes"), "second_expert_policy"),
    (dict(group_size=4, dispatch="dropless"), "group_size=4 does nothing"),
    (dict(renormalize=True, router="expert_choice"), "renormalize=True does nothing"),
    (dict(router_jitter=1.0), "router_jitter"),
    (dict(expert_dropout=-0.1), "expert_dropout"),
    (dict(dropless_buffer_factor=0.0), "dropless_buffer_factor"),
    (dict(dropless_overflow="spill"), "dropless_overflow"),
    (dict(dropless_overflow="drop", dispatch="sort"), "dropless_overflow='drop' does nothing"),
  ],
)
def test_bad_settings_raise_one_clear_line(overrides, needle):
  with pytest.raises(ValueError, match=needle) as info:
    make(**overrides)
  assert "\n" not in str(info.value)


def test_neutral_defaults_that_do_not_apply_are_ignored():
  # Capacity options keep their defaults under dropless (listed in the module's table).
  config = make(dispatch="dropless", capacity_factor=3.0, min_capacity=9)
  assert config.dispatch == "dropless"
  make(router="expert_choice", dispatch="sort")  # renormalize=False, policy 'all': fine


def test_forms_are_resolved_from_the_platform():
  auto = make()
  assert [auto.resolved_dispatch(p) for p in ("cpu", "gpu", "tpu")] == ["sort", "sort", "einsum"]
  assert [auto.resolved_expert_impl(p) for p in ("cpu", "gpu", "tpu")] == [
    "block_loop",
    "grouped_matmul",
    "grouped_matmul",
  ]
  for explicit in ("einsum", "sort", "dropless"):
    assert make(dispatch=explicit).resolved_dispatch("tpu") == explicit
  assert make(expert_impl="grouped_matmul").resolved_expert_impl("cpu") == "grouped_matmul"


def test_from_model_config_reads_every_field_and_names_the_key_on_error():
  model = load_config("configs/mixtral.py:smoke").model
  config = moe_config(model)
  for field in dataclasses.fields(MoeConfig):
    key = "expert_d_ff" if field.name == "d_ff" else field.name
    assert getattr(config, field.name) == model[key], field.name
  model.top_k = 99
  with pytest.raises(ValueError, match=r"^config\.model\.top_k=99 must be"):
    moe_config(model)
