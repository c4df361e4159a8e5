"""Configs: every key with its default and comment (`defaults`), finding and loading config
files with overrides (`load`), a config as text (`text`: JSON, differences, key help), and
the `--config` flag of the commands (`flags`)."""

from moejax.config.defaults import apply_variant, base_config
from moejax.config.load import (
  CONFIGS_PACKAGE,
  apply_overrides,
  config_file,
  load_config,
  packaged_config_names,
)
from moejax.config.text import ConfigKeyError, flatten

__all__ = [
  "CONFIGS_PACKAGE",
  "ConfigKeyError",
  "apply_overrides",
  "apply_variant",
  "base_config",
  "config_file",
  "flatten",
  "load_config",
  "packaged_config_names",
]
