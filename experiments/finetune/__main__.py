"""`python -m experiments.finetune --preset=cpu --workdir=DIR` (see the package docstring;
the flags are the ablations' runner's)."""

import sys

from experiments.finetune import build, prepare
from experiments.runner.prerequisites import main_starting_from

if __name__ == "__main__":
  sys.exit(main_starting_from(build, prepare))
