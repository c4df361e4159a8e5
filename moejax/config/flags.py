"""The `--config` flag of the commands (`main`, `aot`, `upcycle`): its file found as
`load_config` finds it, its override keys checked before absl parses them, and the config
keys with their comments for `--help`.

Light to import: the config files (and jax with them) load only when the flags are parsed,
after the command has set up its signal handling."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from moejax.runtime.cli import flag_value, one_line


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
  """The command's `config_flags.DEFINE_config_file` flag called `name`."""

  name: str = "config"

  def resolve(self, args: list[str]) -> list[str]:
    """`args` with the flag's file resolved; raises a one-line error for a missing file, a
    failing `get_config` or an unknown override key (with a "did you mean")."""
    from moejax.config import text as config_text
    from moejax.config.load import load_config, resolve_spec

    found = flag_value(args, self.name)
    if found is None:
      return args  # absl reports the missing required flag
    index, spec = found
    resolved = resolve_spec(spec)
    try:
      config = load_config(resolved)
    except Exception as error:  # inside the config file's get_config
      raise ValueError(f"--{self.name}={spec}: {one_line(error)}") from error
    for arg_text in args:
      if arg_text.startswith(f"--{self.name}."):
        key = arg_text[len(self.name) + 3 :].split("=", 1)[0]
        config_text.check_key(config, key, flag=self.name)
    args = list(args)
    args[index] = args[index].replace(spec, resolved) if "=" in args[index] else resolved
    return args

  def help(self, args: Sequence[str]) -> str:
    """Every config key with its default (or the given config's value) and its comment."""
    from moejax.config import text as config_text
    from moejax.config.defaults import base_config
    from moejax.config.load import load_config

    found = flag_value(args, self.name)
    try:
      config = load_config(found[1]) if found else base_config()
    except Exception:  # a broken --config: list the defaults
      config = base_config()
    return "\n".join(
      [
        f"Config keys (set one with --{self.name}.KEY=VALUE; --print_config shows a "
        "config's values):",
        config_text.describe(config, indent="  "),
      ]
    )
