"""The published model families moejax reads and writes in HF's on-disk format, and how
each one's `config.json` maps to moejax's model config and back.

Each family is a `model_type` of HF's `config.json` (the names of transformers' classes,
whose code is not needed: the keys and shapes are read from the files). What each family
fixes, from its model card, paper and released config:

| model_type | routing | attention | MoE block on disk (`model.layers.N.`) |
|---|---|---|---|
| `mixtral` (Jiang et al. 2024) | softmax, top-k renormalised | GQA | `block_sparse_moe.gate`, `.experts.E.w1/w3/w2` |
| `olmoe` (Muennighoff et al. 2024) | softmax, raw top-k gates (`norm_topk_prob`) | GQA, QK-norm over the whole q/k projection | `mlp.gate`, `mlp.experts.E.gate_proj/up_proj/down_proj` |
| `qwen2_moe` (Qwen1.5-MoE, Qwen2-MoE) | softmax, `norm_topk_prob` | GQA with q/k/v biases | as OLMoE, plus `mlp.shared_expert.*` scaled by sigmoid(`mlp.shared_expert_gate`) |
| `qwen3_moe` (Qwen3) | softmax, `norm_topk_prob` | GQA, QK-norm per head | as OLMoE |
| `deepseek_v3` (arXiv:2412.19437) | sigmoid + selection bias (`gate.e_score_correction_bias`), group-limited, normalised, scaled | MLA | dense `mlp.*` for the first `first_k_dense_replace` layers, then `mlp.gate`, `mlp.experts.E.*`, `mlp.shared_experts.*` |
| `kimi_k2` (Moonshot AI 2025) | as `deepseek_v3` (its block, with 384 experts) | MLA | as `deepseek_v3` |
| `llama`, `qwen2` (dense) | none | GQA (`qwen2`: q/k/v biases) | `mlp.gate_proj/up_proj/down_proj` |

The RoPE base is read from either layout of `config.json`: transformers 4 writes
`rope_theta` (and `rope_scaling`) at the top level, transformers 5 writes
`rope_parameters: {"rope_type": "default", "rope_theta": ...}`.

RoPE scaling is read by `moejax.convert.hf_rope`: YaRN is computed, other types refused.
What moejax cannot express is refused in one line naming the `config.json` key:
sliding-window attention, activations other than SiLU (SwiGLU), OLMoE's `clip_qkv`, an
output-projection bias, quantized weights other than block-scaled FP8
(`moejax.convert.fp8_blocks`), and Qwen's `mlp_only_layers` or a
`decoder_sparse_step` that is not a layer interval.

Every field moejax reads is checked for its JSON type before it is used (`check_fields`):
sizes and counts are ints (not floats, strings or booleans) of at least 1 (0 for the
optional counts), booleans are `true`/`false` (the string "false" is not read as True),
and floats are finite numbers. Null is read as absent. Each refusal is one line naming
`config.json` and the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from moejax.convert import fp8_blocks, hf_rope
from moejax.layers.attention_kinds import KINDS
from moejax.models.transformer import layer_kinds


@dataclasses.dataclass(frozen=True)
class Family:
  """One `model_type`: where its blocks live on disk and what its routing is, as data: no
  code in `moejax.convert` tests a `model_type` string.

  Attributes:
    model_type: `config.json`'s `model_type`.
    architecture: `config.json`'s `architectures[0]`, written on export.
    moe_block: the MoE block's module under `model.layers.N.` (`block_sparse_moe`, `mlp`).
    expert_names: the on-disk names of an expert's (gate, up, down) projections, i.e.
      moejax's (`w_gate`, `w_in`, `w_out`).
    shared_name: the shared expert's module under the MoE block, or None.
    qk_norm: moejax's `model.qk_norm` ('none', 'head', 'full').
    qkv_bias: whether q/k/v carry biases.
    attention: moejax's `model.attention`, the attention kind (its `config.json` keys and
      tensors: `moejax.layers.attention_kind`).
    experts_key: the `config.json` key of the number of routed experts; None for a dense
      family.
    expert_width_key: the key of each expert's hidden size (`intermediate_size` where the
      family has no dense FFN beside its experts).
    always_renormalizes: the top-k gates always sum to 1 (Mixtral: `norm_topk_prob` is
      not its key; read as true when absent, never written).
    shared: 'none'; 'gated', one shared expert of `shared_expert_intermediate_size` scaled
      by sigmoid(x · w) (Qwen2-MoE); 'counted', `n_shared_experts` of
      `moe_intermediate_size` each (DeepSeek-V3).
    sparse_step_key: the key of the MoE layer interval (Qwen's `decoder_sparse_step`, with
      `mlp_only_layers` refused), or None (every layer MoE after the dense ones).
    deepseek_router: DeepSeek-V3's routing (arXiv:2412.19437 §2.1.2): sigmoid scores, the
      selection bias `gate.e_score_correction_bias`, group-limited top-k (`n_group`,
      `topk_group`), `routed_scaling_factor`, and `first_k_dense_replace` dense layers.
    writes_sliding_window: `sliding_window` is a key of the family, read and written as
      null (Mixtral).
  """

  model_type: str
  architecture: str
  moe_block: str = "mlp"
  expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  shared_name: str | None = None
  qk_norm: str = "none"
  qkv_bias: bool = False
  attention: str = "gqa"
  experts_key: str | None = "num_experts"
  expert_width_key: str = "moe_intermediate_size"
  always_renormalizes: bool = False
  shared: str = "none"
  sparse_step_key: str | None = None
  deepseek_router: bool = False
  writes_sliding_window: bool = False

  @property
  def is_moe(self) -> bool:
    return self.experts_key is not None


_DEEPSEEK_V3 = Family(
  "deepseek_v3",
  "DeepseekV3ForCausalLM",
  shared_name="shared_experts",
  attention="mla",
  experts_key="n_routed_experts",
  shared="counted",
  deepseek_router=True,
)
FAMILIES = {
  f.model_type: f
  for f in (
    Family(
      "mixtral",
      "MixtralForCausalLM",
      "block_sparse_moe",
      ("w1", "w3", "w2"),
      experts_key="num_local_experts",
      expert_width_key="intermediate_size",
      always_renormalizes=True,
      writes_sliding_window=True,
    ),
    Family("olmoe", "OlmoeForCausalLM", qk_norm="full", expert_width_key="intermediate_size"),
    Family(
      "qwen2_moe",
      "Qwen2MoeForCausalLM",
      shared_name="shared_expert",
      qkv_bias=True,
      shared="gated",
      sparse_step_key="decoder_sparse_step",
    ),
    Family(
      "qwen3_moe", "Qwen3MoeForCausalLM", qk_norm="head", sparse_step_key="decoder_sparse_step"
    ),
    _DEEPSEEK_V3,
    # Kimi K2 (Moonshot AI, 2025) publishes DeepSeek-V3's block under its own model_type.
    dataclasses.replace(_DEEPSEEK_V3, model_type="kimi_k2"),
    Family("llama", "LlamaForCausalLM", experts_key=None),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, experts_key=None),
  )
}


def family_of(hf: dict[str, Any]) -> Family:
  """The family of a `config.json` dict; ValueError naming the supported ones."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(
      f"config.json: model_type={model_type!r} is not one moejax reads; supported: "
      f"{', '.join(sorted(FAMILIES))}."
    )
  return FAMILIES[model_type]


