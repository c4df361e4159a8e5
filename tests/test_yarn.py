"""YaRN RoPE scaling (Peng et al. 2023, arXiv:2309.00071; `moejax.layers.rope`): its
frequencies and factors against a second, loop-by-channel implementation
(`family_reference.yarn`), and checkpoints whose `config.json` asks for it (DeepSeek-V3's
`rope_scaling`, Kimi K2's model_type, and a GQA family's) imported to the NumPy forward
pass and exported back."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from helpers import family_reference as fr
from helpers import hf_reference
from moejax.convert import transfer
from moejax.layers.rope import Rope

TOKENS = [3, 17, 5, 39, 0, 22]
DEEPSEEK_V3_YARN = hf_reference.DEEPSEEK_V3_YARN


@pytest.mark.parametrize(
  "dim, base, scaling",
  [
    (64, 10000.0, DEEPSEEK_V3_YARN),  # DeepSeek-V3's RoPE part of each head
    (128, 50000.0, dict(factor=32.0, original_max_position_embeddings=4096)),  # Kimi-like
    (4, 10000.0, dict(factor=4.0, original_max_position_embeddings=16, mscale_all_dim=0.7)),
  ],
)
def test_frequencies_and_factors_equal_the_loop(dim, base, scaling):
  keys = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
  freqs, attention, softmax = fr.yarn(
    dim, base, scaling["factor"], scaling["original_max_position_embeddings"],
    **{k: scaling[k] for k in keys if k in scaling},
  )  # fmt: skip
  rope = Rope(
    base, "yarn", float(scaling["factor"]), scaling["original_max_position_embeddings"],
    **{k: float(scaling[k]) for k in keys if k in scaling},
  )  # fmt: skip
  np.testing.assert_allclose(rope.inv_freq(dim), freqs, rtol=1e-6)
  assert rope.attention_factor == pytest.approx(attention, rel=1e-12)
  assert rope.softmax_factor == pytest.approx(softmax, rel=1e-12)
  unscaled = base ** (-np.arange(0, dim, 2) / dim)
  if dim == 64:  # the fastest pairs kept, the slowest divided by 40, some between
    kept = np.isclose(freqs, unscaled, rtol=1e-9)
    divided = np.isclose(np.array(freqs) * 40, unscaled, rtol=1e-9)
    assert kept[:5].all() and divided[-5:].all() and (~kept & ~divided).sum() >= 3
    assert softmax == pytest.approx((0.1 * math.log(40) + 1) ** 2) and attention == 1.0


def _yarn_checkpoint(tmp_path, family):
  """A tiny checkpoint whose RoPE turns enough in 6 tokens for YaRN to show: a 16-token
  original context stretched 4 times."""
  scaling = dict(DEEPSEEK_V3_YARN, factor=4.0, original_max_position_embeddings=16)
  if family != "deepseek_v3":
    scaling.pop("mscale_all_dim")
  hf = hf_reference.tiny_config(family, rope_scaling=scaling, max_position_embeddings=64)
  hf["rope_theta"] = 100.0
  source = tmp_path / family
  source.mkdir()
  return hf, source, hf_reference.write_checkpoint(source, hf)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_a_yarn_checkpoint_imports_to_the_numpy_forward_and_exports_back(tmp_path, family):
  hf, source, written = _yarn_checkpoint(tmp_path, family)
  transfer.import_checkpoint(source, tmp_path / "run")
  model, config = moejax.load(tmp_path / "run")
  assert (config.model.rope_scaling, config.model.rope_factor) == ("yarn", 4.0)
  logits = np.asarray(model(jnp.asarray([TOKENS], jnp.int32))[0][0], np.float64)
  expected = hf_reference.forward(hf, written, TOKENS)
  scale = np.max(np.abs(expected))
  assert np.max(np.abs(logits - expected)) / scale < 1e-5
  unscaled = hf_reference.forward({**hf, "rope_scaling": None}, written, TOKENS)
  assert np.max(np.abs(unscaled - expected)) / scale > 1e-3  # YaRN changed the function
  transfer.export_checkpoint(tmp_path / "run", tmp_path / "out")
  original = json.loads((source / "config.json").read_text())
  assert json.loads((tmp_path / "out" / "config.json").read_text()) == original


def test_a_trained_yarn_model_exports_its_rope_scaling(tmp_path):
  """Written without the original config.json, the RoPE object is moejax's own."""
  hf, source, _ = _yarn_checkpoint(tmp_path, "deepseek_v3")
  transfer.import_checkpoint(source, tmp_path / "run")
  (tmp_path / "run" / transfer.IMPORT_RECORD).unlink()
  transfer.export_checkpoint(tmp_path / "run", tmp_path / "out")
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  expected = {k: v for k, v in hf["rope_scaling"].items()}
  assert written["rope_scaling"] == expected


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(attention_factor=1.2), r"rope_scaling\.attention_factor=1\.2 is not supported"),
    (dict(factor=0.5), r"rope_scaling\.factor=0\.5 must be a number >= 1"),
    (dict(factor=8.0), r"factor=8\.0 disagrees with max_position_embeddings=64"),
    (dict(beta_fast="32"), r"rope_scaling\.beta_fast='32' must be a number"),
    (dict(truncate="no"), r"rope_scaling\.truncate='no' must be true or false"),
  ],
)
def test_yarn_fields_moejax_cannot_compute_are_refused(tmp_path, change, message):
  hf, source, _ = _yarn_checkpoint(tmp_path, "qwen3_moe")
  hf["rope_scaling"].update(change)
  (source / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match=message):
    transfer.import_checkpoint(source, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_kimi_k2_imports_as_deepseek_v3_and_exports_as_itself(tmp_path):
  """Kimi K2's config.json names model_type 'kimi_k2' for DeepSeek-V3's block (with YaRN):
  the same tensors, the same logits, and the export keeps its model_type."""
  hf, source, written = _yarn_checkpoint(tmp_path, "deepseek_v3")
  kimi = json.loads((source / "config.json").read_text())
  kimi["model_type"] = "kimi_k2"
  (source / "config.json").write_text(json.dumps(kimi))
  summary = transfer.import_checkpoint(source, tmp_path / "run")
  assert summary["family"] == "kimi_k2"
  model, _ = moejax.load(tmp_path / "run")
  logits = np.asarray(model(jnp.asarray([TOKENS], jnp.int32))[0][0], np.float64)
  expected = hf_reference.forward(hf, written, TOKENS)
  assert np.max(np.abs(logits - expected)) / np.max(np.abs(expected)) < 1e-5
  transfer.export_checkpoint(tmp_path / "run", tmp_path / "out")
  assert json.loads((tmp_path / "out" / "config.json").read_text()) == kimi
