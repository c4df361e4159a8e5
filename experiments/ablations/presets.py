"""The base configs the ablations start from, per preset.

* `smoke`: `configs/tiny.py:smoke` (2 layers, d_model 32, batch 8 x 32 tokens) cut to 4
  steps with an eval and a checkpoint every 2: seconds per arm, for tests.
* `cpu`: `configs/tiny.py` (4 layers, d_model 128, 4 heads, batch 32 x 128 bytes, AdamW
  3e-3 with warmup and cosine decay) on the Shakespeare plays, with `num_steps` chosen per
  ablation so that the whole ablation fits 45 minutes on 2 CPU cores; eval (8 batches of
  the held-out plays) every 50 steps for the curves.
* `pod`: `configs/olmoe.py:pod`, the OLMoE-1B-7B shape (16 layers, d_model 2048, QK-norm,
  dropless), 100k steps of 256 x 1024 tokens; the arms change the MoE layers only.
"""

from __future__ import annotations

import ml_collections

from moejax.config import load_config

POD_CONFIG = "configs/olmoe.py:pod"


def base_config(
  preset: str, *, cpu_steps: int = 600, cpu_warmup: int = 60
) -> ml_collections.ConfigDict:
  if preset == "smoke":
    config = load_config("configs/tiny.py:smoke")
    t = config.train
    t.num_steps, t.warmup_steps = 4, 1
    t.log_every, t.eval_every, t.checkpoint_every, t.keep_checkpoints = 1, 2, 2, 2
    config.data.eval_batches = 1
    return config
  if preset == "cpu":
    config = load_config("configs/tiny.py")
    t = config.train
    t.num_steps, t.warmup_steps = cpu_steps, cpu_warmup
    t.log_every, t.eval_every, t.checkpoint_every, t.keep_checkpoints = 10, 50, 100, 2
    config.data.eval_batches = 8
    return config
  if preset == "pod":
    return load_config(POD_CONFIG)
  raise ValueError(f"preset {preset!r} is not one of 'smoke', 'cpu', 'pod'")
