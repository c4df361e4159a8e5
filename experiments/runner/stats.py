r"""The statistics of the ablations; Student's t and Fisher's F come from `scipy.stats`.

* `paired`: the paired t-test. Arms A and B train seed s with the same initialisation
  and data order, so d_s = y_{A,s} − y_{B,s} removes what the seeds share. With n seeds,
  mean d̄, sample sd s_d: t = d̄ / (s_d/√n) on n − 1 degrees of freedom, 95% CI
  d̄ ± t_{0.975, n−1}·s_d/√n.
* `pooled`: with more than two arms, the additive arm + seed model
  y_{a,s} = μ + α_a + β_s + ε (two-way ANOVA without replication). Its residual variance
  σ̂² = Σ (y − ȳ_a − ȳ_s + ȳ)² / ((A−1)(S−1)) is shared by all arms, so a contrast
  ȳ_a − ȳ_b has standard error σ̂·√(2/S) on (A−1)(S−1) degrees of freedom (more than the
  paired test's S − 1), and F = [S·Σ_a (ȳ_a − ȳ)²/(A−1)] / σ̂² tests "any arm differs".
* `verdict`: reproduced / contradicted / "no effect larger than |CI bound| at this scale".
* `fit_bilinear_law`: Clark et al. 2022 (Unified Scaling Laws for Routed Language Models,
  eq. 3 with plain log E): log L = a·log N + b·log E + c·log N·log E + d, by least squares,
  with standard errors, the residual RMS and the leave-one-grid-point-out error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as distributions

LEVEL = 0.95  # every interval here is a 95% confidence interval

# ----------------------------------------------------------------------------- tests


@dataclasses.dataclass(frozen=True)
class Interval:
  """An estimated difference with its 95% confidence interval and two-sided p-value.

  `n`: seeds (pairs) behind it; `sd`: the sample sd of the paired differences (NaN for
  the pooled model, whose spread is `se`)."""

  estimate: float
  se: float
  df: float
  lo: float
  hi: float
  t: float
  p: float
  n: int
  sd: float = float("nan")


def _interval(estimate: float, se: float, df: float, n: int, sd: float = float("nan")) -> Interval:
  half = float(distributions.t.ppf(0.5 + LEVEL / 2, df)) * se
  if se > 0:
    t = estimate / se
  else:  # identical differences: an exact (degenerate) result
    t = math.copysign(math.inf, estimate) if estimate else 0.0
  p = float(2.0 * distributions.t.sf(abs(t), df)) if estimate or se > 0 else 1.0
  return Interval(estimate, se, df, estimate - half, estimate + half, t, p, n, sd)


def paired(differences: Sequence[float]) -> Interval:
  """The paired t-test of `differences` (one per seed: arm A's value minus arm B's)."""
  d = np.asarray(differences, dtype=np.float64)
  if d.ndim != 1 or len(d) < 2:
    raise ValueError(f"a paired test needs at least 2 paired seeds, got {len(d)}")
  sd = float(np.std(d, ddof=1))
  return _interval(float(np.mean(d)), sd / math.sqrt(len(d)), len(d) - 1, len(d), sd)


@dataclasses.dataclass(frozen=True)
class PooledModel:
  """The additive arm + seed model fitted to a complete arms × seeds table."""

  arms: tuple[str, ...]
  seeds: tuple[int, ...]
  arm_means: Mapping[str, float]
  residual_variance: float
  df: int
  f: float  # F statistic of "some arm differs"
  f_p: float

  def contrast(self, arm: str, baseline: str) -> Interval:
    """`arm` − `baseline` under the pooled model."""
    se = math.sqrt(2.0 * self.residual_variance / len(self.seeds))
    estimate = self.arm_means[arm] - self.arm_means[baseline]
    return _interval(estimate, se, self.df, len(self.seeds))


def pooled(table: Mapping[str, Mapping[int, float]]) -> PooledModel:
  """Fits y[arm][seed] = μ + α_arm + β_seed + ε over the seeds every arm has.

  Needs at least 3 arms (with 2 the model is the paired test) and 2 common seeds.
  """
  arms = tuple(table)
  if len(arms) < 3:
    raise ValueError(f"the pooled model needs at least 3 arms, got {len(arms)}")
  seeds = tuple(sorted(set.intersection(*(set(table[a]) for a in arms))))
  if len(seeds) < 2:
    raise ValueError(f"the pooled model needs at least 2 seeds common to all arms, got {seeds}")
  y = np.array([[table[a][s] for s in seeds] for a in arms], dtype=np.float64)
  grand = y.mean()
  arm_mean, seed_mean = y.mean(axis=1), y.mean(axis=0)
  residual = y - arm_mean[:, None] - seed_mean[None, :] + grand
  df = (len(arms) - 1) * (len(seeds) - 1)
  variance = float(np.sum(residual**2) / df)
  arm_square = len(seeds) * float(np.sum((arm_mean - grand) ** 2)) / (len(arms) - 1)
  if variance > 0:
    f = arm_square / variance
  else:
    f = math.inf if arm_square > 0 else 0.0
  return PooledModel(
    arms=arms,
    seeds=seeds,
    arm_means={a: float(m) for a, m in zip(arms, arm_mean, strict=True)},
    residual_variance=variance,
    df=df,
    f=f,
    f_p=float(distributions.f.sf(f, len(arms) - 1, df)) if arm_square > 0 or variance > 0 else 1.0,
  )


EXPECTED = ("lower", "higher")  # the sign of `arm − baseline` a paper reports


def verdict(interval: Interval, expected: str) -> str:
  """'reproduced' if the CI excludes 0 on the side the paper reports (`expected`: 'lower'
  or 'higher' for arm − baseline), 'contradicted' if it excludes 0 on the other side,
  else 'no effect larger than X at this scale', X the CI's largest |bound|."""
  if expected not in EXPECTED:
    raise ValueError(f"expected={expected!r}; allowed: {', '.join(EXPECTED)}")
  if interval.hi < 0 or interval.lo > 0:
    found = "lower" if interval.hi < 0 else "higher"
    return "reproduced" if found == expected else "contradicted"
  return f"no effect larger than {max(abs(interval.lo), abs(interval.hi)):.4g} at this scale"


