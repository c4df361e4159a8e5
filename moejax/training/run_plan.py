"""What a run will do, checked before anything is written: the train config, the mesh (with
the sizes that would fit), and the workdir's state (fresh, resumable, finished, or a
resume whose config changed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from moejax import data as data_lib
from moejax.config import text as config_text
from moejax.data.pipeline import check_data
from moejax.parallel import sharding
from moejax.training import checkpoint as checkpoint_lib
from moejax.training import workdir as workdir_lib
from moejax.training.init_from import check_init_from
from moejax.training.steps import OPTIMIZERS, build, optimizer_state_bytes

log = logging.getLogger(__name__)


NONFINITE_POLICIES = ("stop", "skip")


# The real-valued train keys: (key, lowest, lowest allowed?, highest, highest allowed?, what).
_REAL_KEYS = (
  ("learning_rate", 0.0, False, math.inf, False, "a finite number > 0"),
  ("min_learning_rate_ratio", 0.0, True, 1.0, True, "a number in [0, 1]"),
  ("weight_decay", 0.0, True, math.inf, False, "a finite number >= 0"),
  ("adam_b1", 0.0, True, 1.0, False, "a number in [0, 1)"),
  ("adam_b2", 0.0, True, 1.0, False, "a number in [0, 1)"),
  ("grad_clip_norm", 0.0, False, math.inf, False, "a finite number > 0"),
  ("muon_momentum", 0.0, True, 1.0, False, "a number in [0, 1)"),
  ("muon_update_rms", 0.0, False, math.inf, False, "a finite number > 0"),
)


def _in_range(value, low, low_ok, high, high_ok) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return False
  return (value > low or (low_ok and value == low)) and (
    value < high or (high_ok and value == high)
  )


def validate_train_config(tc: ml_collections.ConfigDict) -> None:
  """A one-line ValueError naming the first `config.train` key whose value cannot train:
  counts and intervals positive integers, `warmup_steps` an integer in [0, num_steps), `seed` an
  integer, the learning rate, its decay ratio, weight decay, Adam's betas, the clipping
  norm and Muon's settings finite and in range (`_REAL_KEYS`), `optimizer` one of
  `OPTIMIZERS`, `nonfinite_policy` one of `NONFINITE_POLICIES`."""
  is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
  for key in (
    "num_steps",
    "batch_size",
    "seq_len",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
  ):
    if not is_int(tc[key]) or tc[key] < 1:
      raise ValueError(f"config.train.{key}={tc[key]!r} must be a positive integer.")
  if not is_int(tc.warmup_steps) or not 0 <= tc.warmup_steps < tc.num_steps:
    raise ValueError(
      f"config.train.warmup_steps={tc.warmup_steps!r} must be an integer in [0, "
      f"train.num_steps={tc.num_steps})."
    )
  if not is_int(tc.seed):
    raise ValueError(f"config.train.seed={tc.seed!r} must be an integer.")
  if tc.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.train.optimizer={tc.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}.")
  if tc.nonfinite_policy not in NONFINITE_POLICIES:
    raise ValueError(
      f"config.train.nonfinite_policy={tc.nonfinite_policy!r}; allowed: "
      f"{', '.join(NONFINITE_POLICIES)}."
    )
  for key, low, low_ok, high, high_ok, allowed in _REAL_KEYS:
    if not _in_range(tc[key], low, low_ok, high, high_ok):
      raise ValueError(f"config.train.{key}={tc[key]!r} must be {allowed}.")


# ----------------------------------------------------------------------------- before the loop

# Keys a resumed run may change without --allow_config_change: they decide when to log,
# evaluate and save, where the data is, and how devices are laid out (every `mesh.` and
# `hardware.` key), not what is computed.
RESUMABLE_KEYS = frozenset(
  {
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.data_dir",
  }
)


def _resumable(key: str) -> bool:
  return key in RESUMABLE_KEYS or key.startswith(("mesh.", "hardware."))


def check_mesh(mesh, config: ml_collections.ConfigDict):
  """`mesh` if it fits `config`'s model and batch (`sharding.validate_mesh`: expert count,
  batch and routing groups), else a one-line ValueError; the one check every entry point
  (training, the ahead-of-time compile, the benchmarks) makes."""
  m, tc = config.model, config.train
  sharding.validate_mesh(
    mesh,
    num_experts=m.num_experts,
    global_batch_size=tc.batch_size,
    seq_len=tc.seq_len,
    group_size=m.group_size,
  )
  return mesh


def fitting_meshes(config: ml_collections.ConfigDict, num_devices: int) -> list[dict[str, int]]:
  """The `{'data': d, 'expert': e}` splits of `num_devices` that `sharding.validate_mesh`
  accepts for this model and batch (other mesh axes at 1)."""
  fits = []
  for expert in range(1, num_devices + 1):
    if num_devices % expert:
      continue
    sizes = {name: 1 for name in sharding.MESH_AXES}
    sizes.update({sharding.MESH_AXES[0]: num_devices // expert, sharding.EXPERT: expert})
    mesh = types.SimpleNamespace(
      axis_names=tuple(sizes), axis_sizes=tuple(sizes.values()), shape=sizes
    )
    try:
      check_mesh(mesh, config)
    except ValueError:
      continue
    fits.append(sizes)
  return fits


def make_run_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The mesh of `config.mesh` over `devices` (default: all devices), checked against the
  model and batch; a mesh that does not fit raises a one-line ValueError that lists the
  sizes that would (on one slice)."""
  try:
    mesh = check_mesh(
      sharding.make_mesh(config.mesh, devices, num_slices=config.hardware.num_slices), config
    )
  except ValueError as error:
    if config.hardware.num_slices > 1:  # the sizes below are for one slice
      raise ValueError(" ".join(str(error).split())) from None
    devices = jax.device_count() if devices is None else len(devices)
    fits = fitting_meshes(config, devices)
    if fits:
      options = ", ".join(
        " ".join(f"--config.mesh.{k}={v}" for k, v in sizes.items() if k in config.mesh)
        for sizes in fits
      )
      hint = f"Sizes that fit the {devices} devices: {options}."
    else:
      hint = (
        f"No data x expert split of the {devices} devices fits: make train.batch_size a "
        f"multiple of {devices}"
        + (" and model.num_experts divisible by mesh.expert." if config.model.num_experts else ".")
      )
    raise ValueError(f"{' '.join(str(error).split())} {hint}") from None
  return mesh


