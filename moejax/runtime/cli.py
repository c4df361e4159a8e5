"""What every moejax command shares: one-line errors and exit codes, `--verbose`, signals.

Exit codes: 0 done; 2 the command is wrong (a flag, a config key or value, a path: fix the
command and rerun); 1 the run failed (missing data, unreadable files, non-finite values, a
crash); 128 + N stopped by signal N (130 for Ctrl-C, 143 for SIGTERM) before it finished.
Every error is one line on stderr, `error: WHAT; FIX`; `--verbose` prints the traceback
above that line and keeps the exit code.

An absl command is `cli.run(main, config_flag="config")`; its module calls
`moejax.runtime.signals.handle_signals()` first thing, before absl or jax load. Other front ends
(argparse: `python -m experiments.ablations`) call `handle_signals()` first too and
`report_error(error, verbose=...)` in their `except Exception`.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Protocol

from absl import app, flags
from absl import logging as absl_logging

from moejax.runtime import quiet
from moejax.runtime.signals import handle_signals, yield_to_stop

VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  "On an error, print the traceback above the one-line message, and the libraries' own logs.",
)
QUIET = flags.DEFINE_bool(
  "quiet", False, "Print only the result lines (warnings and errors still print)."
)

# ----------------------------------------------------------------------------- errors


# Status codes with which TensorStore (under Orbax) and XLA raise `ValueError` for what is
# no fault of the command: a full disk, an unreachable bucket, a dead peer.
_FAILED_RUN_STATUSES = (
  "RESOURCE_EXHAUSTED",
  "NOT_FOUND",
  "PERMISSION_DENIED",
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "DATA_LOSS",
  "ABORTED",
  "CANCELLED",
  "INTERNAL",
  "UNKNOWN",
)


def exit_code(error: BaseException) -> int:
  """2 when the command is wrong (bad flag, config key or value, path), 1 when the run
  failed (I/O, disk, network; a `ValueError` carrying a failed-run status or an operating
  system's error code, as TensorStore raises them, included)."""
  wrong_command = (ValueError, KeyError, TypeError, app.UsageError, flags.Error)
  if isinstance(error, ValueError):
    text = str(error).lstrip()
    if text.startswith(_FAILED_RUN_STATUSES) or "[os_error_code=" in text:
      return 1
  return 2 if isinstance(error, wrong_command) else 1


_OWN_TYPES = (ValueError, KeyError, TypeError, OSError, RuntimeError, FloatingPointError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (a KeyError without its quotes; the type of
  exceptions moejax does not raise itself, such as an IndexError deep in a library)."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    text = error.args[0]
  else:
    text = str(error)
  text = " ".join(text.split()) or type(error).__name__
  if not isinstance(error, _OWN_TYPES + (flags.Error, app.UsageError)):
    text = f"{type(error).__name__}: {text}"
  return text


def report_error(error: BaseException, *, verbose: bool, code: int | None = None) -> int:
  """Prints `error: MESSAGE` (with `verbose`, the traceback above it); returns the exit code.

  A signal that is ending the process (its cleanup made the failing write fail) ends it
  here instead (`signals.yield_to_stop`). A command's main then ends the process with
  `quiet.end_failed_command`."""
  yield_to_stop()
  code = exit_code(error) if code is None else code
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
  hint = " (rerun with --verbose for the traceback)" if code == 1 and not verbose else ""
  print(f"error: {one_line(error)}{hint}", file=sys.stderr, flush=True)
  return code


def did_you_mean(word: str, choices: Sequence[str], template: str = "; did you mean {}?") -> str:
  """`template` filled with the choice closest to `word`, or '' when none is close."""
  close = difflib.get_close_matches(word, list(choices), n=1)
  return template.format(close[0]) if close else ""


# ----------------------------------------------------------------------------- absl commands


class ConfigFlagLike(Protocol):
  """A command's config flag (`moejax.config.flags.ConfigFlag`): the commands pass it in, so
  this module stays below the config package."""

  def resolve(self, args: list[str]) -> list[str]: ...

  def help(self, args: Sequence[str]) -> str: ...


_HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")


def run(
  main: Callable[[list[str]], None],
  *,
  config_flag: ConfigFlagLike | None = None,
  subcommands: Sequence[str] = (),
) -> None:
  """Runs an absl command: signals handled from here on, flags parsed with one-line errors
  (exit 2), `main(argv)` with every exception reduced to one line (exit 2 or 1).

  `config_flag` is the command's `config_flags.DEFINE_config_file` flag as a
  `moejax.config.flags.ConfigFlag`: it resolves the flag's file and checks its override
  keys before absl parses them, and `--help` lists the config keys with their comments.
  With `subcommands`, the first argument must be one of them (`main` reads it in `argv[1]`).
  """
  handle_signals()
  app.run(
    functools.partial(_run_main, main, subcommands=tuple(subcommands)),
    flags_parser=functools.partial(parse_flags, config_flag=config_flag),
  )


def _run_main(
  main: Callable[[list[str]], None], argv: list[str], subcommands: tuple[str, ...] = ()
) -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax/XLA info lines out of the way
  quiet.quiet_libraries(verbose=VERBOSE.value)
  try:
    if subcommands and (len(argv) < 2 or argv[1] not in subcommands):
      given = f"{argv[1]!r} is not a command" if len(argv) > 1 else "no command given"
      raise app.UsageError(f"{given}; the commands: {', '.join(subcommands)}.")
    if len(argv) > 1 + bool(subcommands):
      extra = argv[1 + bool(subcommands)]
      raise app.UsageError(f"unexpected argument {extra!r}; every option is a --flag=VALUE.")
    main(argv)
  except Exception as error:  # every failure: one line and its exit code
    quiet.end_failed_command(report_error(error, verbose=VERBOSE.value), verbose=VERBOSE.value)


def flag_value(args: Sequence[str], name: str) -> tuple[int, str] | None:
  """(index, value) of the last `--name=VALUE` or `--name VALUE` in `args`."""
  found = None
  for i, arg in enumerate(args):
    for prefix in (f"--{name}", f"-{name}"):
      if arg.startswith(prefix + "="):
        found = (i, arg[len(prefix) + 1 :])
      elif arg == prefix and i + 1 < len(args):
        found = (i + 1, args[i + 1])
  return found


def _wants_verbose(args: Sequence[str]) -> bool:
  verbose = False
  for arg in args:
    if arg in ("--verbose", "-verbose"):
      verbose = True
    elif arg in ("--noverbose", "-noverbose"):
      verbose = False
    elif arg.startswith(("--verbose=", "-verbose=")):
      verbose = arg.split("=", 1)[1].lower() in ("1", "true", "t", "yes", "y")
  return verbose


def parse_flags(argv: list[str], *, config_flag: ConfigFlagLike | None = None) -> list[str]:
  """absl's parser, with every flag or config error reduced to one line and exit code 2."""
  args = argv[1:]
  verbose = _wants_verbose(args)
  try:
    if any(a in _HELP for a in args):
      print(help_text(args, config_flag))
      sys.exit(0)
    if config_flag is not None:
      argv = [argv[0], *config_flag.resolve(args)]
    return flags.FLAGS(argv)
  except SystemExit:
    raise
  except Exception as error:  # absl, ml_collections and the config file raise several types
    if verbose:
      traceback.print_exception(error, file=sys.stderr)
    sys.exit(report_error(_flag_error(error), verbose=False, code=2))


def _flag_error(error: Exception) -> Exception:
  """absl's flag errors, reworded: the flag, what is wrong, what it accepts."""
  if isinstance(error, flags.UnrecognizedFlagError):
    known = [n for n in flags.FLAGS if len(n) > 1]
    hint = did_you_mean(error.flagname, known, "; did you mean --{}?")
    return ValueError(f"--{error.flagname} is not a flag of this command{hint} (see --help)")
  if isinstance(error, flags.IllegalFlagValueError):
    text = " ".join(str(error).split())
    required = re.match(r"flag --(\w+)=None: Flag --\w+ must have a value other than None", text)
    if required and required.group(1) in flags.FLAGS:
      name = required.group(1)
      what = flags.FLAGS[name].help.rstrip(".")
      return ValueError(f"--{name} is required ({what}); see --help.")
    text = text[len("flag ") :] if text.startswith("flag ") else text
    name = text.split("=", 1)[0].lstrip("-")
    if name in flags.FLAGS and not name.startswith("config."):
      expected = flags.FLAGS[name].parser.syntactic_help
      if expected and expected not in text:
        text += f"; expected {expected}"
    return ValueError(text)
  return error


def help_text(args: Sequence[str], config_flag: ConfigFlagLike | None) -> str:
  """The command's docstring and flags; with a config flag, every config key with its
  default (or the given config's value) and its comment."""
  main_module = sys.modules["__main__"]
  parts = [(main_module.__doc__ or "").strip(), ""]
  for module in (sys.argv[0], __name__):
    text = flags.FLAGS.module_help(module)
    if text:
      parts.append(text)
  if config_flag is not None:
    parts += ["", config_flag.help(args)]
  return "\n".join(parts)
