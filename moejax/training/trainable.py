"""Which parameters train: `train.trainable` (a preset or a regular expression) and
`train.frozen` (a regular expression) over parameter paths.

A parameter's path is its `/`-joined NNX path, e.g.
`stacks/0/period/blocks/0/moe/experts/w_in` or `stacks/0/period/blocks/1/attention/q_proj/kernel`
(`parameter_paths(model)` lists them). Scanned layers keep their weights stacked on a
leading `layers` axis, so one path holds that block slot of every repeat of a stack: a
pattern selects stacks and block slots, not single repeats. Patterns are searched anywhere
in the path (`re.search`); anchor them with `^` and `$` to match whole paths.

A parameter trains iff it matches `train.trainable` and does not match `train.frozen`.
Frozen parameters get no gradient, no optimizer state (`nnx.Optimizer(..., wrt=filter)`)
and no weight decay: a training step leaves them bit for bit as they were. Only
`nnx.Param`s are selected: the aux-loss-free balancing bias (not a parameter) keeps moving
while `model.bias_update_rate` > 0.

| preset | trains |
|---|---|
| `all` | every parameter (the default) |
| `all_but_moe` | everything but the MoE layers' routers, routed experts and shared experts ("freeze the MoE layers") |
| `only_moe` | only those: everything under a block's `moe/` |
| `only_router` | only the routers: `moe/router_kernel`, `moe/noise_kernel`, `moe/router_bias` |
| `attention_only` | only the attention layers (`attention/`: projections, their biases, QK-norm and MLA's norms) |
"""

from __future__ import annotations

import dataclasses
import re

import jax
import ml_collections
from flax import nnx

from moejax.training.tree_paths import path_name

_MOE = r"(^|/)moe/"
_ROUTER = r"(^|/)moe/(router_kernel|noise_kernel|router_bias)$"
_ATTENTION = r"(^|/)attention/"

# name -> (the pattern a path must match, or None: every path; whether to negate it)
PRESETS: dict[str, tuple[str | None, bool]] = {
  "all": (None, False),
  "all_but_moe": (_MOE, True),
  "only_moe": (_MOE, False),
  "only_router": (_ROUTER, False),
  "attention_only": (_ATTENTION, False),
}


def parameter_paths(model_or_state) -> list[str]:
  """The `/`-joined paths of the `nnx.Param`s of a Module (or of a model's state)."""
  state = (
    nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, nnx.Module)
    else model_or_state.filter(nnx.Param)
  )
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_variable)]


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
  """An NNX filter (`filter(path, value) -> bool`): the `nnx.Param`s whose path matches
  `trainable` (a preset name or a regex) and not `frozen` (a regex; '' freezes nothing).
  Hashable and comparable, so graphdefs holding it (the optimizer's `wrt`) compare equal."""

  trainable: str
  frozen: str = ""

  def selects(self, name: str) -> bool:
    """Whether the parameter at path `name` (`/`-joined) trains."""
    pattern, negate = PRESETS.get(self.trainable, (self.trainable, False))
    chosen = pattern is None or bool(re.search(pattern, name)) != negate
    return chosen and not (self.frozen and re.search(self.frozen, name))

  def __call__(self, path, value) -> bool:
    return isinstance(value, nnx.Param) and self.selects(path_name(path))


def _compile(key: str, pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as error:
    raise ValueError(
      f"config.train.{key}={pattern!r} is not a regular expression ({error})."
    ) from None


def trainable_filter(train_config: ml_collections.ConfigDict, model) -> nnx.filterlib.Filter:
  """The filter of the parameters of `model` (a Module, possibly abstract) that train under
  `train.trainable` and `train.frozen`: `nnx.Param` itself when every parameter trains.

  A one-line ValueError names the setting when a regex is malformed, when `trainable`
  (neither a preset nor a regex matching some parameter) or `frozen` matches no
  parameter, or when nothing is left to train.
  """
  trainable, frozen = train_config.trainable, train_config.frozen or ""
  presets = ", ".join(PRESETS)
  if trainable == "all" and not frozen:
    return nnx.Param
  if trainable not in PRESETS:
    _compile("trainable", trainable)
  if frozen:
    _compile("frozen", frozen)
  paths = parameter_paths(model)
  example = next((p for p in paths if "router_kernel" in p), paths[0])
  selected = TrainableFilter(trainable)
  if not any(selected.selects(p) for p in paths):
    what = (
      "this model has none of the parameters it selects"
      if trainable in PRESETS
      else f"it is neither a preset ({presets}) nor a regex matching a parameter path such as "
      f"{example!r}"
    )
    raise ValueError(f"config.train.trainable={trainable!r} matches no parameter: {what}.")
  if frozen and not any(re.search(frozen, p) for p in paths):
    raise ValueError(
      f"config.train.frozen={frozen!r} matches no parameter path (paths look like {example!r})."
    )
  chosen = TrainableFilter(trainable, frozen)
  if not any(chosen.selects(p) for p in paths):
    raise ValueError(
      f"config.train.frozen={frozen!r} freezes every parameter config.train.trainable="
      f"{trainable!r} selects: nothing would train."
    )
  return chosen