# config.json's integer fields moejax reads, with the least value each may take; checked
# wherever present (null is read as absent), whichever family reads them.
INT_FIELDS = {
  **dict.fromkeys(
    (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "num_key_value_heads",
      "head_dim",
      "num_experts_per_tok",
      "num_local_experts",
      "num_experts",
      "n_routed_experts",
      "moe_intermediate_size",
      "shared_expert_intermediate_size",
      "decoder_sparse_step",
      "n_group",
      "topk_group",
      "q_lora_rank",
      "kv_lora_rank",
      "qk_nope_head_dim",
      "qk_rope_head_dim",
      "v_head_dim",
      "max_position_embeddings",
    ),
    1,
  ),
  **dict.fromkeys(("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"), 0),
}
BOOL_FIELDS = ("tie_word_embeddings", "norm_topk_prob", "use_sliding_window", "attention_bias")
# Float fields: whether each must be > 0 (True) or >= 0 (False).
FLOAT_FIELDS = {
  "rms_norm_eps": True,
  "rope_theta": True,
  "routed_scaling_factor": True,
  "router_aux_loss_coef": False,
}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(hf: dict[str, Any]) -> None:
  """ValueError naming the first field of `config.json` `hf` whose JSON type or range is
  not what moejax reads: `INT_FIELDS`, `BOOL_FIELDS`, `FLOAT_FIELDS`, `rope_parameters`."""
  for key, least in INT_FIELDS.items():
    value = hf.get(key)
    if value is not None and not (_is_int(value) and value >= least):
      raise ValueError(f"config.json: {key}={value!r} must be an int >= {least}.")
  for key in BOOL_FIELDS:
    value = hf.get(key)
    if value is not None and not isinstance(value, bool):
      raise ValueError(f"config.json: {key}={value!r} must be true or false (a JSON boolean).")
  rope = hf.get("rope_parameters")
  if rope is not None and not isinstance(rope, dict):
    raise ValueError(f"config.json: rope_parameters={rope!r} must be an object or null.")
  floats = [(key, hf.get(key), positive) for key, positive in FLOAT_FIELDS.items()]
  floats.append(("rope_parameters.rope_theta", (rope or {}).get("rope_theta"), True))
  for key, value, positive in floats:
    if value is not None and not (_is_number(value) and (value > 0 if positive else value >= 0)):
      raise ValueError(
        f"config.json: {key}={value!r} must be a number {'>' if positive else '>='} 0."
      )


