"""The ablations' statistics (`experiments/runner/stats.py`) against hand calculations:
the t and F distributions (from scipy.stats) against closed forms and printed t-table
values, and paired tests, a pooled two-way model and a scaling-law fit worked out by hand
in the comments."""

import math

import numpy as np
import pytest

from experiments.runner import stats

# Two-sided 95% critical values t_{0.975, df}, as printed in any t-table (3 decimals).
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 11: 2.201, 30: 2.042}


def _t4_cdf(t):
  """P(T <= t), 4 degrees of freedom, in closed form:
  F(t) = 1/2 + (3/8) · t/√(1+t²/4) · (1 − t²/(12·(1+t²/4)))."""
  u = 1 + t * t / 4
  return 0.5 + 3 / 8 * t / math.sqrt(u) * (1 - t * t / (12 * u))


def _differences(n, mean, sd):
  """`n` paired differences with exactly this mean and sample sd."""
  z = np.arange(n, dtype=float) - (n - 1) / 2
  return list(mean + sd * z / np.std(z, ddof=1))


# ------------------------------------------------------------ the distributions (scipy.stats)


def test_confidence_intervals_use_the_t_table():
  """The CI half-width over the standard error is t_{0.975, n−1}, as printed in a t-table."""
  for df, value in T_TABLE_975.items():
    r = stats.paired(_differences(df + 1, 0.01, 0.004))
    assert r.df == df and r.se == pytest.approx(0.004 / math.sqrt(df + 1))
    assert round((r.hi - r.estimate) / r.se, 3) == value, df
    assert (r.estimate - r.lo) == pytest.approx(r.hi - r.estimate)


def test_p_values_against_closed_forms():
  for mean in (0.0012, 0.004, 0.01, 0.06):
    # 2 seeds, df = 1: the Cauchy distribution, P(|T| > t) = 1 − (2/π)·atan(t).
    r = stats.paired(_differences(2, mean, 0.004))
    assert r.p == pytest.approx(1 - 2 / math.pi * math.atan(abs(r.t)), rel=1e-10)
    # 3 seeds, df = 2: P(|T| > t) = 1 − t/√(2 + t²).
    r = stats.paired(_differences(3, -mean, 0.004))
    assert r.p == pytest.approx(1 - abs(r.t) / math.sqrt(2 + r.t**2), rel=1e-9)


def test_f_test_against_its_closed_form():
  """Three arms: F on (2, ν2) degrees of freedom, P(F > f) = (1 + 2f/ν2)^(−ν2/2)."""
  rng = np.random.default_rng(0)
  for seeds in (3, 4, 6):
    table = {
      a: {s: float(rng.normal(0.1 * i, 0.05)) for s in range(seeds)} for i, a in enumerate("ABC")
    }
    model = stats.pooled(table)
    d2 = model.df
    assert d2 == 2 * (seeds - 1)
    assert model.f_p == pytest.approx((1 + 2 * model.f / d2) ** (-d2 / 2), rel=1e-10)


# ----------------------------------------------------------------------------- paired test


def test_paired_test_of_two_seeds_by_hand():
  """The audit's top_k: top-2 − top-1 differences of 0.021 and 0.024 bits/byte.

  mean = 0.0225; sd = |0.024 − 0.021|/√2 = 0.0021213; se = sd/√2 = 0.0015;
  t = 0.0225/0.0015 = 15.0 on 1 df; t-table 12.706: CI = 0.0225 ± 0.019059
  = [0.003441, 0.041559]; p = 1 − (2/π)·atan(15) = 0.04238."""
  r = stats.paired([0.021, 0.024])
  assert (r.n, r.df) == (2, 1)
  assert r.estimate == pytest.approx(0.0225)
  assert r.sd == pytest.approx(0.0021213, rel=1e-4)
  assert r.se == pytest.approx(0.0015)
  assert r.t == pytest.approx(15.0)
  assert r.lo == pytest.approx(0.003441, abs=2e-6)
  assert r.hi == pytest.approx(0.041559, abs=2e-6)
  assert r.p == pytest.approx(0.04238, abs=1e-5)


