"""Tiny HF-format checkpoints written with numpy and safetensors, and a NumPy forward pass
that reads their tensors by name, for the import/export tests.

Independent of moejax's converter: the key names and shapes are those of the published
checkpoints (Mixtral-8x7B, OLMoE-1B-7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, DeepSeek-V3,
Llama, Qwen2 `model.safetensors.index.json` files; torch `nn.Linear` weights are `[out,
in]`), and the forward pass follows each family's model card and reference code:
float64, one formula per step, tokens looped in Python (via `family_reference`).
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from helpers import family_reference as fr
from helpers.moe_reference import ffn, softmax

D, HEADS, KV_HEADS, HEAD_DIM, VOCAB, EXPERTS, TOP_K, F = 16, 4, 2, 4, 40, 4, 2, 8
# DeepSeek-V3's published `rope_scaling` (YaRN, factor 40 over 4096 tokens).
DEEPSEEK_V3_YARN = {
  "beta_fast": 32,
  "beta_slow": 1,
  "factor": 40,
  "mscale": 1.0,
  "mscale_all_dim": 1.0,
  "original_max_position_embeddings": 4096,
  "type": "yarn",
}


def tiny_config(model_type: str, **changes) -> dict:
  """A `config.json` of `model_type` at tiny shapes, with each family's own settings."""
  hf = {
    "model_type": model_type,
    "vocab_size": VOCAB,
    "hidden_size": D,
    "intermediate_size": F,
    "num_hidden_layers": 2,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
  }
  if model_type == "mixtral":
    hf.update(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, sliding_window=None)
  elif model_type == "olmoe":
    hf.update(num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=False, clip_qkv=None)
  elif model_type == "qwen2_moe":
    hf.update(
      num_experts=EXPERTS,
      num_experts_per_tok=TOP_K,
      moe_intermediate_size=6,
      shared_expert_intermediate_size=12,
      norm_topk_prob=False,
      decoder_sparse_step=1,
      mlp_only_layers=[],
      rms_norm_eps=1e-6,
    )
  elif model_type == "qwen3_moe":
    hf.update(
      num_experts=EXPERTS,
      num_experts_per_tok=TOP_K,
      moe_intermediate_size=6,
      norm_topk_prob=True,
      head_dim=6,
      rms_norm_eps=1e-6,
    )
  elif model_type == "deepseek_v3":
    hf.update(
      num_key_value_heads=HEADS,
      n_routed_experts=8,
      num_experts_per_tok=2,
      moe_intermediate_size=6,
      n_shared_experts=1,
      first_k_dense_replace=1,
      n_group=4,
      topk_group=2,
      routed_scaling_factor=2.5,
      norm_topk_prob=True,
      scoring_func="sigmoid",
      q_lora_rank=12,
      kv_lora_rank=10,
      qk_nope_head_dim=4,
      qk_rope_head_dim=4,
      v_head_dim=6,
      rms_norm_eps=1e-6,
      rope_theta=10000.0,
    )
  elif model_type == "llama":
    hf.update(tie_word_embeddings=True)
  hf.update(changes)
  return hf


def tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
  """Every tensor of a checkpoint of `hf`, by its published name."""
  t = hf["model_type"]
  d, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  hd = hf.get("head_dim") or d // heads
  shapes = {"model.embed_tokens.weight": (hf["vocab_size"], d), "model.norm.weight": (d,)}
  if not hf["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (hf["vocab_size"], d)
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (d,)
    shapes[p + "post_attention_layernorm.weight"] = (d,)
    a = p + "self_attn."
    if t == "deepseek_v3":
      nope, rope, v = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
      shapes[a + "q_a_proj.weight"] = (hf["q_lora_rank"], d)
      shapes[a + "q_a_layernorm.weight"] = (hf["q_lora_rank"],)
      shapes[a + "q_b_proj.weight"] = (heads * (nope + rope), hf["q_lora_rank"])
      shapes[a + "kv_a_proj_with_mqa.weight"] = (hf["kv_lora_rank"] + rope, d)
      shapes[a + "kv_a_layernorm.weight"] = (hf["kv_lora_rank"],)
      shapes[a + "kv_b_proj.weight"] = (heads * (nope + v), hf["kv_lora_rank"])
      shapes[a + "o_proj.weight"] = (d, heads * v)
    else:
      shapes[a + "q_proj.weight"] = (heads * hd, d)
      shapes[a + "k_proj.weight"] = (kv * hd, d)
      shapes[a + "v_proj.weight"] = (kv * hd, d)
      shapes[a + "o_proj.weight"] = (d, heads * hd)
      if t in ("qwen2_moe", "qwen2"):
        for n, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
          shapes[a + f"{n}_proj.bias"] = (rows,)
      if t == "olmoe":
        shapes[a + "q_norm.weight"], shapes[a + "k_norm.weight"] = (heads * hd,), (kv * hd,)
      if t == "qwen3_moe":
        shapes[a + "q_norm.weight"], shapes[a + "k_norm.weight"] = (hd,), (hd,)
    dense = t in ("llama", "qwen2") or (t == "deepseek_v3" and i < hf["first_k_dense_replace"])
    if dense:
      f = hf["intermediate_size"]
      shapes.update(
        {
          p + "mlp.gate_proj.weight": (f, d),
          p + "mlp.up_proj.weight": (f, d),
          p + "mlp.down_proj.weight": (d, f),
        }
      )
      continue
    experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
    f = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    block, names = (
      ("block_sparse_moe", ("w1", "w3", "w2"))
      if t == "mixtral"
      else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    )
    shapes[f"{p}{block}.gate.weight"] = (experts, d)
    for e in range(experts):
      q = f"{p}{block}.experts.{e}."
      shapes.update(
        {
          q + f"{names[0]}.weight": (f, d),
          q + f"{names[1]}.weight": (f, d),
          q + f"{names[2]}.weight": (d, f),
        }
      )
    if t == "qwen2_moe":
      s = hf["shared_expert_intermediate_size"]
      q = p + "mlp.shared_expert."
      shapes.update(
        {
          q + "gate_proj.weight": (s, d),
          q + "up_proj.weight": (s, d),
          q + "down_proj.weight": (d, s),
        }
      )
      shapes[p + "mlp.shared_expert_gate.weight"] = (1, d)
    if t == "deepseek_v3":
      s = hf["n_shared_experts"] * f
      q = p + "mlp.shared_experts."
      shapes.update(
        {
          q + "gate_proj.weight": (s, d),
          q + "up_proj.weight": (s, d),
          q + "down_proj.weight": (d, s),
        }
      )
      shapes[p + "mlp.gate.e_score_correction_bias"] = (experts,)
  return shapes


def write_checkpoint(
  directory, hf: dict, *, seed=0, dtype="bfloat16", shards=1
) -> dict[str, np.ndarray]:
  """Writes `config.json` and random tensors (norm scales near 1) in `shards` files (with
  the index when more than one); returns the tensors as written."""
  rng = np.random.default_rng(seed)
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  tensors = {}
  for key, shape in tensor_shapes(hf).items():
    if key.endswith("norm.weight") or "layernorm" in key:
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith("e_score_correction_bias"):
      value = 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / math.sqrt(shape[-1])
    tensors[key] = value.astype(np_dtype)
  keys = list(tensors)
  groups = [keys[i::shards] for i in range(shards)]
  weight_map = {}
  for n, group in enumerate(groups):
    name = "model.safetensors" if shards == 1 else f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
    save_file({k: tensors[k] for k in group}, str(directory / name))
    weight_map.update({k: name for k in group})
  if shards > 1:
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (directory / "config.json").write_text(json.dumps({**hf, "torch_dtype": dtype}))
  return tensors


def read_all(directory) -> dict[str, np.ndarray]:
  """Every tensor of the `*.safetensors` files in `directory`, float8 ones included (read
  from the header's offsets: the safetensors NumPy reader has no float8 type)."""
  from moejax.convert.fp8_blocks import FP8_NAME, read_raw

  out = {}
  for path in sorted(directory.glob("*.safetensors")):
    with safe_open(str(path), "numpy") as f:
      for key in f.keys():  # noqa: SIM118 (a file handle)
        is_fp8 = f.get_slice(key).get_dtype() == FP8_NAME
        out[key] = read_raw(path, key) if is_fp8 else f.get_tensor(key)
  return out


# ----------------------------------------------------------------------------- forward


def _rms_rows(x, scale, eps):
  return np.stack([fr.rms_norm(row, scale, eps) for row in x])


def _yarn(hf, dim):
  """`family_reference.yarn` of `hf`'s `rope_scaling` for `dim` rotated channels, or the
  unscaled (None, 1, 1)."""
  scaling = hf.get("rope_scaling") or {}
  if scaling.get("type", scaling.get("rope_type")) != "yarn":
    return None, 1.0, 1.0
  fields = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
  return fr.yarn(
    dim, hf["rope_theta"], scaling["factor"], scaling["original_max_position_embeddings"],
    **{k: scaling[k] for k in fields if k in scaling},
  )  # fmt: skip


def _attention(hf, t, a, h):
  """Causal GQA of `h` `[seq, d]` with each family's q/k norm and biases; RoPE halves."""
  typ, heads, kv = hf["model_type"], hf["num_attention_heads"], hf["num_key_value_heads"]
  hd = hf.get("head_dim") or hf["hidden_size"] // heads
  eps, seq = hf["rms_norm_eps"], h.shape[0]
  proj = lambda n: h @ t[a + f"{n}_proj.weight"].T + t.get(a + f"{n}_proj.bias", 0.0)
  q, k, v = proj("q"), proj("k"), proj("v")
  if typ == "olmoe":  # over the whole projection
    q, k = _rms_rows(q, t[a + "q_norm.weight"], eps), _rms_rows(k, t[a + "k_norm.weight"], eps)
  q, k, v = q.reshape(seq, heads, hd), k.reshape(seq, kv, hd), v.reshape(seq, kv, hd)
  if typ == "qwen3_moe":  # per head
    q = np.stack([_rms_rows(q[:, j], t[a + "q_norm.weight"], eps) for j in range(heads)], 1)
    k = np.stack([_rms_rows(k[:, j], t[a + "k_norm.weight"], eps) for j in range(kv)], 1)
  base = hf["rope_theta"]
  freqs, scale, _ = _yarn(hf, hd)
  rot = lambda v, s: fr.rope(v, s, base, "half", freqs, scale)
  q = np.array([[rot(q[s, j], s) for j in range(heads)] for s in range(seq)])
  k = np.array([[rot(k[s, j], s) for j in range(kv)] for s in range(seq)])
  out = np.zeros((seq, heads, hd))
  for j in range(heads):
    g = j // (heads // kv)
    for s in range(seq):
      weights = softmax(np.array([q[s, j] @ k[r, g] / math.sqrt(hd) for r in range(s + 1)]))
      out[s, j] = sum(w * v[r, g] for r, w in enumerate(weights))
  return out.reshape(seq, heads * hd) @ t[a + "o_proj.weight"].T


def _mla(hf, t, a, h):
  lora = hf["kv_lora_rank"]
  fused = t[a + "kv_a_proj_with_mqa.weight"]
  params = {
    "q_down": t[a + "q_a_proj.weight"].T,
    "q_norm": t[a + "q_a_layernorm.weight"],
    "q_up": t[a + "q_b_proj.weight"].T,
    "kv_down": fused[:lora].T,
    "k_rope": fused[lora:].T,
    "kv_norm": t[a + "kv_a_layernorm.weight"],
    "kv_up": t[a + "kv_b_proj.weight"].T,
    "o": t[a + "o_proj.weight"].T,
  }
  freqs, scale, softmax_factor = _yarn(hf, hf["qk_rope_head_dim"])
  return fr.mla(
    h[None],
    params,
    rope_freqs=freqs,
    rope_scale=scale,
    softmax_factor=softmax_factor,
    num_heads=hf["num_attention_heads"],
    qk_nope_head_dim=hf["qk_nope_head_dim"],
    qk_rope_head_dim=hf["qk_rope_head_dim"],
    v_head_dim=hf["v_head_dim"],
    rope_base=hf["rope_theta"],
    eps=hf["rms_norm_eps"],
    rope_layout="interleaved",  # DeepSeek's released weights
  )[0]


def _swiglu(t, q, names=("gate_proj", "up_proj", "down_proj")):
  w_gate, w_in, w_out = (t[q + n + ".weight"] for n in names)
  return lambda v: ffn(v, w_in.T, w_gate.T, w_out.T, "swiglu")


def _experts(t, q, n, names):
  fns = [_swiglu(t, f"{q}experts.{e}.", names) for e in range(n)]
  stack = lambda i: np.stack([t[f"{q}experts.{e}.{names[i]}.weight"].T for e in range(n)])
  return {"w_gate": stack(0), "w_in": stack(1), "w_out": stack(2)}, fns


def _mlp(hf, t, p, i, h):
  typ = hf["model_type"]
  if typ in ("llama", "qwen2") or (typ == "deepseek_v3" and i < hf["first_k_dense_replace"]):
    return np.stack([_swiglu(t, p + "mlp.")(row) for row in h])
  if typ == "mixtral":
    params, _ = _experts(t, p + "block_sparse_moe.", hf["num_local_experts"], ("w1", "w3", "w2"))
    params["router"] = t[p + "block_sparse_moe.gate.weight"].T
    return fr.qwen2_moe(h, params, top_k=hf["num_experts_per_tok"], norm_topk_prob=True)
  names = ("gate_proj", "up_proj", "down_proj")
  n = hf.get("num_experts") or hf.get("n_routed_experts")
  params, _ = _experts(t, p + "mlp.", n, names)
  params["router"] = t[p + "mlp.gate.weight"].T
  if typ == "deepseek_v3":
    q = p + "mlp.shared_experts."
    params["shared"] = {
      "w_gate": t[q + "gate_proj.weight"].T,
      "w_in": t[q + "up_proj.weight"].T,
      "w_out": t[q + "down_proj.weight"].T,
    }
    params["bias"] = t[p + "mlp.gate.e_score_correction_bias"]
    y, _ = fr.deepseek_v3_moe(
      h,
      params,
      top_k=hf["num_experts_per_tok"],
      num_groups=hf["n_group"],
      topk_groups=hf["topk_group"],
      routed_scaling_factor=hf["routed_scaling_factor"],
      normalize=hf["norm_topk_prob"],
    )
    return y
  if typ == "qwen2_moe":
    q = p + "mlp.shared_expert."
    params["shared"] = {
      "w_gate": t[q + "gate_proj.weight"].T,
      "w_in": t[q + "up_proj.weight"].T,
      "w_out": t[q + "down_proj.weight"].T,
    }
    params["shared_gate"] = t[p + "mlp.shared_expert_gate.weight"].T
  return fr.qwen2_moe(
    h, params, top_k=hf["num_experts_per_tok"], norm_topk_prob=hf["norm_topk_prob"]
  )


def forward(hf: dict, tensors: dict[str, np.ndarray], tokens) -> np.ndarray:
  """Logits `[seq, vocab]` float64 of one sequence `tokens` `[seq]`."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  eps = hf["rms_norm_eps"]
  x = t["model.embed_tokens.weight"][np.asarray(tokens)]
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = _rms_rows(x, t[p + "input_layernorm.weight"], eps)
    attend = _mla if hf["model_type"] == "deepseek_v3" else _attention
    x = x + attend(hf, t, p + "self_attn.", h)
    h = _rms_rows(x, t[p + "post_attention_layernorm.weight"], eps)
    x = x + _mlp(hf, t, p, i, h)
  x = _rms_rows(x, t["model.norm.weight"], eps)
  head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
  return x @ head.T