def required(hf: dict[str, Any], key: str) -> Any:
  """`hf[key]`, or a ValueError naming the missing (or null) key."""
  if hf.get(key) is None:
    least = INT_FIELDS.get(key)
    kind = f" (an int >= {least})" if least is not None else ""
    raise ValueError(f"config.json has no {key}{kind}; it is needed to read the checkpoint.")
  return hf[key]


def rope_base(hf: dict[str, Any]) -> float:
  """RoPE's base θ (Su et al. 2021): `rope_parameters.rope_theta` (transformers 5's
  layout) where given, else the top-level `rope_theta` (transformers 4's), else 10000."""
  parameters = hf.get("rope_parameters") or {}
  theta = parameters.get("rope_theta")
  return float(theta if theta is not None else hf.get("rope_theta") or 10000.0)


def _refuse_unsupported(hf: dict[str, Any], family: Family) -> None:
  """One line naming the first `config.json` setting moejax cannot compute exactly."""

  def refuse(key: str, allowed: str) -> None:
    raise ValueError(
      f"config.json: {key}={hf.get(key)!r} is not supported by moejax ({allowed}); "
      "the imported model would compute a different function."
    )

  hf_rope.rope_type(hf)  # unscaled or YaRN
  if hf.get("hidden_act", "silu") != "silu":
    refuse("hidden_act", "SwiGLU experts and FFNs: 'silu'")
  if hf.get("use_sliding_window") or (
    family.writes_sliding_window and hf.get("sliding_window") is not None
  ):
    refuse("sliding_window", "full causal attention: null")
  if hf.get("clip_qkv") is not None:
    refuse("clip_qkv", "null")
  if hf.get("attention_bias") and not family.qkv_bias:
    refuse("attention_bias", "false: no projection biases in this family")
  fp8_blocks.block_shape(hf)  # block-scaled FP8 or unquantized
  if family.sparse_step_key and hf.get("mlp_only_layers"):
    refuse("mlp_only_layers", "[]: dense layers only as an interval")
  if family.deepseek_router:
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
      refuse("scoring_func", "'sigmoid'")
    if hf.get("moe_layer_freq", 1) != 1:
      refuse("moe_layer_freq", "1")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
      refuse("topk_method", "'noaux_tc'")


