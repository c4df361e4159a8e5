"""`MoeConfig`: every option of an MoE layer, checked once, where it is built.

`MoeConfig.from_model_config(config.model)` reads the `model.*` keys of an experiment
config (their meaning is commented in `moejax/config/defaults.py`); tests and notebooks build one
directly, `MoeConfig(num_experts=8, d_ff=64)`, or with `dataclasses.replace`.

An option that would do nothing in a combination is an error naming it, when its value
asks for something (`renormalize=True` with expert choice). Options whose neutral default
simply does not apply are ignored, and listed here:

| option | ignored when |
|---|---|
| `capacity_factor`, `eval_capacity_factor`, `min_capacity`, `group_size` | `dispatch='dropless'` (no capacity; dropless takes every assignment) |
| `dropless_buffer_factor`, `dropless_overflow` (default `'rounds'`) | any dispatch but `dropless`, or no expert axis > 1 |
| `second_expert_policy` (default `'all'`), `renormalize` (default False) | `router='expert_choice'` or `'dense'` |
| the load-balancing loss (0.0 is reported) | `router='expert_choice'` (balanced by construction) and `'dense'` (every token uses every expert) |
| `lb_pooling` | the load-balancing loss is not computed (the two routers above) |
"""

from __future__ import annotations

import dataclasses

from moejax.layers.activations import check_activation
from moejax.moe.balancing import LB_POOLINGS
from moejax.moe.routing import SCORE_FNS

ROUTERS = ("top_k", "noisy_top_k", "expert_choice", "dense")
TOKEN_CHOICE_ROUTERS = ("top_k", "noisy_top_k")
SECOND_EXPERT_POLICIES = ("all", "random")

DISPATCHES = ("auto", "einsum", "sort", "dropless")
DROPLESS_OVERFLOWS = ("rounds", "drop")
EXPERT_IMPLS = ("auto", "block_loop", "grouped_matmul")


