"""Finding and loading a config file (`configs/NAME.py[:ARG]`, a path, or a packaged
config) and applying dotted-key overrides to it."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from moejax.config.text import check_key
from moejax.runtime.cli import did_you_mean

CONFIGS_PACKAGE = "moejax.configs"  # the repository's `configs/`, installed with the package


def packaged_config_names() -> list[str]:
  """The NAMEs of the repository's `configs/NAME.py`."""
  packaged = importlib.resources.files(CONFIGS_PACKAGE)
  return sorted(
    f.name[:-3] for f in packaged.iterdir() if f.name.endswith(".py") and f.name != "__init__.py"
  )


def config_file(path: str) -> str:
  """The experiment file `path` names: as given (absolute, or relative to the working
  directory), else `configs/NAME.py` from the installed package. A one-line
  FileNotFoundError lists the configs there is when neither exists."""
  if os.path.isfile(path):
    return os.path.abspath(path)
  packaged = importlib.resources.files(CONFIGS_PACKAGE)
  name = os.path.basename(path)
  if os.path.dirname(path) in ("configs", "") and packaged.joinpath(name).is_file():
    return str(packaged.joinpath(name))
  known = packaged_config_names()
  hint = did_you_mean(os.path.splitext(name)[0], known, "did you mean configs/{}.py? ")
  raise FileNotFoundError(f"config file {path} does not exist; {hint}configs: {', '.join(known)}.")


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`configs/NAME.py[:ARG]` -> its `get_config(ARG)`, then the dotted `overrides`
  (`{"model.top_k": 4}`) applied: the one loader every entry point, test and notebook uses."""
  path, _, arg = spec.partition(":")
  full = config_file(path)
  module_name = "_moejax_config_" + os.path.splitext(os.path.basename(full))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return apply_overrides(module.get_config(arg), overrides or {})


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = ""
) -> ml_collections.ConfigDict:
  """Sets dotted keys on `config` in place (type-checked by ml_collections); returns it.

  An unknown key raises a one-line ConfigKeyError (`config.text.check_key`) with the
  closest key; `where` prefixes it.
  """
  for key, value in overrides.items():
    check_key(config, key, flag=None, where=where)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as error:
      raise TypeError(f"{where}{key}={value!r}: {' '.join(str(error).split())}") from None
  return config
