"""The attention kinds, by `model.attention`: a new kind is one module defining an
`AttentionKind` (`moejax.layers.attention_kind`) and one line here."""

from __future__ import annotations

import ml_collections

from moejax.layers.attention import GQA
from moejax.layers.attention_kind import AttentionKind
from moejax.layers.mla import MLA

KINDS: dict[str, AttentionKind] = {kind.name: kind for kind in (GQA, MLA)}


def kind_of(model: ml_collections.ConfigDict) -> AttentionKind:
  """The kind of `model.attention`; ValueError naming the allowed values."""
  if model.attention not in KINDS:
    raise ValueError(
      f"config.model.attention={model.attention!r} is not an attention kind; allowed: "
      f"{', '.join(KINDS)}."
    )
  return KINDS[model.attention]
