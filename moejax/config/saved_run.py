"""`--config=DIR`: the config a run, import or upcycle directory saved (its `config.json`),
so that an import is fine-tuned (`--config.train.init_from=DIR`) with no config file written."""

from __future__ import annotations

import ml_collections

from moejax.config.load import saved_run_config


def get_config(directory: str) -> ml_collections.ConfigDict:
  return saved_run_config(directory)