def effect_tested(interval: Interval) -> float:
  """The effect size a run must resolve: |mean| when the CI excludes 0, else the largest
  |CI bound| (the largest effect the data still allow)."""
  if interval.hi < 0 or interval.lo > 0:
    return abs(interval.estimate)
  return max(abs(interval.lo), abs(interval.hi))


# ----------------------------------------------------------------------------- the scaling law


LAW_TERMS = ("a (log N)", "b (log E)", "c (log N · log E)", "d")


@dataclasses.dataclass(frozen=True)
class LawFit:
  """log L = a·log N + b·log E + c·log N·log E + d fitted to every run.

  `coef`, `se`, `lo`, `hi`: (a, b, c, d), their standard errors and 95% CIs (t on
  `df` = runs − 4); `rmse`: residual RMS of log L over the runs; `point_rmse`: of the
  fitted vs the mean log L of each grid point; `loo_rmse`: the RMS error of each grid
  point's mean log L predicted by a fit without that point; `seed_rms`: the RMS spread of
  log L between the seeds of a point (the noise no fit can remove; pooled sample sd)."""

  coef: tuple[float, float, float, float]
  se: tuple[float, float, float, float]
  lo: tuple[float, float, float, float]
  hi: tuple[float, float, float, float]
  df: int
  rmse: float
  point_rmse: float
  loo_rmse: float
  seed_rms: float
  points: int
  runs: int

  def predict(self, n: float, e: float) -> float:
    """Predicted L at N = `n`, E = `e`."""
    a, b, c, d = self.coef
    ln, le = math.log(n), math.log(e)
    return math.exp(a * ln + b * le + c * ln * le + d)


def _design(n: np.ndarray, e: np.ndarray) -> np.ndarray:
  ln, le = np.log(n), np.log(e)
  return np.stack([ln, le, ln * le, np.ones_like(ln)], axis=1)


def fit_bilinear_law(n: Sequence[float], e: Sequence[float], loss: Sequence[float]) -> LawFit:
  """Fits Clark et al.'s bilinear law to runs (N, E, L); a grid point is a distinct (N, E).

  Needs at least 5 runs over at least 5 grid points (4 coefficients, and one point left
  out at a time)."""
  n_, e_, y = (np.asarray(v, dtype=np.float64) for v in (n, e, loss))
  if not (len(n_) == len(e_) == len(y)):
    raise ValueError("fit_bilinear_law: N, E and L differ in length")
  keys = list(zip(n_.tolist(), e_.tolist(), strict=True))
  points = list(dict.fromkeys(keys))
  if len(points) < 5:
    raise ValueError(f"fit_bilinear_law needs at least 5 grid points, got {len(points)}")
  x, log_y = _design(n_, e_), np.log(y)
  coef, *_ = np.linalg.lstsq(x, log_y, rcond=None)
  residual = log_y - x @ coef
  df = len(y) - 4
  sigma2 = float(residual @ residual / df) if df > 0 else float("nan")
  cov = sigma2 * np.linalg.inv(x.T @ x)
  se = np.sqrt(np.diag(cov))
  half = distributions.t.ppf(0.5 + LEVEL / 2, df) * se if df > 0 else np.full(4, np.nan)
  # Per grid point: mean log L, the fit there, and the spread between its seeds.
  mean_at, fitted_at, loo_err, seed_ss, seed_df = {}, {}, [], 0.0, 0
  for p in points:
    mask = np.array([k == p for k in keys])
    mean_at[p] = float(log_y[mask].mean())
    fitted_at[p] = float((_design(np.array([p[0]]), np.array([p[1]])) @ coef)[0])
    seed_ss += float(np.sum((log_y[mask] - mean_at[p]) ** 2))
    seed_df += int(mask.sum()) - 1
    loo, *_ = np.linalg.lstsq(x[~mask], log_y[~mask], rcond=None)
    predicted = float((_design(np.array([p[0]]), np.array([p[1]])) @ loo)[0])
    loo_err.append(predicted - mean_at[p])
  return LawFit(
    coef=tuple(float(c) for c in coef),
    se=tuple(float(s) for s in se),
    lo=tuple(float(c - h) for c, h in zip(coef, half, strict=True)),
    hi=tuple(float(c + h) for c, h in zip(coef, half, strict=True)),
    df=df,
    rmse=float(math.sqrt(np.mean(residual**2))),
    point_rmse=float(math.sqrt(np.mean([(fitted_at[p] - mean_at[p]) ** 2 for p in points]))),
    loo_rmse=float(math.sqrt(np.mean(np.square(loo_err)))),
    seed_rms=math.sqrt(seed_ss / seed_df) if seed_df else float("nan"),
    points=len(points),
    runs=len(y),
  )