def test_paired_test_of_five_seeds_by_hand():
  """Differences [0.021, 0.024, 0.015, 0.030, 0.010]: sum 0.100, mean 0.020; deviations
  +1, +4, −5, +10, −10 (×1e-3), squares 1 + 16 + 25 + 100 + 100 = 242e-6; variance
  242e-6/4 = 60.5e-6, sd 0.0077782; se = sd/√5 = 0.0034785; t = 5.7496 on 4 df;
  t-table 2.776: CI = 0.020 ± 0.0096564 = [0.010344, 0.029656]; p = 2·(1 − F₄(5.7496))
  = 2·(1 − 0.997732) = 0.004535 (closed form of F₄ above)."""
  r = stats.paired([0.021, 0.024, 0.015, 0.030, 0.010])
  assert (r.n, r.df) == (5, 4)
  assert r.estimate == pytest.approx(0.020)
  assert r.sd == pytest.approx(math.sqrt(60.5e-6))
  assert r.se == pytest.approx(0.0034785, rel=1e-4)
  assert r.t == pytest.approx(5.7496, rel=1e-4)
  assert r.lo == pytest.approx(0.010344, abs=2e-6)
  assert r.hi == pytest.approx(0.029656, abs=2e-6)
  assert r.p == pytest.approx(0.004535, abs=2e-6)
  assert r.p == pytest.approx(2 * (1 - _t4_cdf(r.t)), rel=1e-9)
  # The sign follows the order of the difference.
  flipped = stats.paired([-d for d in (0.021, 0.024, 0.015, 0.030, 0.010)])
  assert (flipped.lo, flipped.hi) == pytest.approx((-r.hi, -r.lo))


def test_paired_test_edge_cases():
  with pytest.raises(ValueError, match="at least 2"):
    stats.paired([0.1])
  same = stats.paired([0.01, 0.01, 0.01])  # no spread: an exact difference
  assert (same.lo, same.hi, same.p) == (0.01, 0.01, 0.0)
  zero = stats.paired([0.0, 0.0])
  assert zero.p == 1.0 and stats.verdict(zero, "lower").startswith("no effect larger than 0 ")


def test_verdicts():
  r = stats.paired([0.021, 0.024])  # CI [0.0034, 0.0416]: above 0
  assert stats.verdict(r, "higher") == "reproduced"
  assert stats.verdict(r, "lower") == "contradicted"
  assert stats.effect_tested(r) == pytest.approx(0.0225)  # |mean| when 0 is excluded
  wide = stats.paired([-0.01, 0.004, 0.002])  # mean −0.00133, CI about [−0.0199, +0.0173]
  text = stats.verdict(wide, "lower")
  bound = max(abs(wide.lo), abs(wide.hi))
  assert text == f"no effect larger than {bound:.4g} at this scale"
  assert stats.effect_tested(wide) == bound
  with pytest.raises(ValueError, match="expected"):
    stats.verdict(r, "better")


# ----------------------------------------------------------------------------- pooled model


def test_pooled_arm_plus_seed_model_by_hand():
  """Arms × seeds
        s0  s1  s2 | arm mean
    A   10  12  14 | 12
    B   11  14  14 | 13
    C   12  13  17 | 14
  seed means 11, 13, 15; grand mean 13. Residuals y − ȳ_arm − ȳ_seed + ȳ: A 0 0 0,
  B 0 +1 −1, C 0 −1 +1: SSE = 4 on (3−1)(3−1) = 4 df, σ̂² = 1. Arms: SS = 3·(1 + 0 + 1)
  = 6 on 2 df, F = 3/1 = 3, p = (1 + 2·3/4)^(−2) = 0.16. C − A = 2, se = √(2σ̂²/3)
  = 0.81650, t = 2.4495 on 4 df, CI 2 ± 2.776·0.81650 = 2 ± 2.2666."""
  table = {"A": {0: 10, 1: 12, 2: 14}, "B": {0: 11, 1: 14, 2: 14}, "C": {0: 12, 1: 13, 2: 17}}
  model = stats.pooled(table)
  assert model.residual_variance == pytest.approx(1.0)
  assert model.df == 4
  assert model.f == pytest.approx(3.0) and model.f_p == pytest.approx(0.16)
  c = model.contrast("C", "A")
  assert c.estimate == pytest.approx(2.0) and c.se == pytest.approx(0.81650, rel=1e-4)
  assert c.t == pytest.approx(2.4495, rel=1e-4) and c.df == 4
  # The table's 2.776 is rounded by up to 5e-4: the bounds by up to 5e-4 · 0.8165.
  assert (c.lo, c.hi) == pytest.approx((2 - 2.2666, 2 + 2.2666), abs=4.1e-4)
  assert c.p == pytest.approx(2 * (1 - _t4_cdf(2.4495)), abs=1e-4)
  # The paired test of the same two arms uses their differences alone: [2, 1, 3], sd 1,
  # se 1/√3, on 2 df: a wider CI, 2 ± 4.303/√3 = 2 ± 2.4843.
  paired = stats.paired([12 - 10, 13 - 12, 17 - 14])
  assert (paired.lo, paired.hi) == pytest.approx((2 - 2.4843, 2 + 2.4843), abs=3e-4)
  # A seed one arm lacks is left out of the model.
  with_gap = {**table, "D": {0: 9.0, 1: 9.5}}
  assert stats.pooled(with_gap).seeds == (0, 1)
  with pytest.raises(ValueError, match="3 arms"):
    stats.pooled({"A": table["A"], "B": table["B"]})


