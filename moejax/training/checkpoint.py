"""Orbax checkpoints of the whole training state, the data position and the config.

A checkpoint at step N holds four items: `state` (the NNX state of model and optimizer
as a nested dict of arrays: parameters, Adam moments, the optimizer step, the RNG
streams), `data` (the grain iterator state, JSON), `config` (the run's config, JSON;
`moejax.generate` rebuilds the model from it) and `checksums` (two sums per array of
`state`, `moejax.training.checksums`, JSON). Every restore recomputes the sums of what it read and
checks that floating arrays are finite: a checkpoint whose contents changed after it was
written is unreadable, like one whose files cannot be read (checkpoints written before
checksums, and those of imports and upcycles, are checked for finiteness only). The
directory is reached through `etils.epath` (local paths and `gs://` alike).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from moejax.runtime import quiet
from moejax.training import workdir as workdir_lib
from moejax.training.checksums import checksums, mismatches
from moejax.training.streamed_array import StreamedArray, StreamedArrayHandler
from moejax.training.tree_paths import path_name

log = logging.getLogger(__name__)


# When a checkpoint turns out unreadable, or a save fails, Orbax abandons the reads or
# writes of its other arrays; their errors, already reported once, stay out of the output.
quiet.drop_orphaned_orbax_tasks()


class DoesNotFit(ValueError):
  """A checkpoint that reads, but whose shapes differ from the model's (`check_fits`)."""


class NoneReadable(RuntimeError):
  """No checkpoint could be read; `skipped` holds each one's (step, reason)."""

  def __init__(self, message: str, skipped: list[tuple[int, str]]):
    super().__init__(message)
    self.skipped = skipped


