r"""Import and export checked against HuggingFace transformers itself, per family.

    # in a separate environment: torch and transformers are in no moejax install
    pip install torch transformers numpy safetensors
    python -m experiments.benchmarks.transformers_interop --moejax_python=.venv/bin/python \
      --dir=DIR [--families=mixtral,olmoe,...]

Run from the repository root. For each family it builds a tiny random transformers model
(2 layers, d_model 64, 4 heads, 2 KV heads, 4 experts top-2, vocab 256; `deepseek_v3`: 3
layers, the first dense, MLA, 2 expert groups; weights drawn with visible magnitudes,
routers and DeepSeek's selection bias non-zero) with each family's published RoPE base,
and saves it with `save_pretrained` in float32, in the `config.json` layout of the
installed transformers. Then, in moejax's environment (`--moejax_python`):
`python -m moejax.convert import`, `python -m moejax.convert export`, and the imported
model's logits. It reports per family:

* `tensors`: every exported tensor equal to the saved one, bit for bit, no key missing or
  extra;
* `load`: transformers loads the export with no missing, unexpected or mismatched keys,
  and its logits equal the original model's exactly;
* `rel`: max |moejax logits − transformers logits| / max |transformers logits| on a
  `[2, 16]` token batch (eager attention, eval mode); under 1e-5 passes.

Exits 1 if any family fails. Writes only under DIR/FAMILY, which must not exist yet.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama", "qwen2")
# Each family's published RoPE base: Mixtral, Qwen 1e6; Llama 3 5e5; OLMoE, DeepSeek-V3 1e4.
ROPE_BASE = dict(
  mixtral=1e6, olmoe=1e4, qwen2_moe=1e6, qwen3_moe=1e6, deepseek_v3=1e4, llama=5e5, qwen2=1e6
)
MOEJAX_LOGITS = """
import sys, numpy as np, jax.numpy as jnp, moejax
model, _ = moejax.load(sys.argv[1])
logits, _ = model(jnp.asarray(np.load(sys.argv[2]), jnp.int32))
np.save(sys.argv[3], np.asarray(logits, np.float32))
"""


def tiny_model(family: str):
  """A random float32 transformers model of `family`, in eval mode."""
  t = transformers
  common = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, hidden_act="silu", intermediate_size=96,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
  )  # fmt: skip
  experts = dict(num_experts=4, num_experts_per_tok=2)  # 4 experts, top-2, in every family
  qwen = dict(experts, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
  qwen["use_sliding_window"] = False
  config = {
    "mixtral": lambda: t.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: t.OlmoeConfig(**common, **experts),
    "qwen2_moe": lambda: t.Qwen2MoeConfig(**common, **qwen, shared_expert_intermediate_size=48),
    "qwen3_moe": lambda: t.Qwen3MoeConfig(**common, **qwen, head_dim=24),
    "deepseek_v3": lambda: t.DeepseekV3Config(
      **dict(common, num_hidden_layers=3, num_key_value_heads=4),
      n_routed_experts=4,
      num_experts_per_tok=2,
      moe_intermediate_size=32,
      n_shared_experts=1,
      first_k_dense_replace=1,
      n_group=2,
      topk_group=1,
      routed_scaling_factor=2.5,
      q_lora_rank=32,
      kv_lora_rank=16,
      qk_nope_head_dim=16,
      qk_rope_head_dim=8,
      v_head_dim=16,
    ),  # fmt: skip
    "llama": lambda: t.LlamaConfig(**common),
    "qwen2": lambda: t.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False),
  }[family]()
  if hasattr(config, "rope_parameters"):  # transformers 5
    config.rope_parameters = {"rope_type": "default", "rope_theta": ROPE_BASE[family]}
  else:
    config.rope_theta = ROPE_BASE[family]
  model = t.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  draw = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=draw))
      else:  # routers (`*.gate.weight`) included: visibly non-zero
        p.copy_(0.05 * torch.randn(p.shape, generator=draw))
    for name, b in model.named_buffers():
      if "e_score_correction_bias" in name:
        b.copy_(0.05 * torch.randn(b.shape, generator=draw))
  return model.float().eval()


def logits_of(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def tensors(directory: str) -> dict[str, np.ndarray]:
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
    out.update(load_file(path))
  return out


def check(family: str, root: str, moejax_python: str) -> dict:
  """One family's three checks (see the module docstring)."""
  hf, run, exported = (os.path.join(root, family, n) for n in ("hf", "moejax_run", "exported"))
  model = tiny_model(family)
  model.save_pretrained(hf, safe_serialization=True)
  tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16)).astype(np.int32)
  expected = logits_of(model, tokens)
  np.save(os.path.join(root, family, "tokens.npy"), tokens)

  def moejax(*args: str) -> None:
    done = subprocess.run([moejax_python, *args], capture_output=True, text=True)
    if done.returncode:
      lines = done.stderr.strip().splitlines() or ["(no output)"]
      raise RuntimeError(f"{family}: moejax {' '.join(args[:3])} failed: {lines[-1]}")

  moejax("-m", "moejax.convert", "import", f"--from={hf}", f"--workdir={run}")
  moejax("-m", "moejax.convert", "export", f"--workdir={run}", f"--to={exported}")
  ours_path = os.path.join(root, family, "moejax_logits.npy")
  moejax("-c", MOEJAX_LOGITS, run, os.path.join(root, family, "tokens.npy"), ours_path)

  saved, back = tensors(hf), tensors(exported)
  same = set(saved) == set(back) and all(
    saved[k].dtype == back[k].dtype and saved[k].tobytes() == back[k].tobytes() for k in saved
  )
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
    exported, output_loading_info=True, attn_implementation="eager"
  )
  clean = not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  exact = np.array_equal(logits_of(reloaded.float().eval(), tokens), expected)
  ours = np.load(ours_path).astype(np.float64)
  rel = float(np.max(np.abs(ours - expected)) / np.max(np.abs(expected)))
  return dict(family=family, tensors=same, load=clean and exact, rel=rel)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--moejax_python", required=True, help="Python of moejax's environment.")
  parser.add_argument("--dir", required=True, help="Where to write (DIR/FAMILY must be new).")
  parser.add_argument("--families", default=",".join(FAMILIES))
  args = parser.parse_args()
  families = args.families.split(",")
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    parser.error(f"--families: unknown {unknown}; allowed: {','.join(FAMILIES)}")
  taken = [f for f in families if os.path.exists(os.path.join(args.dir, f))]
  if taken:
    parser.error(f"--dir: {args.dir}/{taken[0]} exists; choose a new --dir")
  transformers.utils.logging.disable_progress_bar()
  print(f"torch {torch.__version__}, transformers {transformers.__version__}")
  print(f"{'family':<12} {'tensors':<8} {'load':<6} rel")
  failed = False
  for family in families:
    try:
      r = check(family, args.dir, args.moejax_python)
    except RuntimeError as error:  # a moejax command failed: report it, go on
      print(f"{family:<12} FAIL  {error}")
      failed = True
      continue
    ok = r["tensors"] and r["load"] and r["rel"] < 1e-5
    failed |= not ok
    print(
      f"{family:<12} {r['tensors']!s:<8} {r['load']!s:<6} {r['rel']:.2e}{'' if ok else '  FAIL'}"
    )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
