"""Rotary position embedding (RoPE, Su et al. 2021) and its YaRN scaling.

`apply_rope` rotates channel pairs (j, j + D/2) ("rotate-half", GPT-NeoX and LLaMA's layout)
by `position · inv_freq[j]`. Unscaled, `inv_freq[j] = base^(-2j/D)`.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
arXiv:2309.00071, §3.2-3.4), as DeepSeek-V3, Kimi K2 and gpt-oss use it to stretch a context
of `original_max_len` tokens by `factor`:
- each frequency is interpolated by a ramp over its number of rotations in the original
  context, `r_j = L_orig / (2π / inv_freq[j])`: frequencies with more than `beta_fast`
  rotations are kept, those with fewer than `beta_slow` are divided by `factor`, and those
  between are blended linearly in the channel index (the ramp's ends are the channels
  `d(r) = D · ln(L_orig / (2π r)) / (2 ln base)` for r = beta_fast and beta_slow,
  floored and ceiled when `truncate`);
- the rotated vectors are scaled by the attention factor `m(factor, mscale) /
  m(factor, mscale_all_dim)`, with `m(s, a) = 0.1 · a · ln(s) + 1` (1 for s <= 1; a = 1
  when neither mscale is given), which multiplies the logits by its square;
- DeepSeek's attention multiplies its softmax scale by `m(factor, mscale_all_dim)²` too
  (`softmax_factor`; DeepSeek-V2/V3's released modelling code).
These are the formulas of transformers' `_compute_yarn_parameters` and its DeepSeek-V3
attention, written here from the paper and the released configs' fields.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCALINGS = ("none", "yarn")


def _mscale(factor: float, weight: float) -> float:
  """YaRN's `m(s, a) = 0.1 · a · ln(s) + 1`, 1 when s <= 1."""
  return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class Rope:
  """One model's RoPE: its base, and YaRN's settings when `scaling='yarn'`.

  Attributes mirror `model.rope_*`/`model.yarn_*` (and HF's `rope_scaling` fields):
  base (`rope_theta`), factor, original_max_len (`original_max_position_embeddings`),
  beta_fast, beta_slow, mscale, mscale_all_dim (0: not given), truncate.
  """

  base: float
  scaling: str = "none"
  factor: float = 1.0
  original_max_len: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  truncate: bool = True

  @classmethod
  def from_config(cls, config) -> Rope:
    """The RoPE of a model config (`model.rope_base`, `model.rope_scaling`, ...)."""
    if config.rope_scaling == "none":
      return cls(float(config.rope_base))
    return cls(
      float(config.rope_base), config.rope_scaling, float(config.rope_factor),
      int(config.rope_original_max_len), float(config.yarn_beta_fast),
      float(config.yarn_beta_slow), float(config.yarn_mscale), float(config.yarn_mscale_all_dim),
      bool(config.yarn_truncate),
    )  # fmt: skip

  def inv_freq(self, dim: int) -> np.ndarray:
    """`[dim / 2]` float32 angular frequencies of a rotated head part of `dim` channels."""
    unscaled = self.base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if self.scaling == "none":
      return unscaled.astype(np.float32)

    def channel(rotations: float) -> float:  # the channel with this many rotations
      return (
        dim
        * math.log(self.original_max_len / (rotations * 2 * math.pi))
        / (2 * math.log(self.base))
      )

    low, high = channel(self.beta_fast), channel(self.beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the frequency is kept (extrapolated), 0: divided by factor
    scaled = unscaled / self.factor * (1 - keep) + unscaled * keep
    return scaled.astype(np.float32)

  @property
  def attention_factor(self) -> float:
    """What the rotated queries and keys are multiplied by (1 without scaling)."""
    if self.scaling == "none":
      return 1.0
    if self.mscale and self.mscale_all_dim:
      return _mscale(self.factor, self.mscale) / _mscale(self.factor, self.mscale_all_dim)
    return _mscale(self.factor, 1.0)

  @property
  def softmax_factor(self) -> float:
    """DeepSeek's extra softmax-scale factor, `m(factor, mscale_all_dim)²` (1 without)."""
    if self.scaling == "none" or not self.mscale_all_dim:
      return 1.0
    return _mscale(self.factor, self.mscale_all_dim) ** 2


def apply_rope(x: jax.Array, positions: jax.Array, rope: Rope | float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), "rotate-half" layout (GPT-NeoX, LLaMA).

  Channel pairs (j, j + D/2) are rotated by the angle `position · inv_freq[j]`
  (`Rope.inv_freq`: `base^(-2j/D)` unscaled), so the dot product of a rotated query and key
  depends on their positions only through the difference; YaRN also scales the result by
  its attention factor. Computed in float32.

  Args:
    x: `[batch, seq, heads, head_dim]`, head_dim even.
    positions: int, the position of every sequence slot: `[seq]`, shared by the rows, or
      `[batch, seq]`, one per row (packed documents, positions restarting at each).
    rope: a `Rope`, or a plain base (10_000 in the paper; 500_000 in LLaMA 3).

  Returns:
    `[batch, seq, heads, head_dim]` in x's dtype.
  """
  rope = rope if isinstance(rope, Rope) else Rope(float(rope))
  inv_freq = jnp.asarray(rope.inv_freq(x.shape[-1]))  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) seq, D/2]
  cos = jnp.cos(angles)[..., None, :]  # [(batch,) seq, 1, D/2]
  sin = jnp.sin(angles)[..., None, :]
  if rope.attention_factor != 1.0:
    cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