def _choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(
      f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}."
    )


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """The options of one MoE layer (see `moejax/config/defaults.py` for each key's meaning).

  Attributes:
    num_experts: E, the routed experts.
    d_ff: hidden size of each routed expert.
    top_k: experts per token (token choice); for expert choice the average that sets the
      capacity; for `router='dense'` it must equal E.
    activation: one of `moejax.layers.activations.ACTIVATIONS`.
    router: 'top_k', 'noisy_top_k', 'expert_choice' or 'dense'.
    dispatch: 'auto', 'einsum', 'sort' or 'dropless' (`moejax.moe.dispatch`).
    expert_impl: 'auto', 'block_loop' or 'grouped_matmul' (`moejax.moe.experts`).
    capacity_factor: capacity = max(min_capacity, ceil(cf · S · k / E)) per routing group
      of S tokens, in training (the T·k/E convention).
    eval_capacity_factor: the same in eval mode.
    min_capacity: floor of the capacity.
    renormalize: rescale the chosen top-k gates to sum to 1 (Mixtral).
    second_expert_policy: 'all', or 'random' (GShard; needs top_k=2).
    router_jitter: Switch's multiplicative jitter eps on the router input, in training.
    expert_dropout: dropout rate on the expert hidden layer (ST-MoE).
    num_shared_experts: experts every token uses, as one dense FFN of hidden
      num_shared_experts · d_ff (DeepSeekMoE).
    group_size: tokens per routing group; None makes each sequence one group.
    dropless_buffer_factor: with dropless dispatch and an expert axis n > 1, each device
      receives at most factor × (its own routed rows) rows per exchange round
      (`moejax.moe.dropless_exchange`).
    dropless_overflow: what happens to rows past that buffer: 'rounds' (the default)
      moves them in further rounds, so nothing is ever dropped; 'drop' (an opt-in bound
      on time) drops them and counts them in `dropped_fraction`.
    score_fn: 'softmax' or 'sigmoid' router scores (DeepSeek-V3, Llama 4).
    routed_scaling_factor: multiplies every routed gate (DeepSeek-V2/V3).
    bias_update_rate: > 0 turns on auxiliary-loss-free balancing (Wang et al. 2024;
      DeepSeek-V3): a per-expert bias added to the scores for selection only, moved by
      this rate after every step (`TransformerLM.update_selection_biases`).
    num_expert_groups, topk_groups: group-limited routing (DeepSeek-V2/V3): experts in
      equal groups, each token choosing among its `topk_groups` best groups (None: all).
    lb_pooling: 'call' (f and P over every token of the step, pooled over all devices:
      the global batch) or 'group' (one loss per routing group, then the mean: Switch).
    router_bias: a trained bias on the router logits (Switch's `router_bias`).
    shared_expert_d_ff: the shared branch's hidden size; None: num_shared_experts · d_ff.
    shared_expert_gate: scale the shared branch by sigmoid(x · w) (Qwen2-MoE).
  """

  num_experts: int
  d_ff: int
  top_k: int = 2
  activation: str = "swiglu"
  router: str = "top_k"
  dispatch: str = "auto"
  expert_impl: str = "auto"
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  renormalize: bool = False
  second_expert_policy: str = "all"
  router_jitter: float = 0.0
  expert_dropout: float = 0.0
  num_shared_experts: int = 0
  group_size: int | None = None
  dropless_buffer_factor: float = 2.0
  dropless_overflow: str = "rounds"
  score_fn: str = "softmax"
  routed_scaling_factor: float = 1.0
  bias_update_rate: float = 0.0
  num_expert_groups: int = 1
  topk_groups: int | None = None
  lb_pooling: str = "call"
  router_bias: bool = False
  shared_expert_d_ff: int | None = None
  shared_expert_gate: bool = False

  def __post_init__(self):
    _choice("router", self.router, ROUTERS)
    _choice("dispatch", self.dispatch, DISPATCHES)
    _choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
    _choice("second_expert_policy", self.second_expert_policy, SECOND_EXPERT_POLICIES)
    _choice("score_fn", self.score_fn, SCORE_FNS)
    _choice("dropless_overflow", self.dropless_overflow, DROPLESS_OVERFLOWS)
    if self.dropless_overflow == "drop" and self.dispatch != "dropless":
      raise ValueError(
        f"dropless_overflow='drop' does nothing with dispatch={self.dispatch!r} (only "
        "dropless exchanges rows); set dispatch='dropless' or leave it at 'rounds'."
      )
    if self.lb_pooling == "global":
      raise ValueError(
        "lb_pooling='global' is what 'call' computes here: every step routes its whole global "
        "batch in one call, pooled over all devices (moejax has no micro-batches); use 'call'."
      )
    _choice("lb_pooling", self.lb_pooling, LB_POOLINGS)
    check_activation(self.activation)
    for name in ("num_experts", "d_ff"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    E = self.num_experts
    if not isinstance(self.top_k, int) or not 1 <= self.top_k <= E:
      raise ValueError(f"top_k={self.top_k!r} must be an int between 1 and num_experts={E}.")
    if self.router == "dense" and self.top_k != E:
      raise ValueError(
        f"router='dense' sends every token to every expert: set top_k=num_experts ({E}), "
        f"got top_k={self.top_k}."
      )
    if self.router == "expert_choice" and self.dispatch == "dropless":
      raise ValueError(
        "dispatch='dropless' needs token-choice routing; router='expert_choice' fixes the "
        "tokens per expert: use dispatch 'einsum' or 'sort'."
      )
    choice_free = self.router in ("expert_choice", "dense")
    if self.renormalize and choice_free:
      raise ValueError(
        f"renormalize=True does nothing with router={self.router!r} (no top-k gates to "
        "rescale); set renormalize=False."
      )
    if self.second_expert_policy == "random" and (choice_free or self.top_k != 2):
      raise ValueError(
        "second_expert_policy='random' needs a token-choice router with top_k=2, got "
        f"router={self.router!r}, top_k={self.top_k}."
      )
    for name in ("capacity_factor", "eval_capacity_factor", "dropless_buffer_factor"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)!r} must be > 0.")
    if not isinstance(self.min_capacity, int) or self.min_capacity < 1:
      raise ValueError(f"min_capacity={self.min_capacity!r} must be an int >= 1.")
    if not 0.0 <= self.router_jitter < 1.0:
      raise ValueError(f"router_jitter={self.router_jitter} must be in [0, 1).")
    if not 0.0 <= self.expert_dropout < 1.0:
      raise ValueError(f"expert_dropout={self.expert_dropout} must be in [0, 1).")
    if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
      raise ValueError(f"num_shared_experts={self.num_shared_experts!r} must be an int >= 0.")
    token_choice = self.router in TOKEN_CHOICE_ROUTERS
    for name, active in (
      ("score_fn='sigmoid'", self.score_fn == "sigmoid"),
      (f"bias_update_rate={self.bias_update_rate}", self.bias_update_rate != 0),
      (f"num_expert_groups={self.num_expert_groups}", self.num_expert_groups != 1),
      (f"routed_scaling_factor={self.routed_scaling_factor}", self.routed_scaling_factor != 1),
    ):
      if active and not token_choice:
        raise ValueError(
          f"{name} needs a token-choice router ('top_k' or 'noisy_top_k'), got "
          f"router={self.router!r}."
        )
    if not self.routed_scaling_factor > 0 or self.bias_update_rate < 0:
      raise ValueError(
        f"routed_scaling_factor={self.routed_scaling_factor} must be > 0 and "
        f"bias_update_rate={self.bias_update_rate} >= 0."
      )
    groups = self.num_expert_groups
    if not isinstance(groups, int) or groups < 1 or E % groups:
      raise ValueError(
        f"num_expert_groups={groups!r} must be a positive int dividing num_experts={E}."
      )
    if self.topk_groups is not None:
      if groups == 1 or not 1 <= self.topk_groups <= groups:
        raise ValueError(
          f"topk_groups={self.topk_groups!r} must be in [1, num_expert_groups={groups}] with "
          "num_expert_groups > 1 (or None: every group)."
        )
      if self.top_k > self.topk_groups * (E // groups):
        raise ValueError(
          f"top_k={self.top_k} exceeds the {self.topk_groups * (E // groups)} experts of "
          f"topk_groups={self.topk_groups} groups."
        )
    if self.num_shared_experts == 0 and (self.shared_expert_gate or self.shared_expert_d_ff):
      raise ValueError(
        "shared_expert_gate and shared_expert_d_ff do nothing without a shared expert; set "
        "num_shared_experts >= 1."
      )
    if self.shared_expert_d_ff is not None and (
      not isinstance(self.shared_expert_d_ff, int) or self.shared_expert_d_ff < 1
    ):
      raise ValueError(
        f"shared_expert_d_ff={self.shared_expert_d_ff!r} must be None or a positive int."
      )
    if self.group_size is not None:
      if not isinstance(self.group_size, int) or self.group_size < 1:
        raise ValueError(f"group_size={self.group_size!r} must be None or a positive int.")
      if self.dispatch == "dropless":
        raise ValueError(
          f"group_size={self.group_size} does nothing with dispatch='dropless' (routing "
          "groups set capacity); set group_size=None."
        )

  @classmethod
  def from_model_config(cls, model) -> MoeConfig:
    """The MoE options of a `config.model` ConfigDict (`expert_d_ff` None means `d_ff`)."""
    return cls(
      num_experts=model.num_experts,
      d_ff=model.expert_d_ff if model.expert_d_ff is not None else model.d_ff,
      **{f.name: model[f.name] for f in dataclasses.fields(cls) if f.name not in _DERIVED},
    )

  @property
  def shared_d_ff(self) -> int:
    """The hidden size of the shared branch (0: none)."""
    if not self.num_shared_experts:
      return 0
    return self.shared_expert_d_ff or self.num_shared_experts * self.d_ff

  def resolved_dispatch(self, platform: str) -> str:
    """The form `dispatch` runs as on `platform` ('cpu', 'gpu', 'tpu').

    'auto' keeps capacity semantics (the function of 'einsum' and 'sort'; never
    'dropless') and picks the faster form: 'einsum' on TPU, the form GShard, Switch and
    ST-MoE use there (all matmuls, which the MXU runs; gathers are slow on TPU); 'sort'
    on CPU and GPU (measured on CPU by `experiments/benchmarks/moe_layer.py`: 'einsum' is
    2.7-2.9x slower over one group of 4096 tokens, about 1.3x with groups of 512).
    """
    if self.dispatch != "auto":
      return self.dispatch
    return "einsum" if platform == "tpu" else "sort"

  def resolved_expert_impl(self, platform: str) -> str:
    """'block_loop' (`moejax.moe.block_ffn`) on CPU for 'auto', else 'grouped_matmul'."""
    if self.expert_impl != "auto":
      return self.expert_impl
    return "block_loop" if platform == "cpu" else "grouped_matmul"


_DERIVED = ("num_experts", "d_ff")
