"""`python -m experiments.ablations NAME [flags]` runs ablation NAME (same flags as
`python -m experiments.ablations.NAME`); `python -m experiments.ablations --describe
[--preset=P]` prints the arms and constraint checks of every ablation."""

from __future__ import annotations

import sys

from experiments.ablations import NAMES, get
from experiments.runner.cli import main


def run(argv: list[str]) -> int:
  if argv and argv[0] in NAMES:
    return main(get(argv[0]), argv[1:])
  if "--describe" in argv:
    code = 0
    for name in NAMES:
      code = max(code, main(get(name), argv))
      print()
    return code
  print(
    f"usage: python -m experiments.ablations NAME [flags] | --describe [--preset=P]; "
    f"NAME one of {', '.join(NAMES)}",
    file=sys.stderr,
  )
  return 2


if __name__ == "__main__":
  sys.exit(run(sys.argv[1:]))
