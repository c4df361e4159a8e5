"""`python -m moejax.convert import|export`: HF-format checkpoints in and out of moejax.

    python -m moejax.convert import --from=DIR_OR_HUB_ID --workdir=OUT [--config=FILE]
    python -m moejax.convert export --workdir=RUN --to=DIR [--family=NAME] [--dtype=bfloat16]

`import` writes a run directory that `moejax.load`, `moejax.generate`, `moejax.eval` read
and that training fine-tunes from with `--config.train.init_from=OUT`; `--config` gives
the train/data/mesh settings such a run would use (its model section is replaced by the
checkpoint's). `--from` is a local directory, or a Hub id (ORG/NAME), downloaded with
`huggingface_hub` (the `hub` extra) where the Hub can be reached. Errors are one line:
exit 2 for a wrong command or input (a corrupt or non-regular file in `--from` included), 1
for a failed run. A SIGINT/SIGTERM removes what was written (exit 128 + N), so the same
command can be rerun.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from moejax.runtime.signals import handle_signals, set_signal_note


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m moejax.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--verbose", action="store_true", help="Print the traceback of an error.")
  commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  read = commands.add_parser("import", help="HF-format checkpoint -> moejax run directory.")
  read.add_argument("--from", dest="source", required=True, help="Checkpoint directory or Hub id.")
  read.add_argument("--workdir", required=True, help="The new run directory (new or empty).")
  read.add_argument("--config", help="A moejax config file for the train/data/mesh settings.")
  read.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
  write = commands.add_parser("export", help="moejax run directory -> HF-format checkpoint.")
  write.add_argument("--workdir", required=True, help="The run (trained, imported, upcycled).")
  write.add_argument("--to", required=True, help="The new checkpoint directory (new or empty).")
  write.add_argument("--family", help="model_type to write (default: imported, else inferred).")
  write.add_argument(
    "--dtype", help="float32, bfloat16 or float16 (default: as imported, else float32)."
  )
  write.add_argument("--step", type=int, help="The checkpoint step (default: the newest).")
  write.add_argument("--max_shard_gib", type=float, default=5.0, help="Largest file, in GiB.")
  write.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
  return parser


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(source: str) -> str:
  """A local directory as given; a Hub id (ORG/NAME) that is not a local path downloaded
  (config and safetensors only) into the Hub's cache. One-line errors either way."""
  if os.path.exists(source) or not HUB_ID.match(source):
    return source
  try:
    import huggingface_hub
  except ImportError:
    raise ValueError(
      f"--from={source} is not a local directory; as a Hub id it needs huggingface_hub "
      "(pip install 'moejax[hub]') and a reachable Hub."
    ) from None
  try:
    return huggingface_hub.snapshot_download(source, allow_patterns=["*.json", "*.safetensors"])
  except Exception as error:
    raise RuntimeError(
      f"--from={source}: could not download it from the Hub ({type(error).__name__}); "
      "the Hub is reachable from Colab, not from every machine: download it where it is "
      "and pass the directory."
    ) from None


def main(argv: list[str] | None = None) -> int:
  handle_signals()
  args = _parser().parse_args(argv)
  # What a SIGINT/SIGTERM leaves: the partial output is removed (`output_dir.writing`).
  flag = "--workdir" if args.command == "import" else "--to"
  set_signal_note(f"what was written to {flag} is removed: rerun the same command.")
  from moejax.runtime import quiet
  from moejax.runtime.cli import report_error

  quiet.quiet_libraries(verbose=args.verbose)  # Orbax's logs of a failed write: --verbose only
  try:
    from moejax.convert import transfer

    if args.command == "import":
      base = None
      if args.config:
        from moejax.config import load_config

        base = load_config(args.config)
      summary = transfer.import_checkpoint(resolve_source(args.source), args.workdir, base)
      print(
        f"imported {summary['family']}: {summary['tensors']} tensors, "
        f"{summary['bytes'] / 2**30:.2f} GiB in {summary['seconds']:.1f} s -> {summary['workdir']}"
      )
    else:
      summary = transfer.export_checkpoint(
        args.workdir,
        args.to,
        family=args.family,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gib * 2**30),
        step=args.step,
      )
      print(
        f"exported {summary['family']}: {summary['tensors']} tensors in "
        f"{len(summary['files'])} files in {summary['seconds']:.1f} s -> {summary['destination']}"
      )
  except Exception as error:  # one line and its exit code
    quiet.end_failed_command(report_error(error, verbose=args.verbose), verbose=args.verbose)
  return 0


if __name__ == "__main__":
  sys.exit(main())
