"""`python -m experiments.upcycle --preset=cpu --workdir=DIR` (see the package docstring;
the flags are the ablations' runner's)."""

import sys

from experiments.runner.prerequisites import main_starting_from
from experiments.upcycle import build, prepare

if __name__ == "__main__":
  sys.exit(main_starting_from(build, prepare))
