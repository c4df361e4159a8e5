"""Finding and loading a config file (`configs/NAME.py[:ARG]`, a path, or a packaged
config) and applying dotted-key overrides to it."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from moejax.config.defaults import base_config
from moejax.config.text import check_key, flatten
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


# `--config=DIR`: the config file that returns a run directory's saved config.
SAVED_RUN_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_run.py")


def run_directory(spec: str) -> str | None:
  """The run, import or upcycle directory `spec` names (`DIR`, or `DIR/config.json`), or
  None when it names a config file."""
  if os.path.isfile(spec) and os.path.basename(spec) == "config.json":
    spec = os.path.dirname(spec) or "."
  return spec if os.path.isdir(spec) else None


def saved_run_config(directory: str) -> ml_collections.ConfigDict:
  """The config a run, import or upcycle directory saved in its `config.json`, with keys
  added to moejax since then at their defaults."""
  file = os.path.join(directory, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(
      f"{directory} is a directory without config.json: --config takes a config file "
      "(configs/NAME.py[:ARG]) or a run, import or upcycle directory."
    )
  with open(file, encoding="utf-8") as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{file} is not valid JSON ({error}).") from None
  return _typed(saved)


def _typed(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """The `saved` values set on `base_config()`: keys added since keep their defaults (as
  `config.text.from_saved` does), and each field keeps its declared type (a key saved as
  null stays overridable from the command line as its placeholder's type)."""
  out = base_config()
  for key, value in flatten(saved).items():
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      if part not in node:  # a section moejax no longer declares: kept as saved
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    try:
      node[leaf] = value
    except TypeError:  # a tuple field saved as a JSON list
      node[leaf] = tuple(value)
  return out


def resolve_spec(spec: str) -> str:
  """`spec` as a loadable `FILE[:ARG]`: a config file found as `config_file` finds it, or
  a run directory as `SAVED_RUN_CONFIG:DIR`."""
  directory = run_directory(spec)
  if directory is not None:
    return f"{SAVED_RUN_CONFIG}:{os.path.abspath(directory)}"
  path, sep, arg = spec.partition(":")
  return config_file(path) + sep + arg


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`configs/NAME.py[:ARG]` -> its `get_config(ARG)`, or a run, import or upcycle
  directory -> its saved config; then the dotted `overrides` (`{"model.top_k": 4}`)
  applied: the one loader every entry point, test and notebook uses."""
  path, _, arg = resolve_spec(spec).partition(":")
  full = config_file(path)
  module_name = "_moejax_config_" + os.path.splitext(os.path.basename(full))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, full)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"--config={path}: {full} is not a Python file.")
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
