"""Orbax checkpoints of the whole training state, the data position and the config.

A checkpoint at step N holds three items: `state` (the NNX state of model and optimizer
as a nested dict of arrays: parameters, Adam moments, the optimizer step, the RNG
streams), `data` (the grain iterator state, JSON) and `config` (the run's config, JSON;
`moejax.generate` rebuilds the model from it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)


def _keys_to_data(tree):
  """Typed PRNG key arrays -> their raw uint32 data (what Orbax can store)."""
  is_key = lambda x: isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _data_to_keys(tree, template):
  def restore(value, like):
    if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
    return value
  return jax.tree.map(restore, tree, template)


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
  """Saves and restores training checkpoints under `WORKDIR/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: nnx.State, data_state: dict[str, Any],
           config: ml_collections.ConfigDict) -> None:
    pure = _keys_to_data(state.to_pure_dict())
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(pure),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config.to_dict())), force=True)

  def restore(self, state: nnx.State, config: ml_collections.ConfigDict, step: int | None = None):
    """Restores into `state` (in place), keeping its structure and shardings.

    Returns (step, state, data iterator state).
    """
    step = self.latest_step() if step is None else step
    template = state.to_pure_dict()
    target = _abstract(_keys_to_data(template))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(state, _data_to_keys(restored["state"], template))
    return step, state, restored["data"]

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored["config"])

  def check_fresh_start(self) -> None:
    """Nothing to resume: make sure that is because nothing was ever saved here."""

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