def _flag(hf: dict[str, Any], key: str, default: bool) -> bool:
  """The boolean field `key` (checked by `check_fields`), `default` when absent or null."""
  value = hf.get(key)
  return default if value is None else value


def model_config(hf: dict[str, Any], base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`base` (a full moejax config) with its `model` section set from `config.json` `hf`:
  the shape, norms, RoPE, routing and layer layout of the published model; dropless
  dispatch, float32 compute. Raises ValueError for what moejax cannot express."""
  family = family_of(hf)
  check_fields(hf)
  _refuse_unsupported(hf, family)
  config = ml_collections.ConfigDict(base.to_dict())
  m = config.model
  m.vocab_size, m.d_model, m.num_layers = (
    required(hf, "vocab_size"),
    required(hf, "hidden_size"),
    required(hf, "num_hidden_layers"),
  )
  m.num_heads = required(hf, "num_attention_heads")
  m.d_ff, m.activation = required(hf, "intermediate_size"), "swiglu"
  m.norm_eps, m.rope_base = float(required(hf, "rms_norm_eps")), rope_base(hf)
  hf_rope.set_rope(hf, m)
  m.tie_embeddings = _flag(hf, "tie_word_embeddings", False)
  m.qk_norm, m.qkv_bias, m.dtype = family.qk_norm, family.qkv_bias, "float32"
  m.attention, m.first_dense_layers, m.moe_layer_interval = family.attention, 0, 1
  KINDS[family.attention].from_hf(hf, m)
  m.num_shared_experts, m.shared_expert_d_ff, m.shared_expert_gate = 0, None, False
  m.score_fn, m.routed_scaling_factor, m.num_expert_groups, m.topk_groups = "softmax", 1.0, 1, None
  m.bias_update_rate, m.seq_aux_loss_weight, m.z_loss_weight = 0.0, 0.0, 0.0
  m.router, m.dispatch, m.router_jitter, m.router_bias = "top_k", "dropless", 0.0, False
  if not family.is_moe:
    m.num_experts = 0
    return config
  assert family.experts_key is not None
  m.top_k = required(hf, "num_experts_per_tok")
  m.num_experts = required(hf, family.experts_key)
  m.expert_d_ff = hf.get(family.expert_width_key) or m.d_ff
  m.renormalize = _flag(hf, "norm_topk_prob", family.always_renormalizes)
  if family.shared == "gated":
    m.num_shared_experts, m.shared_expert_gate = 1, True
    m.shared_expert_d_ff = required(hf, "shared_expert_intermediate_size")
  elif family.shared == "counted":
    m.num_shared_experts = hf.get("n_shared_experts") or 0
  if family.sparse_step_key:
    m.moe_layer_interval = hf.get(family.sparse_step_key) or 1
  if family.deepseek_router:
    m.first_dense_layers = hf.get("first_k_dense_replace") or 0
    m.score_fn, m.routed_scaling_factor = "sigmoid", float(hf.get("routed_scaling_factor") or 1.0)
    m.num_expert_groups, m.topk_groups = hf.get("n_group") or 1, hf.get("topk_group")
    m.bias_update_rate = 0.001  # DeepSeek-V3 §4.2: the selection bias keeps moving when trained
  # transformers' load-balancing loss is k times moejax's, pooled over the MoE layers.
  moe_layers = sum(kind == "moe" for kind in layer_kinds(m))
  m.lb_loss_weight = float(hf.get("router_aux_loss_coef") or 0.0) * m.top_k / max(moe_layers, 1)
  return config


def hf_config(model: ml_collections.ConfigDict, family: Family, dtype: str) -> dict[str, Any]:
  """The `config.json` of `family` that describes moejax model config `model`, whose
  tensors are stored in `dtype` (a numpy dtype name)."""
  check_expressible(model, family)
  heads = model.num_heads
  hf: dict[str, Any] = {
    "architectures": [family.architecture],
    "model_type": family.model_type,
    "vocab_size": model.vocab_size,
    "hidden_size": model.d_model,
    "intermediate_size": model.d_ff,
    "num_hidden_layers": model.num_layers,
    "num_attention_heads": heads,
    "hidden_act": "silu",
    "rms_norm_eps": model.norm_eps,
    "rope_theta": model.rope_base,
    "rope_scaling": hf_rope.rope_scaling_json(model),
    "tie_word_embeddings": bool(model.tie_embeddings),
    "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype],
    **KINDS[family.attention].to_hf(model),
  }
  if not family.is_moe:
    return hf
  moe_layers = sum(kind == "moe" for kind in layer_kinds(model))
  hf["num_experts_per_tok"] = model.top_k
  hf["router_aux_loss_coef"] = model.lb_loss_weight * moe_layers / model.top_k
  hf["norm_topk_prob"] = bool(model.renormalize)
  expert_d_ff = model.expert_d_ff or model.d_ff
  assert family.experts_key is not None
  hf[family.experts_key], hf[family.expert_width_key] = model.num_experts, expert_d_ff
  if family.always_renormalizes:
    del hf["norm_topk_prob"]
  if family.writes_sliding_window:
    hf["sliding_window"] = None
  if family.sparse_step_key:
    hf[family.sparse_step_key], hf["mlp_only_layers"] = model.moe_layer_interval, []
  if family.shared == "gated":
    hf["shared_expert_intermediate_size"] = model.shared_expert_d_ff or expert_d_ff
  elif family.shared == "counted":
    hf["n_shared_experts"] = model.num_shared_experts
  if family.deepseek_router:
    hf.update(
      first_k_dense_replace=model.first_dense_layers,
      moe_layer_freq=1,
      n_group=model.num_expert_groups,
      topk_group=model.topk_groups or model.num_expert_groups,
      routed_scaling_factor=model.routed_scaling_factor,
      scoring_func="sigmoid",
      topk_method="noaux_tc",
    )
  return hf


def check_expressible(model: ml_collections.ConfigDict, family: Family) -> None:
  """ValueError naming the first moejax setting of `model` that `family` cannot hold."""
  wanted: dict[str, Any] = {
    "activation": "swiglu",
    "qk_norm": family.qk_norm,
    "qkv_bias": family.qkv_bias,
    "attention": family.attention,
    # Grok-1's blocks: no HF family here holds them.
    "post_norms": False,
    "embedding_multiplier": 1.0,
    "output_multiplier": 1.0,
  }
  if model.attention_logit_cap:  # None and 0 are off
    raise ValueError(
      f"model.attention_logit_cap={model.attention_logit_cap!r} cannot be written as "
      f"{family.model_type} (it has no soft-capped attention); train without it."
    )
  if family.is_moe:
    wanted.update(router="top_k", router_bias=False, dense_moe_hybrid=False)
    wanted["score_fn"] = "sigmoid" if family.deepseek_router else "softmax"
    wanted["shared_expert_gate"] = family.shared == "gated"
    if family.always_renormalizes:
      wanted["renormalize"] = True
    if not family.deepseek_router:
      wanted.update(first_dense_layers=0, routed_scaling_factor=1.0, num_expert_groups=1)
    if family.shared != "counted":
      wanted["num_shared_experts"] = 1 if family.shared == "gated" else 0
    else:
      wanted["shared_expert_d_ff"] = None
    if not family.sparse_step_key:
      wanted["moe_layer_interval"] = 1
  else:
    wanted["num_experts"] = 0
  for key, value in wanted.items():
    if model[key] != value:
      raise ValueError(
        f"model.{key}={model[key]!r} cannot be written as {family.model_type} "
        f"(it needs {value!r}); pick another --family or train with that setting."
      )
