"""Train: `python -m moejax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]`

Rerunning the same command resumes from the newest checkpoint in DIR (or, for a finished
run, prints its result). `--print_config` prints the resolved config with each key's
comment; `--dry_run` checks everything a run would check and says what it would do,
writing nothing. Exit codes: 0 done (or stopped by a signal with a checkpoint), 2 the
command is wrong, 1 the run failed, 130/143 interrupted before training started.

Multi-host: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on every
process (on TPU pods `jax.distributed.initialize()` finds these by itself: pass
`--distributed`).
"""

from __future__ import annotations

from moejax.runtime import signals

if __name__ == "__main__":  # first thing: a signal at any later moment ends it cleanly
  signals.handle_signals("nothing is lost: rerun the same command to continue.")


from absl import flags
from ml_collections import config_flags

from moejax.config.flags import ConfigFlag
from moejax.runtime import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file, configs/NAME.py[:ARG], or a run, import or upcycle directory (its saved config).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory (or gs:// URI) for checkpoints and metrics."
)
_PRINT_CONFIG = flags.DEFINE_bool(
  "print_config", False, "Print the resolved config, each key with its comment, and exit."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "Check the config, mesh and workdir, say what the run would do; write nothing."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume a run with a config that differs from its own (logged in config_changes.jsonl).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-host: HOST:PORT of process 0."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Initialise jax.distributed from the environment (TPU pods, SLURM)."
)


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


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if _PRINT_CONFIG.value:
    from moejax.config import text as config_text

    print(config_text.describe(config))
    return
  workdir = _WORKDIR.value
  if workdir is None:
    raise ValueError("--workdir is required: the directory for checkpoints and metrics.")
  _initialize_distributed()
  import jax

  from moejax.training import run_plan, train

  if _DRY_RUN.value:
    plan = run_plan.plan_run(config, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    print(run_plan.describe_plan(plan, config))
    print("dry run: nothing was written.")
    return
  if config.hardware.topology and jax.process_index() == 0 and not cli.QUIET.value:
    print(
      f"config made for {config.hardware.topology}; running on {jax.device_count()} "
      f"{jax.devices()[0].device_kind} devices"
    )
  final = train.train_and_evaluate(
    config,
    workdir,
    show_progress=not cli.QUIET.value,
    allow_config_change=_ALLOW_CONFIG_CHANGE.value,
  )
  if jax.process_index() != 0 or final["preempted"]:
    return
  if final["start_step"] >= config.train.num_steps:
    print(
      f"already at step {final['step']} of {config.train.num_steps} in {workdir}; nothing to train."
    )
  print(result_line(config, final))


def result_line(config, final) -> str:
  """`validation: 2.345 bits/byte (unigram baseline 4.84); train loss ..., N tokens/s`."""
  from moejax import data

  parts = []
  if "eval/bits_per_byte" in final and data.uses_token_stores(config.data):
    parts.append(
      f"validation: {final['eval/bits_per_byte']:.3f} bits/byte, {final['eval/loss']:.3f} "
      "nats/token"
    )
  elif "eval/bits_per_byte" in final:
    load = lambda split: data.load_split(
      config.data.name, split, config.data.data_dir, text_key=config.data.text_key
    )
    baseline = data.unigram_bits_per_byte(
      load(config.data.train_split), load(config.data.eval_split)
    )
    parts.append(
      f"validation: {final['eval/bits_per_byte']:.3f} bits/byte (unigram baseline {baseline:.3f})"
    )
  if "train/loss" in final:
    parts.append(f"train loss {final['train/loss']:.3f}")
  if "train/tokens_per_sec" in final:
    parts.append(f"{final['train/tokens_per_sec']:.0f} tokens/s")
  return "; ".join(parts) if parts else f"at step {final['step']}; no metrics recorded."


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main, config_flag=ConfigFlag("config"))
