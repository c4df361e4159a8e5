"""`train.init_from`: a fresh run's model from another run directory's newest readable
checkpoint, for fine-tuning.

The directory is any moejax workdir with `checkpoints/`: a training run (its model is read,
not its optimizer state), or one an import or an upcycle wrote with
`Checkpointer.save_model`. Everything of the model is taken but its RNG streams: the
parameters and state such as the aux-loss-free selection bias. The RNG streams (router
noise, dropout) are the new run's own, from `train.seed`, so a fine-tune may turn dropout
on or off; its optimizer is new and its step 0. It is read once: a run whose own workdir
holds a checkpoint resumes from that and does not read `init_from` again.

The directory is only read. Every process reads its shards of the same checkpoint, as a
resume does; an unreadable checkpoint is skipped with a warning (not moved aside), and the
next older one is used.
"""

from __future__ import annotations

import logging

import jax
from etils import epath
from flax import nnx

from moejax.config import text as config_text
from moejax.models.transformer import TransformerLM
from moejax.parallel import sharding
from moejax.training import checkpoint as checkpoint_lib
from moejax.training import output_dir
from moejax.training import workdir as workdir_lib

log = logging.getLogger(__name__)

_SETTING = "config.train.init_from"


def _open(directory: epath.PathLike) -> checkpoint_lib.Checkpointer:
  path = workdir_lib.resolve(directory)
  output_dir.check_finished(directory, _SETTING)  # an interrupted import or upcycle
  if not (path / "checkpoints").is_dir():
    raise ValueError(
      f"{_SETTING}={directory} holds no checkpoints/: it must be a run directory (a training "
      "run's, or one an import or an upcycle wrote)."
    )
  return checkpoint_lib.Checkpointer(path, keep=1_000_000, create=False)


def _rng_streams(checkpoints, step: int, mesh):
  """The RNG streams of the model that checkpoint `step` was saved from (its own config's):
  abstract without a mesh, else arrays replicated on `mesh`."""
  saved = config_text.from_saved(checkpoints.restore_config_dict(step)).model
  streams = lambda: nnx.state(TransformerLM(saved, rngs=nnx.Rngs(0)), nnx.RngState)
  if mesh is None:
    return nnx.eval_shape(streams)
  return jax.jit(streams, out_shardings=sharding.replicated(mesh))()


def _target(checkpoints, step: int, model_state: nnx.State, mesh) -> nnx.State:
  """What checkpoint `step` is read into: `model_state`'s variables but its RNG streams, and
  the checkpoint's own RNG streams (read and dropped: the run keeps its own)."""
  own = model_state.filter(nnx.Not(nnx.RngState))
  return nnx.merge_state(own, _rng_streams(checkpoints, step, mesh))


def _fit(checkpoints, step: int, target, directory) -> None:
  try:
    checkpoints.check_fits(target, step, model_only=True)
  except checkpoint_lib.DoesNotFit as error:
    text = str(error)
    text = text[: text.find(" Use the run's")] if " Use the run's" in text else text
    raise checkpoint_lib.DoesNotFit(
      f"{_SETTING}={directory}: {text} Fine-tuning keeps the model's shapes: take the model "
      "keys of the config saved there."
    ) from None


def _newest(directory: epath.PathLike, read):
  """(step, `read(checkpoints, step)`) for the newest checkpoint in `directory` that `read`
  reads without an error. One that reads but does not fit the model (DoesNotFit) ends the
  search; unreadable ones are skipped, with a warning."""
  checkpoints = _open(directory)
  try:
    if not checkpoints.steps():
      raise ValueError(f"{_SETTING}={directory} holds no complete checkpoint.")
    try:
      step, result, skipped = checkpoints.first_readable(
        lambda s: read(checkpoints, s), fatal=(checkpoint_lib.DoesNotFit,)
      )
    except checkpoint_lib.NoneReadable as error:  # the directory is only read: no advice to move
      text = checkpoints.none_readable(error.skipped, advice="")
      raise RuntimeError(f"{_SETTING}={directory}: {text}") from None
    for bad_step, reason in skipped:
      log.warning("%s: checkpoint at step %d is unreadable (%s)", _SETTING, bad_step, reason)
    return step, result
  finally:
    checkpoints.close()


def check_init_from(directory: epath.PathLike, abstract_model_state: nnx.State) -> int:
  """The step of the checkpoint in `directory` a fresh run would start from, reading only
  metadata and configs: the newest readable one, checked against the new model's shapes
  (`abstract_model_state`, from `nnx.eval_shape`). A one-line ValueError names
  `train.init_from` when there is none or the shapes differ."""

  def read(checkpoints, step: int) -> None:
    _fit(checkpoints, step, _target(checkpoints, step, abstract_model_state, None), directory)

  return _newest(directory, read)[0]


def restore_init_from(
  directory: epath.PathLike, model_state: nnx.State, mesh
) -> tuple[nnx.State, int]:
  """`model_state` (a fresh run's model state, in its shardings on `mesh`) with everything
  but its RNG streams replaced by the model of the newest readable checkpoint in
  `directory`, and that checkpoint's step. Shapes that differ: a one-line ValueError naming
  `train.init_from` and the parameters."""

  def read(checkpoints, step: int) -> nnx.State:
    target = _target(checkpoints, step, model_state, mesh)
    _fit(checkpoints, step, target, directory)
    return checkpoints.restore_model(target, step)

  step, restored = _newest(directory, read)
  log.info("%s: the model of %s at step %d", _SETTING, directory, step)
  return nnx.merge_state(model_state, restored.filter(nnx.Not(nnx.RngState))), step
