r"""The base configs the ablations start from, per preset.

* `smoke`: `configs/tiny.py:smoke` (2 layers, d_model 32, batch 8 x 32 tokens) cut to 4
  steps with an eval and a checkpoint every 2, one eval batch: seconds per run, for tests.
* `cpu`: `configs/tiny.py` (4 layers, d_model 128, 4 heads, batch 32 x 128 bytes, AdamW
  with 10% warmup and cosine decay) on the Shakespeare plays, `num_steps` per ablation
  (each ablation file holds its budget arithmetic). Evaluation covers the whole
  validation split (`VALIDATION_BATCHES_CPU` batches: every held-out play) at 40%, 80% and
  100% of the steps, so the curve's slope over its last 20% is measured; checkpoints at
  the same steps.
* `pod`: `configs/olmoe.py:pod`, the OLMoE-1B-7B shape (16 layers, d_model 2048, QK-norm),
  100k steps of 256 x 1024 tokens; the arms change the MoE layers only.

Every preset trains dropless (`model.dispatch='dropless'`, as OLMoE), so no arm loses
tokens to a capacity limit unless the ablation is about capacity (`capacity.py`).
"""

from __future__ import annotations

import ml_collections

from moejax.config import load_config

POD_CONFIG = "configs/olmoe.py:pod"
# The validation split (4 plays, 447,035 bytes) packs into 3,465 windows of 129 tokens:
# 108 global batches of 32, all but 9 windows (99.7%). tests/test_ablations.py recounts it.
VALIDATION_BATCHES_CPU = 108


def base_config(preset: str, *, cpu_steps: int = 500) -> ml_collections.ConfigDict:
  """The base config at `preset`; `cpu_steps` (a multiple of 5) sets the cpu run length."""
  if preset == "smoke":
    config = load_config("configs/tiny.py:smoke")
    t = config.train
    t.num_steps, t.warmup_steps = 4, 1
    t.log_every, t.eval_every, t.checkpoint_every, t.keep_checkpoints = 1, 2, 2, 2
    config.data.eval_batches = 1
  elif preset == "cpu":
    if cpu_steps % 5:
      raise ValueError(f"cpu_steps={cpu_steps} must be a multiple of 5 (evals at 40% and 80%)")
    config = load_config("configs/tiny.py")
    t = config.train
    t.num_steps, t.warmup_steps = cpu_steps, cpu_steps // 10
    t.log_every, t.keep_checkpoints = 10, 2
    t.eval_every = t.checkpoint_every = cpu_steps * 2 // 5
    config.data.eval_batches = VALIDATION_BATCHES_CPU
  elif preset == "pod":
    return load_config(POD_CONFIG)
  else:
    raise ValueError(f"preset {preset!r} is not one of 'smoke', 'cpu', 'pod'")
  config.model.dispatch = "dropless"
  return config