# ----------------------------------------------------------------------------- scaling law


def _grid(delta):
  """3 sizes x 4 expert counts x 2 seeds on log L = −0.1·ln N − 0.05·ln E + 0.01·ln N·ln E
  + 1.5, the two seeds at ±delta in log L around it."""
  coef = (-0.1, -0.05, 0.01, 1.5)
  n, e, loss = [], [], []
  for size in (8e4, 3e5, 1.1e6):
    for experts in (1, 4, 16, 64):
      ln, le = math.log(size), math.log(experts)
      exact = coef[0] * ln + coef[1] * le + coef[2] * ln * le + coef[3]
      for sign in (+1, -1):
        n.append(size)
        e.append(experts)
        loss.append(math.exp(exact + sign * delta))
  return coef, n, e, loss


def test_bilinear_law_fit_by_hand():
  """Seeds at ±δ around the exact law: their mean lies on it, and ±δ is orthogonal to every
  regressor (constant within a grid point), so least squares returns the exact
  coefficients; every residual is ±δ (RMS δ), the grid-point means are fitted exactly
  (point and leave-one-out errors 0), and the between-seed sd is √((δ² + δ²)/1) = √2·δ."""
  delta = 0.01
  coef, n, e, loss = _grid(delta)
  fit = stats.fit_bilinear_law(n, e, loss)
  assert fit.coef == pytest.approx(coef, abs=1e-9)
  assert (fit.runs, fit.points, fit.df) == (24, 12, 20)
  assert fit.rmse == pytest.approx(delta)
  assert fit.point_rmse == pytest.approx(0.0, abs=1e-9)
  assert fit.loo_rmse == pytest.approx(0.0, abs=1e-9)
  assert fit.seed_rms == pytest.approx(math.sqrt(2) * delta)
  assert fit.predict(3e5, 16) == pytest.approx(
    math.exp(-0.1 * math.log(3e5) - 0.05 * math.log(16) + 0.01 * math.log(3e5) * math.log(16) + 1.5)
  )
  for c, lo, hi in zip(fit.coef, fit.lo, fit.hi, strict=True):
    assert lo < c < hi
  # A grid point off the law: its left-out prediction misses it, the fit error grows.
  _, n, e, loss = _grid(0.0)
  loss[0] *= math.exp(0.05)
  loss[1] *= math.exp(0.05)
  off = stats.fit_bilinear_law(n, e, loss)
  assert off.loo_rmse > off.point_rmse > 0 and off.seed_rms == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="5 grid points"):
    stats.fit_bilinear_law(n[:8], e[:8], loss[:8])


def test_bilinear_law_recovers_coefficients_from_noise():
  rng = np.random.default_rng(0)
  coef, n, e, loss = _grid(0.0)
  noisy = [x * math.exp(rng.normal(0, 0.002)) for x in loss]
  fit = stats.fit_bilinear_law(n, e, noisy)
  inside = [lo <= c <= hi for c, lo, hi in zip(coef, fit.lo, fit.hi, strict=True)]
  assert sum(inside) >= 3  # 95% intervals: all four, but for bad luck
