"""Command line: `python -m moejax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`.

Multi-host: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on every
process (on TPU pods `jax.distributed.initialize()` finds these by itself: pass
`--distributed`).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file, configs/NAME.py[:ARG].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-host: HOST:PORT of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Initialise jax.distributed from the environment (TPU pods, SLURM)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Full tracebacks on errors.")


def _initialize_distributed() -> None:
  multi_host = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in multi_host):
    if any(v is None for v in multi_host):
      raise ValueError(
        "multi-host needs all of --coordinator_address, --num_processes and --process_id."
      )
    import jax

    # Cross-process collectives of the CPU backend (no effect on GPU/TPU computations).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      _COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )
  elif _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()


def run(argv) -> None:
  del argv
  if _WORKDIR.value is None:
    raise ValueError("--workdir is required: the directory for checkpoints and metrics.")
  _initialize_distributed()
  import jax
  from moejax import data, train

  config = _CONFIG.value
  final = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0 and "eval/bits_per_byte" in final and not final["preempted"]:
    load = lambda split: data.load_split(
      config.data.name, split, config.data.data_dir, text_key=config.data.text_key
    )
    baseline = data.unigram_bits_per_byte(load("train"), load(config.data.eval_split))
    print(
      f"validation: {final['eval/bits_per_byte']:.3f} bits/byte "
      f"(unigram baseline {baseline:.3f}); train loss {final['train/loss']:.3f}, "
      f"{final['train/tokens_per_sec']:.0f} tokens/s"
    )


def parse_flags(argv):
  """absl's parser, with every flag or config-override error reduced to one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # absl and ml_collections raise several types here
    text = str(error)
    if "Traceback" in text:  # an error inside the config file's get_config: its last line
      text = text.strip().splitlines()[-1]
    message = " ".join(text.split())
    if isinstance(error, AttributeError):  # ml_collections: an unknown config key
      name = re.search(r"'(\w+)", message)
      arg = next((a for a in argv if name and f".{name.group(1)}=" in a), message)
      hint = re.search(r'Did you mean "(\w+)"', message)
      message = f"{arg.split('=')[0]} is not a config key" + (
        f"; did you mean {hint.group(1)!r}?" if hint else "; see moejax/config.py for the keys."
      )
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv) -> None:
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax/XLA info lines out of the way
  try:
    run(argv)
  except (ValueError, KeyError, TypeError, OSError, FloatingPointError, RuntimeError) as error:
    if _VERBOSE.value:
      raise
    message = " ".join(str(error).split())
    print(f"error: {message} (rerun with --verbose for the traceback)", file=sys.stderr)
    # 2: the command or its config is wrong; 1: the run failed.
    sys.exit(2 if isinstance(error, (ValueError, KeyError, TypeError)) else 1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
