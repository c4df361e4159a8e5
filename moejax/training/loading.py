"""A trained model from a run directory: `load_model(WORKDIR) -> (model, config, step)`.

Used by `moejax.load`, `moejax.generate`, `moejax.eval` and the notebooks; the directory
may be a training run's or one `moejax.convert import` or `moejax.upcycle` wrote. Only the
model is read, not the optimizer state. It reads the newest checkpoint
that can be read, as training resumes from, and changes nothing in the workdir: an
unreadable newer checkpoint is named in a warning and skipped, not moved.
"""

from __future__ import annotations

import logging
import os

from etils import epath
from flax import nnx

from moejax.config import text as config_text
from moejax.runtime.cli import did_you_mean
from moejax.training import checkpoint as checkpoint_lib
from moejax.training import output_dir
from moejax.training import workdir as workdir_lib

log = logging.getLogger(__name__)


def check_run_directory(workdir: epath.PathLike) -> epath.Path:
  """The resolved `workdir`; ValueError if it is missing (with a "did you mean" among its
  siblings), not a directory, the unfinished output of an import or upcycle, or holds no
  checkpoints."""
  path = workdir_lib.resolve(workdir)
  if not path.exists():
    hint = ""
    if not workdir_lib.is_remote(path) and path.parent.is_dir():
      siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
      close = did_you_mean(path.name, siblings, "{}")
      if close:
        hint = f"; did you mean {os.path.join(os.path.dirname(os.fspath(workdir)), close)}?"
    raise ValueError(f"--workdir={workdir} does not exist{hint}")
  if not path.is_dir():
    raise ValueError(f"--workdir={workdir} is a file, not a run directory.")
  output_dir.check_finished(workdir, "--workdir")  # an interrupted import or upcycle
  if not (path / "checkpoints").is_dir():
    raise ValueError(
      f"--workdir={workdir} holds no checkpoints/; train first: python -m moejax.main "
      f"--config=configs/NAME.py --workdir={workdir}"
    )
  return path


def load_model(workdir: epath.PathLike, step: int | None = None):
  """The model of the newest readable checkpoint in `workdir` (or of `step`), in eval mode.

  Returns (model, config, step). Raises ValueError for a workdir that is not a run
  directory or a `step` it does not hold, RuntimeError if no checkpoint can be read.
  """
  from moejax.training import steps as steps_lib  # the model and optimizer as training built them

  path = check_run_directory(workdir)
  checkpoints = checkpoint_lib.Checkpointer(path, keep=1_000_000, create=False)
  try:
    steps = checkpoints.steps()
    if not steps:
      raise ValueError(
        f"--workdir={workdir} holds no complete checkpoint yet; train (or resume) first "
        f"with python -m moejax.main --workdir={workdir} ..."
      )
    if step is not None:
      if step not in steps:
        raise ValueError(f"--step={step}: {workdir} holds checkpoints at steps {sorted(steps)}.")
      steps = [step]

    def read(candidate: int):
      config = config_text.from_saved(checkpoints.restore_config_dict(candidate))
      graphdef, state = nnx.split(steps_lib.build(config)[0])
      checkpoints.restore_model(state, candidate)
      return config, graphdef, state

    found, (config, graphdef, state), skipped = checkpoints.first_readable(read, steps)
    for bad_step, reason in skipped:
      log.warning(
        "checkpoint at step %d is unreadable (%s); using step %d", bad_step, reason, found
      )
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, config, found
  finally:
    checkpoints.close()


def load(workdir: epath.PathLike, step: int | None = None):
  """`model, config = moejax.load(WORKDIR)`: the model of the newest readable checkpoint of
  a run, an import or an upcycle (or of `step`), in eval mode, and its config.

  `logits, aux = model(tokens)` with tokens `[batch, seq]` int32 gives logits `[batch,
  seq, vocab]` float32 and the auxiliary outputs (losses, expert loads).
  """
  model, config, _ = load_model(workdir, step)
  return model, config
