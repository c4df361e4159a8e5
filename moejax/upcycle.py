"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): a dense model's run
turned into an MoE run to continue training.

    python -m moejax.upcycle --from=DENSE_RUN --workdir=OUT --config=MOE_CONFIG [--noise_std=0.01]

then `python -m moejax.main --config=MOE_CONFIG --config.train.init_from=OUT --workdir=RUN`.

Every routed expert of an MoE layer starts as a copy of that layer's dense FFN (`[d_ff]`
SwiGLU weights `w_in`, `w_gate`, `w_out`), optionally perturbed by Gaussian noise of
`noise_std` times each weight matrix's standard deviation (independently per expert);
the router is freshly initialised (from `MOE_CONFIG`'s `train.seed`). Attention, norms,
embeddings, the output head, and the FFNs of layers that stay dense are carried over.
`DENSE_RUN` is any dense moejax run directory: trained here, or a Llama/Qwen2 checkpoint
imported with `python -m moejax.convert import`.

At step 0, without noise, every expert computes the dense FFN f(x), so an MoE layer
computes (Σ_{chosen e} g_e) · f(x):
* with gates renormalised over the chosen experts (`model.renormalize=True`, Mixtral,
  Qwen3) the sum is 1 and the upcycled model is the dense model (tested);
* with raw softmax gates (Switch, OLMoE) it is the softmax mass of the top-k, between
  k/E and 1 (about k/E for a fresh router, whose logits are near 0): each MoE layer's FFN
  output starts scaled down by that factor, which training then has to undo. Komatsuzaki
  et al. use Switch routing and report this costs little; renormalising avoids it.
"""

from __future__ import annotations

from moejax.runtime import signals

if __name__ == "__main__":
  signals.handle_signals("what was written to --workdir is removed: rerun the same command.")

import json
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from ml_collections import config_flags

from moejax.config.flags import ConfigFlag
from moejax.convert import layout, model_state
from moejax.layers.attention_kinds import KINDS as ATTENTION_KINDS
from moejax.models.transformer import expert_d_ff_of
from moejax.runtime import cli
from moejax.training import output_dir
from moejax.training.loading import load_model
from moejax.training.tree_paths import flat

# Model keys that must agree: everything upcycling carries over unchanged.
SHARED_KEYS = (
  "vocab_size",
  "num_layers",
  "d_model",
  "num_heads",
  "attention",
  "norm_eps",
  "rope_base",
  "rope_scaling",
  "rope_factor",
  "rope_original_max_len",
  "yarn_beta_fast",
  "yarn_beta_slow",
  "yarn_mscale",
  "yarn_mscale_all_dim",
  "yarn_truncate",
  "tie_embeddings",
  "activation",
  "post_norms",
  "embedding_multiplier",
  "output_multiplier",
) + tuple(key for kind in ATTENTION_KINDS.values() for key in kind.keys)


def check_compatible(dense: ml_collections.ConfigDict, moe: ml_collections.ConfigDict) -> None:
  """ValueError naming the first model key that keeps the dense weights from fitting."""
  if dense.num_experts:
    raise ValueError(
      f"--from holds an MoE (model.num_experts={dense.num_experts}); upcycling starts from a "
      "dense run (num_experts=0)."
    )
  if not moe.num_experts:
    raise ValueError("--config is dense (model.num_experts=0); upcycle into an MoE config.")
  if moe.num_shared_experts or moe.dense_moe_hybrid:
    raise ValueError(
      "--config has shared experts or a dense-MoE hybrid; upcycling copies the dense FFN "
      "into every routed expert only: set model.num_shared_experts=0, dense_moe_hybrid=False."
    )
  for key in SHARED_KEYS:
    if dense[key] != moe[key]:
      raise ValueError(
        f"model.{key}: the dense run has {dense[key]!r}, --config {moe[key]!r}; upcycling "
        "carries every non-expert weight over, so they must agree."
      )
  if expert_d_ff_of(moe) != dense.d_ff:
    raise ValueError(
      f"model.expert_d_ff={expert_d_ff_of(moe)} must equal the dense run's d_ff={dense.d_ff}: "
      "each expert is a copy of the dense FFN."
    )
  if (moe.first_dense_layers or moe.moe_layer_interval > 1) and moe.d_ff != dense.d_ff:
    raise ValueError(f"model.d_ff={moe.d_ff} of the layers that stay dense must be {dense.d_ff}.")


def upcycle(
  dense_workdir: epath.PathLike,
  workdir: epath.PathLike,
  config: ml_collections.ConfigDict,
  *,
  noise_std: float = 0.0,
) -> dict[str, Any]:
  """Writes the upcycled MoE of the dense run `dense_workdir` into the new run directory
  `workdir`, as a model-only checkpoint with `config` (the MoE's) and `upcycle.json`."""
  if noise_std < 0:
    raise ValueError(f"--noise_std={noise_std} must be >= 0.")
  output_dir.check_finished(dense_workdir, "--from")  # an interrupted import or upcycle
  path = model_state.new_run_directory(workdir)
  dense_model, dense_config, step = load_model(dense_workdir)
  check_compatible(dense_config.model, config.model)
  dense = {
    name: np.asarray(value)
    for name, value in flat(nnx.to_pure_dict(nnx.state(dense_model, nnx.Param))).items()
  }
  from moejax.models.transformer import TransformerLM

  fresh = TransformerLM(config.model, rngs=nnx.Rngs(config.train.seed))
  tree = nnx.to_pure_dict(nnx.state(fresh))
  params = set(flat(nnx.to_pure_dict(nnx.state(fresh, nnx.Param))))
  leaves = flat(tree)
  rng = np.random.default_rng(config.train.seed)
  dense_blocks = layout.layer_locations(dense_config.model)
  rows_of: dict[str, list[tuple[int, int]]] = {}  # MoE block -> (its row, layer index)
  for i, (moe_block, row, _) in enumerate(layout.layer_locations(config.model)):
    rows_of.setdefault(moe_block, []).append((row, i))
  copied = 0
  for name in sorted(params):
    block = next((b for b in rows_of if name.startswith(b + "/")), None)
    if block is None:  # embedding, final norm, output head
      leaves[name] = dense[name]
      copied += 1
      continue
    sub = name[len(block) + 1 :]
    if sub.startswith("moe/") and not sub.startswith("moe/experts/"):
      continue  # the router: freshly initialised
    target = np.array(leaves[name])
    for row, i in rows_of[block]:
      dense_block, dense_row, _ = dense_blocks[i]
      if sub.startswith("moe/experts/"):
        source = dense[f"{dense_block}/dense_ffn/{sub.split('/')[-1]}"][dense_row]
        for e in range(target.shape[1]):
          noise = rng.standard_normal(source.shape) * (noise_std * float(source.std()))
          target[row, e] = source + noise if noise_std else source
      else:
        target[row] = dense[f"{dense_block}/{sub}"][dense_row]
    leaves[name] = target
    copied += 1
  record = {
    "from": str(dense_workdir),
    "from_step": step,
    "noise_std": noise_std,
    "method": "sparse upcycling (Komatsuzaki et al. 2022): experts copy the dense FFN, fresh router",
  }
  model_state.save_model_run(
    path,
    model_state.with_leaves(tree, leaves),
    config,
    "upcycle.json",
    json.dumps(record, indent=2) + "\n",
    command="python -m moejax.upcycle",
  )
  return {"parameters": copied, "from_step": step, "workdir": str(path)}


_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "The MoE config, configs/NAME.py[:ARG].", lock_config=True
)
_FROM = flags.DEFINE_string("from", None, "The dense run directory (trained or imported).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The new run directory (new or empty).")
_NOISE = flags.DEFINE_float("noise_std", 0.0, "Noise on each expert copy, x the weight's std.")


def main(argv) -> None:
  for flag, value in (
    ("--from", _FROM.value),
    ("--workdir", _WORKDIR.value),
    ("--config", _CONFIG.value),
  ):
    if not value:
      raise ValueError(
        f"{flag} is required: python -m moejax.upcycle --from=DENSE_RUN --workdir=OUT --config=MOE_CONFIG"
      )
  summary = upcycle(_FROM.value, _WORKDIR.value, _CONFIG.value, noise_std=_NOISE.value)
  print(
    f"upcycled step {summary['from_step']} of {_FROM.value} -> {summary['workdir']} "
    f"({summary['parameters']} parameters from the dense run, the routers fresh); fine-tune with "
    f"--config.train.init_from={summary['workdir']}"
  )


if __name__ == "__main__":
  cli.run(main, config_flag=ConfigFlag("config"))
