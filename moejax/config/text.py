"""Configs as readable text: each key with the comment it is declared with, key checks with
a "did you mean" at every level, and the keys in which two configs differ.

The comments are read from the source of `moejax.config.base_config` (and of the functions
it takes whole sections from, such as `default_data_config`): the trailing `# comment` of
the line that sets the key, so the one place a key is declared is also its documentation.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import textwrap
import tokenize
from collections.abc import Callable
from typing import Any

import ml_collections

from moejax.runtime.cli import did_you_mean


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """`{"model.top_k": 2, ...}`: every leaf of a ConfigDict or nested dict under its dotted key."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON stores it (tuples become lists), for comparing with a saved one."""
  return json.loads(json.dumps(config.to_dict()))


@functools.cache
def _defaults() -> dict[str, Any]:
  from moejax.config import base_config

  return flatten(as_json(base_config()))


def from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config a run saved (`config.json`, a checkpoint's config, an ablation's arm.json),
  with every key added to moejax since then at its `base_config()` default: the same rule
  that lets such a run resume (see `differences`)."""

  def merged(defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(out.get(key), dict):
        out[key] = merged(out[key], value)
      else:
        out[key] = value
    return out

  from moejax.config import base_config

  return ml_collections.ConfigDict(merged(as_json(base_config()), saved))


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (old value, new value)}` for every key whose value differs, in key order
  (a key only one side has is shown with `'absent'` on the other).

  A key `old` lacks whose new value is its `base_config()` default is no difference: the
  key was added to moejax since `old` was saved, and a new key's default keeps the old
  behaviour, so runs saved before it was added still resume.
  """
  old, new = flatten(old), flatten(new)
  added_at_default = _defaults()
  keys = list(old) + [k for k in new if k not in old]
  return {
    k: (old.get(k, "absent"), new.get(k, "absent"))
    for k in keys
    if old.get(k, "absent") != new.get(k, "absent")
    and not (k not in old and k in added_at_default and new[k] == added_at_default[k])
  }


def format_differences(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
  """`model.renormalize False -> True; train.num_steps 600 -> 900` (at most `limit`)."""
  shown = [f"{k} {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:limit]]
  more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
  return "; ".join(shown) + more


class ConfigKeyError(KeyError):
  """A dotted key names no leaf of the config; `str()` is the one-line message (no quotes)."""

  def __str__(self) -> str:
    return str(self.args[0])


def check_key(
  config: ml_collections.ConfigDict, key: str, *, flag: str | None = "config", where: str = ""
) -> None:
  """Raises a one-line ConfigKeyError unless dotted `key` names a leaf of `config`: the one
  walker of dotted keys (the command line's `--config.KEY` and every override).

  The message corrects every level it can (`--config.modle.topk` -> did you mean
  `--config.model.top_k`?) and names a section given without a key. The key is written as
  `--FLAG.KEY`, or as `'KEY'` with `flag=None`; `where` prefixes the message.
  """

  def written(dotted: str) -> str:
    return f"--{flag}.{dotted}" if flag else repr(dotted)

  def fail(message: str):
    raise ConfigKeyError(where + message)

  parts = key.split(".")
  node, fixed = config, list[str]()
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict):
      fail(f"{written(key)}: {'.'.join(fixed)} is a key, not a section of the config.")
    if part in node:
      fixed.append(part)
    else:
      hint = did_you_mean(part, list(node.keys()), "{}")
      if not hint:
        fail(
          f"{written(key)} is not a config key: {'.'.join(fixed) or 'the config'} has no "
          f"{part!r} (its keys: {', '.join(node.keys())})."
        )
      fixed.append(hint)
    node = node[fixed[-1]]
  if isinstance(node, ml_collections.ConfigDict):
    section = ".".join(fixed)
    fail(
      f"{written(key)} is a section, not a key; its keys: {', '.join(f'{section}.{k}' for k in node)}."
    )
  if fixed != parts:
    fail(f"{written(key)} is not a config key; did you mean {written('.'.join(fixed))}?")


# ----------------------------------------------------------------------------- comments


def _comments_by_line(source: str) -> dict[int, str]:
  tokens = tokenize.generate_tokens(io.StringIO(source).readline)
  return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def _function_comments(function: Callable) -> tuple[dict[str, str], dict[str, Callable]]:
  """The trailing comments of the keys a config-building function sets:
  `section.key = value  # comment` and `"key": value,  # comment` in a dict literal.

  Returns ({dotted key: comment}, {section: function whose result it is}).
  """
  source = textwrap.dedent(inspect.getsource(function))
  comments = _comments_by_line(source)
  tree = ast.parse(source)
  aliases: dict[str, str] = {}  # local name -> section ('model = ConfigDict()' as config.model)
  out: dict[str, str] = {}
  sections: dict[str, Callable] = {}
  globals_ = function.__globals__

  def dotted(node) -> str | None:
    if isinstance(node, ast.Attribute):
      base = dotted(node.value)
      return None if base is None else f"{base}.{node.attr}" if base else node.attr
    if isinstance(node, ast.Name):
      return aliases.get(node.id, "" if node.id == "config" else None)
    return None

  for node in ast.walk(tree):
    if isinstance(node, ast.Assign):
      targets = [dotted(t) for t in node.targets]
      names = [t.id for t in node.targets if isinstance(t, ast.Name)]
      key = next((t for t in targets if t), None)
      if key is None:
        continue
      for name in names:  # `config.model = model = ...`
        aliases[name] = key
      if isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
        called = globals_.get(node.value.func.id)
        if callable(called) and called is not ml_collections.ConfigDict:
          sections[key] = called
      if node.end_lineno in comments:
        out[key] = comments[node.end_lineno]
  for node in ast.walk(tree):  # dict literals: {"name": value,  # comment}
    if isinstance(node, ast.Dict):
      for k, v in zip(node.keys, node.values, strict=True):
        if isinstance(k, ast.Constant) and isinstance(k.value, str) and v.end_lineno in comments:
          out.setdefault(k.value, comments[v.end_lineno])
  return out, sections


@functools.cache
def key_comments() -> dict[str, str]:
  """`{dotted key: comment}` for every key of `base_config` declared with a trailing comment."""
  from moejax import config as config_lib

  out, sections = _function_comments(config_lib.base_config)
  for section, function in sections.items():
    try:
      inner, _ = _function_comments(function)
    except (OSError, TypeError):  # no source (a C function, a frozen module)
      continue
    out.update({f"{section}.{k}": v for k, v in inner.items() if "." not in k})
  return out


def describe(config: ml_collections.ConfigDict, *, indent: str = "") -> str:
  """One line per key: `model.top_k = 2  # experts per token`, in the config's order."""
  comments = key_comments()
  lines = []
  for key, value in flatten(config).items():
    line = f"{indent}{key} = {value!r}"
    if comments.get(key):
      line = f"{line:<48s}  # {comments[key]}"
    lines.append(line)
  return "\n".join(lines)
