"""A moejax model's state as a flat `{path: array}` map, and back: what the importer fills
and the exporter reads, without building (and initialising) the full model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from moejax.models.transformer import TransformerLM
from moejax.training import checkpoint as checkpoint_lib
from moejax.training import output_dir
from moejax.training import workdir as workdir_lib
from moejax.training.tree_paths import flat, path_name


def abstract_model(config: ml_collections.ConfigDict):
  """(graphdef, pure-dict state of `jax.ShapeDtypeStruct`s, the set of Param paths) of
  the model of `config`, nothing allocated."""
  build = lambda: TransformerLM(config.model, rngs=nnx.Rngs(config.train.seed))
  graphdef, state = nnx.split(nnx.eval_shape(build))
  params = set(flat(nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param))))
  return graphdef, nnx.to_pure_dict(state), params


def fresh_non_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model's state other than its parameters (RNG streams, selection biases) as a
  fresh model of `config` has it; the parameters are never materialised (XLA drops the
  unused initialisers)."""
  build = lambda: TransformerLM(config.model, rngs=nnx.Rngs(config.train.seed))
  return flat(jax.jit(lambda: nnx.to_pure_dict(nnx.state(build(), nnx.Not(nnx.Param))))())


def with_leaves(tree: Any, leaves: dict[str, Any]) -> Any:
  """`tree` with every leaf replaced by `leaves[its path]`."""
  return jax.tree_util.tree_map_with_path(lambda p, _: leaves[path_name(p)], tree)


def new_run_directory(workdir: epath.PathLike, flag: str = "--workdir") -> epath.Path:
  """`workdir` resolved, checked to be new or empty (nothing written is overwritten); the
  unfinished output of an interrupted command is replaced (`output_dir.new_directory`)."""
  return output_dir.new_directory(workdir, flag)


def save_model_run(
  path: epath.PathLike,
  tree: Any,
  config: ml_collections.ConfigDict,
  record_name: str,
  record: str,
  copies: Sequence[epath.Path] = (),
  *,
  command: str = "model-only run",
) -> None:
  """Writes a model-only run directory (new or empty): checkpoint 0 holding `tree` (a
  pure-dict model state), `config.json`, the files `copies` (by name: an import's
  tokenizer), and last `record_name` (JSON text `record`: where the weights came from).
  `output_dir.writing` marks the directory as written by `command` until the record is
  written, and removes what was written if writing fails or a signal stops the process,
  so the same command can be run again."""
  path = workdir_lib.resolve(path)
  with output_dir.writing(path, "--workdir", command):
    checkpoints = checkpoint_lib.Checkpointer(path, keep=1)
    try:
      checkpoints.save_model(0, tree, config)
    finally:
      checkpoints.close()
    workdir_lib.write_config(path, config, step=0, changes={})
    for source in copies:
      source.copy(path / source.name)
    workdir_lib.write_text_atomically(path / record_name, record)
