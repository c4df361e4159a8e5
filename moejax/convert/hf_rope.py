"""RoPE and its scaling in HF's `config.json`, read into `model.rope_*`/`model.yarn_*` and
written back (`moejax.layers.rope` computes them).

Two layouts: transformers 4 writes `rope_theta` and `rope_scaling: {"type" or "rope_type",
"factor", ...}` at the top level; transformers 5 writes `rope_parameters: {"rope_type",
"rope_theta", "factor", ...}`. Read: unscaled RoPE (`default`, or no scaling) and YaRN
(`yarn`: DeepSeek-V3's factor 40, Kimi K2's 32). Every other RoPE type, and any field of a
YaRN object moejax does not compute, is refused in one line naming it.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

# YaRN's fields in config.json -> (model key, least value, default when absent).
YARN_FIELDS: dict[str, tuple[str, float, Any]] = {
  "factor": ("rope_factor", 1.0, None),
  "original_max_position_embeddings": ("rope_original_max_len", 1, None),
  "beta_fast": ("yarn_beta_fast", 0.0, 32.0),
  "beta_slow": ("yarn_beta_slow", 0.0, 1.0),
  "mscale": ("yarn_mscale", 0.0, 1.0),
  "mscale_all_dim": ("yarn_mscale_all_dim", 0.0, 0.0),
}
_NAMING_KEYS = ("type", "rope_type", "rope_theta")


def _scaling(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """(the config.json key holding the RoPE object, the object), {} when unscaled."""
  parameters = hf.get("rope_parameters")
  if parameters:
    if "rope_theta" not in parameters:  # e.g. one RoPE per attention type
      raise ValueError(
        f"config.json: rope_parameters={parameters!r} is not supported by moejax (one RoPE "
        "for every layer: {'rope_type', 'rope_theta', ...})."
      )
    return "rope_parameters", parameters
  scaling = hf.get("rope_scaling")
  if scaling is not None and not isinstance(scaling, dict):
    raise ValueError(f"config.json: rope_scaling={scaling!r} must be an object or null.")
  return "rope_scaling", scaling or {}


def rope_type(hf: dict[str, Any]) -> str:
  """'default' or 'yarn'; a one-line ValueError for any other type."""
  key, scaling = _scaling(hf)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ("default", "yarn"):
    raise ValueError(
      f"config.json: {key}.rope_type={kind!r} is not supported by moejax (allowed: 'default', "
      "'yarn'); the imported model would compute a different function."
    )
  return kind


def set_rope(hf: dict[str, Any], model: ml_collections.ConfigDict) -> None:
  """Sets `model`'s RoPE keys from config.json `hf` (its base is read by the caller)."""
  model.rope_scaling = "none"
  if rope_type(hf) != "yarn":
    return
  key, scaling = _scaling(hf)
  extra = sorted(set(scaling) - set(YARN_FIELDS) - set(_NAMING_KEYS) - {"truncate"})
  if extra:
    raise ValueError(
      f"config.json: {key}.{extra[0]}={scaling[extra[0]]!r} is not supported by moejax (YaRN "
      f"reads {', '.join(YARN_FIELDS)} and truncate)."
    )
  values = dict(scaling)
  if values.get("original_max_position_embeddings") is None:
    values["original_max_position_embeddings"] = hf.get("max_position_embeddings")
  for field, (model_key, least, default) in YARN_FIELDS.items():
    value = values.get(field, default)
    if value is None:
      raise ValueError(f"config.json: {key}.{field} is missing; YaRN needs it.")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value >= least):
      raise ValueError(f"config.json: {key}.{field}={value!r} must be a number >= {least}.")
    model[model_key] = int(value) if model_key == "rope_original_max_len" else float(value)
  truncate = values.get("truncate", True)
  if not isinstance(truncate, bool):
    raise ValueError(f"config.json: {key}.truncate={truncate!r} must be true or false.")
  longest = hf.get("max_position_embeddings")
  if longest and not math.isclose(longest / model.rope_original_max_len, model.rope_factor):
    raise ValueError(
      f"config.json: {key}.factor={model.rope_factor} disagrees with max_position_embeddings"
      f"={longest} / original_max_position_embeddings={model.rope_original_max_len}; "
      "transformers reads the ratio in places, so the model is ambiguous."
    )
  model.rope_scaling, model.yarn_truncate = "yarn", truncate


def rope_scaling_json(model: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The `rope_scaling` object (transformers 4's layout) of `model`'s RoPE; None unscaled."""
  if model.rope_scaling == "none":
    return None
  out: dict[str, Any] = {"type": "yarn"}
  for field, (model_key, _, _) in YARN_FIELDS.items():
    out[field] = model[model_key]
  if not model.yarn_truncate:
    out["truncate"] = False
  return out


def same_scaling(a: Any, b: Any) -> bool:
  """Whether two `rope_scaling` values ask for the same RoPE, fields left at their defaults
  counting as given (a YaRN object without `beta_fast` is one with 32)."""

  def meaning(value: Any) -> Any:
    if not isinstance(value, dict):
      return value
    kind = value.get("rope_type", value.get("type", "default"))
    if kind != "yarn":
      return value
    fields = {field: value.get(field, default) for field, (_, _, default) in YARN_FIELDS.items()}
    return kind, fields, value.get("truncate", True)

  return meaning(a) == meaning(b)