@dataclasses.dataclass
class RunPlan:
  """What a run will do, found out before anything is written.

  `workdir` resolved; `mesh` checked against the model and batch; `steps` of the
  checkpoints already there (newest first); `changes`, the config keys that differ from
  the run's saved config (`{key: (saved, now)}`); `num_params` of the model, of which
  `num_trainable` train; `optimizer_bytes`, the optimizer state's size over all devices;
  `init_from_step`, the step of the `train.init_from` checkpoint a fresh run starts from
  (None: a resume, or no `init_from`).
  """

  workdir: epath.Path
  mesh: jax.sharding.Mesh
  steps: list[int]
  changes: dict[str, tuple[Any, Any]]
  num_params: int
  num_trainable: int
  optimizer_bytes: int
  init_from_step: int | None = None

  @property
  def resume_step(self) -> int:
    return self.steps[0] if self.steps else 0


def plan_run(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> RunPlan:
  """Every check a run makes before it writes anything (ValueError with one line each):
  the train, model and optimizer settings, the mesh, the workdir, the fit of the config
  to the checkpoints there, and, when resuming, that the config is the run's own.

  A resumed run whose config differs from the one saved with its newest readable
  checkpoint (or in `config.json`, before the first checkpoint) in keys outside
  `RESUMABLE_KEYS` and `mesh.` is refused unless `allow_config_change`. A workdir whose
  newest checkpoint holds a model only (an import's or upcycle's) is refused: it is
  fine-tuned from with `train.init_from`. A fresh run with `train.init_from` checks that
  the directory holds a readable checkpoint that fits the model.

  The data is checked without reading it (`moejax.data.pipeline.check_data`: the dataset
  and its splits). A run on token stores checks them first (`moejax.data.token_data`), and takes
  `model.vocab_size` from their tokenizer where it is the byte vocabulary: `config` is
  updated in place, so the saved config records it.
  """
  validate_train_config(config.train)
  check_data(config.data)
  data_lib.check_init_from_tokenizer(config.data, config.train.init_from)
  data_lib.resolve_vocab_size(config)
  model, optimizer = nnx.eval_shape(lambda: build(config)[:2])
  _, abstract_state = nnx.split((model, optimizer))
  size = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))
  num_params = size(nnx.state(model, nnx.Param))
  num_trainable = size(nnx.state(model, optimizer.wrt))
  mesh = make_run_mesh(config)
  path = workdir_lib.check(workdir)
  steps, saved = [], None
  if path.exists():
    checkpoints = checkpoint_lib.Checkpointer(
      path, keep=config.train.keep_checkpoints, create=False
    )
    try:
      steps = checkpoints.steps()
      _refuse_model_only(checkpoints, steps, workdir)
      checkpoints.check_fits_newest_readable(abstract_state)
      saved = _newest_saved_config(checkpoints, steps)
    finally:
      checkpoints.close()
    if saved is None:
      saved = workdir_lib.read_config(path)
  changes = {} if saved is None else config_text.differences(saved, config_text.as_json(config))
  refused = {k: v for k, v in changes.items() if not _resumable(k)}
  if refused and not allow_config_change:
    raise ValueError(
      f"{workdir} holds a run with another config ({config_text.format_differences(refused)}; "
      "saved -> now). Rerun with the run's own config, pass --allow_config_change to go on "
      "with this one (the change is logged in config_changes.jsonl), or use a new --workdir."
    )
  init_from_step = None
  if not steps and config.train.init_from:
    init_from_step = check_init_from(config.train.init_from, abstract_state[0])
  return RunPlan(
    path,
    mesh,
    steps,
    changes,
    num_params,
    num_trainable,
    optimizer_state_bytes(abstract_state),
    init_from_step,
  )


