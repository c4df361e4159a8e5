"""Orbax checkpoints of the whole training state, the data position and the config.

A checkpoint at step N holds three items: `state` (the NNX state of model and optimizer
as a nested dict of arrays: parameters, Adam moments, the optimizer step, the RNG
streams), `data` (the grain iterator state, JSON) and `config` (the run's config, JSON;
`moejax.generate` rebuilds the model from it).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)


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


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class Checkpointer:
  """Saves and restores training checkpoints under `WORKDIR/checkpoints`.

  Orbax writes each checkpoint into a temporary folder and renames it when complete, so
  a run killed while saving leaves no half checkpoint among the steps. A checkpoint that
  is complete but unreadable (corrupted files) is moved to `WORKDIR/checkpoints_unreadable/`
  and the next older one is used.
  """

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.unreadable_directory = os.path.abspath(os.path.join(workdir, "checkpoints_unreadable"))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(
    self, step: int, state: nnx.State, data_state: dict[str, Any], config: ml_collections.ConfigDict
  ) -> None:
    pure = _keys_to_data(nnx.to_pure_dict(state))
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(pure),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict()),
      ),
      force=True,
    )

  def check_fits(self, state: nnx.State, step: int) -> None:
    """Raises ValueError naming the parameters whose saved shapes differ from `state`'s."""
    saved = {
      _path_name(p): tuple(m.shape)
      for p, m in jax.tree_util.tree_leaves_with_path(self._manager.item_metadata(step)["state"])
    }
    wanted = {
      _path_name(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_leaves_with_path(_keys_to_data(nnx.to_pure_dict(state)))
    }
    differ = [
      f"{name} {saved.get(name, 'absent')} -> {shape}"
      for name, shape in wanted.items()
      if saved.get(name) != shape
    ]
    differ += [f"{name} {shape} -> absent" for name, shape in saved.items() if name not in wanted]
    if differ:
      shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
      raise ValueError(
        f"the config does not fit the checkpoint at step {step} in {self.directory} "
        f"(saved -> config): {shown}. Use the run's original config or a new --workdir."
      )

  def restore(self, state: nnx.State, step: int | None = None):
    """Restores into `state` (in place), keeping its structure and shardings.

    Returns (step, state, data iterator state).
    """
    step = self.latest_step() if step is None else step
    template = nnx.to_pure_dict(state)
    target = _abstract(_keys_to_data(template))
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
    )
    nnx.replace_by_pure_dict(state, _data_to_keys(restored["state"], template))
    return step, state, restored["data"]

  def restore_newest_intact(self, state: nnx.State):
    """Restores the newest readable checkpoint; (0, state, None) when there is none.

    Unreadable checkpoints are moved aside with a warning naming them. A config whose
    shapes do not fit raises ValueError. If checkpoints exist but none can be read this
    raises RuntimeError rather than silently starting from scratch.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return 0, state, None
    self._fits_newest_readable(state, steps)
    skipped = []
    for step in steps:
      try:
        result = self.restore(state, step)
      except Exception as error:  # any read failure means this checkpoint is not usable
        skipped.append((step, " ".join(str(error).split())[:200]))
        continue
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
    raise RuntimeError(
      f"{self.directory} holds checkpoints at steps {steps}, but none can be "
      f"read (step {skipped[0][0]}: {skipped[0][1]}). Move them away to start "
      "afresh; nothing was changed."
    )

  def _fits_newest_readable(self, state, steps) -> None:
    for step in steps:
      try:
        self._manager.item_metadata(step)["state"]
      except Exception:
        continue
      self.check_fits(state, step)
      return

  def _move_aside(self, step: int) -> str:
    os.makedirs(self.unreadable_directory, exist_ok=True)
    destination = os.path.join(self.unreadable_directory, str(step))
    suffix = 0
    while os.path.exists(destination):
      suffix += 1
      destination = os.path.join(self.unreadable_directory, f"{step}.{suffix}")
    shutil.move(os.path.join(self.directory, str(step)), destination)
    self._manager.reload()
    return destination

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
