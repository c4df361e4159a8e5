"""Ablations of the MoE literature, each a base config plus named arms of config overrides,
a learning-rate sweep, seeds paired across arms and one pre-registered contrast.

    python -m experiments.ablations.NAME --preset={smoke,cpu,pod} --workdir=DIR [--seeds=0,1]
    python -m experiments.ablations.NAME --describe [--preset=...]   # arms, counts, constraints
    python -m experiments.ablations.NAME --estimate [--preset=...]   # projected wall time
    python -m experiments.ablations --describe                       # every ablation

NAME: one of NAMES. Each module here is a short declaration (`ABLATION`); the machinery
that runs them is `experiments.runner`. See docs/ablations.md.
"""

from __future__ import annotations

import importlib

NAMES = (
  "top_k",
  "frequency",
  "granularity",
  "dense_vs_moe",
  "capacity",
  "hybrid",
  "scaling",
  "balancing",
  "muon",
)


def get(name: str):
  """The `Ablation` of module `experiments.ablations.NAME`."""
  if name not in NAMES:
    raise ValueError(f"unknown ablation {name!r}; one of {', '.join(NAMES)}")
  return importlib.import_module(f"experiments.ablations.{name}").ABLATION