def is_prng_key(x) -> bool:
  """Whether `x` is an array of typed PRNG keys (an NNX RNG stream's key)."""
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """Typed PRNG key arrays -> their raw uint32 data (what Orbax can store)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_prng_key(x) else x, tree)


def _data_to_keys(tree, template):
  def restore(value, like):
    if is_prng_key(like):
      return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    return value

  return jax.tree.map(restore, tree, template)


def _abstract(tree):
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's folder of a save in progress


def remove_incomplete(directory: epath.Path) -> list[epath.Path]:
  """Removes the temporary folders (`N.orbax-checkpoint-tmp-*`) of saves that never
  finished, the process killed mid-save, logging a note naming each; returns them."""
  if not directory.exists():
    return []
  removed = sorted(directory.glob(f"*{TMP_SUFFIX}*"))
  for path in removed:
    log.warning("removed %s, an incomplete checkpoint of an interrupted save", path)
    path.rmtree(missing_ok=True)
  return removed


def describe_failure(error: BaseException, limit: int = 200) -> str:
  """A read failure on one line of at most `limit` characters."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
  """Saves and restores training checkpoints under `WORKDIR/checkpoints`.

  Orbax writes each checkpoint into a temporary folder and renames it when complete, so
  a run killed while saving leaves no half checkpoint among the steps. A checkpoint that
  is complete but unreadable (corrupted files) is moved to `WORKDIR/checkpoints_unreadable/`
  and the next older one is used. The temporary folder of a save that was itself killed
  (`N.orbax-checkpoint-tmp-*`) is removed, with a note, by `remove_incomplete`. A gs://
  directory needs the `gcs` extra (Orbax asks google-cloud-storage about the bucket).

  With `create=False` nothing is created: a missing directory holds no checkpoints.
  """

  def __init__(self, workdir: epath.PathLike, *, keep: int, create: bool = True):
    root = workdir_lib.resolve(workdir)
    self.directory = root / "checkpoints"
    self.unreadable_directory = root / "checkpoints_unreadable"
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def remove_incomplete(self) -> list[epath.Path]:
    """Removes the folders of saves that never finished (see `remove_incomplete`)."""
    removed = remove_incomplete(self.directory)
    if removed:
      self._manager.reload()
    return removed

  def save(
    self, step: int, state: nnx.State, data_state: dict[str, Any], config: ml_collections.ConfigDict
  ) -> None:
    pure = _keys_to_data(nnx.to_pure_dict(state))
    sums, _ = checksums(pure)
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(pure),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict()),
        checksums=ocp.args.JsonSave(sums),
      ),
      force=True,
    )

  def _has_checksums(self, step: int) -> bool:
    return (self.directory / str(step) / "checksums").exists()

  def _verify(self, step: int, state, saved: dict | None) -> None:
    """Raises ValueError when the restored `state` (pure arrays) holds a non-finite float
    array, or differs from the `saved` checksums (None: none were written)."""
    found, nonfinite = checksums(state)
    if nonfinite:
      raise ValueError(
        f"checkpoint {step} holds non-finite values in {len(nonfinite)} arrays (e.g. "
        f"{nonfinite[0]}): its contents are corrupt"
      )
    differ = mismatches(saved or {}, found)
    if differ:
      raise ValueError(
        f"checkpoint {step}'s checksums differ from what was written in {len(differ)} "
        f"arrays (e.g. {differ[0]}): its contents are corrupt"
      )

  def save_model(self, step: int, model_state, config: ml_collections.ConfigDict) -> None:
    """Saves only a model's state (no optimizer, no data position) as checkpoint `step`:
    what an import or an upcycle writes. `model_state` is an `nnx.State` or its pure dict
    (arrays of any float dtype: `restore_model` casts to the model's). `restore_model` and
    `train.init_from` read it; a training run cannot resume from it (`holds_model_only`).

    Leaves may be `StreamedArray`s, made and written one block at a time (an import's
    stacked parameters). NumPy leaves are written without the defensive copy Orbax makes by
    default; this returns only once the write is complete, so the caller may reuse them
    afterwards."""
    if isinstance(model_state, nnx.State):
      model_state = nnx.to_pure_dict(model_state)
    pure = _keys_to_data(model_state)
    # Orbax's own handler for every leaf type but NumPy arrays.
    uncopied = ocp.type_handlers.create_type_handler_registry(
      *[(t, ocp.type_handlers.get_type_handler(t)) for t in (int, float, bytes, np.number, str)],
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (StreamedArray, StreamedArrayHandler()),
    )
    writer = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.PyTreeCheckpointHandler(type_handler_registry=uncopied),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )
    try:
      writer.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeSave({"0": pure}),
          data=ocp.args.JsonSave({}),
          config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True,
      )
      writer.wait_until_finished()
    finally:
      writer.close()
    self._manager.reload()

  def holds_model_only(self, step: int) -> bool:
    """Whether checkpoint `step` was written by `save_model` (no optimizer state)."""
    names = {
      path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(self._state_metadata(step))
    }
    return not any(name.startswith("1/") for name in names)

  def _state_metadata(self, step: int):
    return self._manager.item_metadata(step)["state"]

  def restore_model(self, model_state: nnx.State, step: int) -> nnx.State:
    """Restores the model part of checkpoint `step` (a training checkpoint's or one of
    `save_model`) into the State `model_state` (its variables replaced, shardings kept) and
    returns it; the optimizer state, if any, is not read. Raises ValueError naming the parameters whose saved shapes
    differ from `model_state`'s."""
    self.check_fits(model_state, step, model_only=True)
    template = nnx.to_pure_dict(model_state)
    target = _abstract(_keys_to_data(template))
    reader = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={
        "state": ocp.PyTreeCheckpointHandler(),
        "checksums": ocp.JsonCheckpointHandler(),
      },
    )
    try:
      restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target
      )
      sums = {"checksums": ocp.args.JsonRestore()} if self._has_checksums(step) else {}
      restored = reader.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            {"0": target}, restore_args={"0": restore_args}, partial_restore=True
          ),
          **sums,
        ),
      )
    finally:
      reader.close()
    self._verify(step, restored["state"], restored.get("checksums"))
    nnx.replace_by_pure_dict(model_state, _data_to_keys(restored["state"]["0"], template))
    return model_state

  def check_fits(self, state, step: int, *, model_only: bool = False) -> None:
    """Raises DoesNotFit naming the parameters whose saved shapes differ from `state`'s
    (arrays or abstract `jax.ShapeDtypeStruct`s); with `model_only`, `state` is a model's
    state and the saved optimizer state is not compared."""
    saved = {
      path_name(p): tuple(m.shape)
      for p, m in jax.tree_util.tree_leaves_with_path(self._state_metadata(step))
    }
    if model_only:
      saved = {name: shape for name, shape in saved.items() if name.startswith("0/")}
    pure = {"0": nnx.to_pure_dict(state)} if model_only else nnx.to_pure_dict(state)
    shapes = jax.eval_shape(_keys_to_data, pure)
    wanted = {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    differ = [
      f"{name} {saved.get(name, 'absent')} -> {shape}"
      for name, shape in wanted.items()
      if saved.get(name) != shape
    ]
    differ += [f"{name} {shape} -> absent" for name, shape in saved.items() if name not in wanted]
    if differ:
      shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
      raise DoesNotFit(
        f"the config does not fit the checkpoint at step {step} in {self.directory} "
        f"(saved -> config): {shown}. Use the run's original config or a new --workdir."
      )

  def restore(self, state: nnx.State, step: int | None = None):
    """Restores into `state` (in place), keeping its structure and shardings.

    Returns (step, state, data iterator state).
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise ValueError(f"{self.directory} holds no checkpoint to restore.")
    template = nnx.to_pure_dict(state)
    target = _abstract(_keys_to_data(template))
    sums = {"checksums": ocp.args.JsonRestore()} if self._has_checksums(step) else {}
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), **sums
      ),
    )
    self._verify(step, restored["state"], restored.get("checksums"))
    nnx.replace_by_pure_dict(state, _data_to_keys(restored["state"], template))
    return step, state, restored["data"]

  def restore_newest_intact(self, state: nnx.State):
    """Restores the newest readable checkpoint; (0, state, None) when there is none.

    Unreadable checkpoints are moved aside with a warning naming them. A config whose
    shapes do not fit raises ValueError. If checkpoints exist but none can be read this
    raises RuntimeError rather than silently starting from scratch.
    """
    steps = self.steps()
    if not steps:
      return 0, state, None
    self.check_fits_newest_readable(state)
    try:
      step, result, skipped = self.first_readable(lambda s: self.restore(state, s), steps)
    except NoneReadable as error:
      raise RuntimeError(f"{error} Nothing was changed.") from None
    for bad_step, reason in skipped:
      destination = self._move_aside(bad_step)
      log.warning(
        "checkpoint at step %d is unreadable (%s); moved it to %s and resumed from step %d",
        bad_step,
        reason,
        destination,
        step,
      )
    return result

  def first_readable(
    self,
    read: Callable[[int], Any],
    steps: list[int] | None = None,
    *,
    fatal: tuple[type[BaseException], ...] = (),
  ) -> tuple[int, Any, list[tuple[int, str]]]:
    """`read(step)` for `steps` (default: every complete checkpoint), newest first, until a
    call returns: (that step, what it returned, the (step, reason) of each call that raised
    before it). Any error but those of `fatal` (raised as they are) makes a checkpoint
    unreadable; NoneReadable (`none_readable`) when none is readable. Resuming, loading and
    `train.init_from` all choose their checkpoint so (the first two skip a checkpoint that
    does not fit its own config; `train.init_from` stops at one that does not fit the new
    model: `fatal=(DoesNotFit,)`)."""
    skipped: list[tuple[int, str]] = []
    for step in self.steps() if steps is None else steps:
      try:
        return step, read(step), skipped
      except fatal:
        raise
      except Exception as error:  # any read failure means this checkpoint is not usable
        skipped.append((step, describe_failure(error)))
    raise NoneReadable(self.none_readable(skipped), skipped)

  def none_readable(
    self, skipped: list[tuple[int, str]], advice: str = " Move them away to start afresh."
  ) -> str:
    """The message for checkpoints that all failed to read (`skipped`: (step, reason))."""
    reasons = "; ".join(f"step {step}: {reason}" for step, reason in skipped[:3])
    return (
      f"{self.directory} holds checkpoints at steps {[s for s, _ in skipped]}, but none "
      f"can be read ({reasons}).{advice}"
    )

  def check_fits_newest_readable(self, state: nnx.State) -> None:
    """`check_fits` against the newest checkpoint whose metadata can be read (if any)."""
    for step in self.steps():
      try:
        self._manager.item_metadata(step)["state"]
      except Exception:
        continue
      self.check_fits(state, step)
      return

  def _move_aside(self, step: int) -> epath.Path:
    self.unreadable_directory.mkdir(parents=True, exist_ok=True)
    destination = self.unreadable_directory / str(step)
    suffix = 0
    while destination.exists():
      suffix += 1
      destination = self.unreadable_directory / f"{step}.{suffix}"
    (self.directory / str(step)).rename(destination)
    self._manager.reload()
    return destination

  def restore_config_dict(self, step: int) -> dict[str, Any]:
    """The config saved with the checkpoint of `step`, as the JSON dict it was saved as.

    Raises ValueError naming the file when it is not valid JSON.
    """
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except ValueError as error:  # json.JSONDecodeError: a file that is not JSON
      file = self.directory / str(step) / "config"
      raise ValueError(f"{file} is not valid JSON ({describe_failure(error)})") from error
    return restored["config"]

  def wait_until_finished(self) -> None:
    """Returns once the previous save is written (Orbax finishes saves in a background
    thread, whose cross-process barriers must not interleave with other collectives)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