def _refuse_model_only(checkpoints, steps, workdir) -> None:
  """A ValueError when the newest checkpoint whose metadata reads holds a model only."""
  for step in steps:
    try:
      model_only = checkpoints.holds_model_only(step)
    except Exception:  # unreadable: the next older checkpoint decides
      continue
    if model_only:
      raise ValueError(
        f"{workdir} holds imported/upcycled weights only (checkpoint {step} has no optimizer "
        f"state), so it cannot be resumed: fine-tune from it with "
        f"--config.train.init_from={workdir} --workdir=NEW_DIR."
      )
    return


def _newest_saved_config(checkpoints, steps) -> dict[str, Any] | None:
  for step in steps:
    try:
      return checkpoints.restore_config_dict(step)
    except Exception:  # unreadable: the next older checkpoint's config decides
      continue
  return None


def describe_plan(plan: RunPlan, config: ml_collections.ConfigDict) -> str:
  """What `plan_run` found, for `--dry_run`: a few lines, nothing written."""
  tc = config.train
  sizes = dict(zip(plan.mesh.axis_names, plan.mesh.axis_sizes, strict=True))
  lines = [
    f"model: {plan.num_params:,} parameters; {tc.num_steps} steps of {tc.batch_size} x "
    f"{tc.seq_len} tokens",
    f"trains: {trainable_summary(plan, config)}",
    f"mesh: {', '.join(f'{k}={v}' for k, v in sizes.items())} over {jax.device_count()} "
    f"{jax.devices()[0].platform} devices",
  ]
  if config.hardware.topology:
    lines.append(
      f"recipe: made for {config.hardware.topology} (`python -m moejax.aot` checks its fit "
      "there ahead of time)"
    )
  if not plan.workdir.exists():
    lines.append(f"workdir: {plan.workdir} does not exist yet; a new run would create it")
  elif not plan.steps:
    lines.append(f"workdir: {plan.workdir} holds no checkpoint; the run would start at step 0")
  elif plan.resume_step >= tc.num_steps:
    lines.append(f"workdir: {plan.workdir} is at step {plan.resume_step} of {tc.num_steps}: done")
  else:
    lines.append(f"workdir: {plan.workdir}: the run would resume from step {plan.resume_step}")
  if plan.init_from_step is not None:
    lines.append(
      f"init_from: the model of {tc.init_from} at step {plan.init_from_step}, a new optimizer"
    )
  if plan.changes:
    lines.append(f"config changes: {config_text.format_differences(plan.changes, limit=100)}")
  return "\n".join(lines)


def trainable_summary(plan: RunPlan, config: ml_collections.ConfigDict) -> str:
  """`N of M parameters (train.trainable=..., train.frozen=...), optimizer state B bytes`."""
  tc = config.train
  frozen = f", train.frozen={tc.frozen!r}" if tc.frozen else ""
  return (
    f"{plan.num_trainable:,} of {plan.num_params:,} parameters (train.trainable="
    f"{tc.trainable!r}{frozen}); optimizer state {plan.optimizer_bytes:,} bytes "
    f"({plan.optimizer_bytes / 2**20:.2f} MiB)"
  )
