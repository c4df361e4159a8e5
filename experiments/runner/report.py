r"""The report of an ablation: paired contrasts with their verdicts (contrasts.csv), the
summary (summary.md), the curves (PNG), all computed from the result rows.

For every contrast (the pre-registered primary first, then the exploratory secondary
ones) and for eval bits/byte and train cross-entropy alike: the paired t-test over the
seeds both arms have (`stats.paired`), and with more than two arms the pooled arm + seed
model over all arms (`stats.pooled`). The verdict is computed from the paired 95% CI
(`stats.verdict`), never written by hand. "Long enough" compares each arm's remaining
slope (the eval bits/byte drop over the last 20% of steps) with the effect the primary
contrast tests (`stats.effect_tested`).
"""

from __future__ import annotations

import io
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.runner import stats
from experiments.runner.accounting import checked_arms
from experiments.runner.results import RESULT_COLUMNS, collect_rows, csv_bytes
from experiments.runner.spec import METRICS, SWEEP_SEED, Ablation, Contrast
from experiments.runner.workdir import read_json, write_keeping_previous

CONTRAST_COLUMNS = (
  "contrast",
  "role",
  "metric",
  "expected",
  "n",
  "mean",
  "sd",
  "lo",
  "hi",
  "t",
  "df",
  "p",
  "verdict",
  "pooled_mean",
  "pooled_lo",
  "pooled_hi",
  "pooled_df",
  "pooled_p",
  "pooled_f",
  "pooled_f_p",
)
NAN = float("nan")


def _table(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[int, float]]:
  """arm -> seed -> value of `metric` (finite values only)."""
  out: dict[str, dict[int, float]] = {}
  for r in rows:
    value = r.get(metric, NAN)
    if isinstance(value, (int, float)) and math.isfinite(value):
      out.setdefault(r["arm"], {})[int(r["seed"])] = float(value)
  return out


def contrast_metrics(contrast: Contrast) -> tuple[str, ...]:
  """The metrics a contrast is reported on: its own, and train CE beside eval bits/byte."""
  if contrast.metric == "final_eval_bits_per_byte":
    return (contrast.metric, "final_train_ce_loss")
  return (contrast.metric,)


def contrast_results(ablation: Ablation, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One dict per (contrast, metric) with CONTRAST_COLUMNS; a contrast whose arms do not
  share two seeds in `rows` has n < 2 and NaN statistics."""
  out = []
  for role, contrast in [("primary", ablation.primary)] + [
    ("secondary", c) for c in ablation.secondary
  ]:
    for metric in contrast_metrics(contrast):
      table = _table(rows, metric)
      a, b = table.get(contrast.arm, {}), table.get(contrast.baseline, {})
      seeds = sorted(set(a) & set(b))
      result = {k: NAN for k in CONTRAST_COLUMNS}
      result.update(
        contrast=contrast.name, role=role, metric=metric, expected=contrast.expected, n=len(seeds)
      )
      absent = [arm for arm in (contrast.arm, contrast.baseline) if arm not in table]
      if absent:
        result["verdict"] = f"no results of {', '.join(absent)}"
      else:
        result["verdict"] = "needs ≥ 2 seeds of both arms"
      if len(seeds) >= 2:
        paired = stats.paired([a[s] - b[s] for s in seeds])
        result.update(
          mean=paired.estimate, sd=paired.sd, lo=paired.lo, hi=paired.hi, t=paired.t,
          df=paired.df, p=paired.p, verdict=stats.verdict(paired, contrast.expected),
        )  # fmt: skip
        full = {arm: v for arm, v in table.items() if len(v) >= 2}
        if len(full) > 2:
          try:
            model = stats.pooled(full)
          except ValueError:  # fewer than 2 seeds common to all arms
            model = None
          if model is not None:
            pooled = model.contrast(contrast.arm, contrast.baseline)
            result.update(
              pooled_mean=pooled.estimate, pooled_lo=pooled.lo, pooled_hi=pooled.hi,
              pooled_df=pooled.df, pooled_p=pooled.p, pooled_f=model.f, pooled_f_p=model.f_p,
            )  # fmt: skip
      out.append(result)
  return out


# ----------------------------------------------------------------------------- formatting


def _f(x: float, fmt: str = ".4f") -> str:
  if isinstance(x, (int, float)) and math.isfinite(x):
    return format(x, fmt)
  return "–"


def format_p(p: float) -> str:
  """A p-value as the reports print it: two significant digits, or "<0.0001"."""
  if not (isinstance(p, float) and math.isfinite(p)):
    return "–"
  return "<0.0001" if p < 1e-4 else f"{p:.2g}"


def _mean_sd(values: Sequence[float], fmt: str) -> str:
  values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  if not values:
    return "–"
  if len(values) == 1:
    return format(values[0], fmt)
  return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def contrast_table(results: Sequence[Mapping[str, Any]]) -> list[str]:
  """Markdown lines of a table of `contrast_results` rows."""
  lines = [
    "| contrast | metric | seeds | mean diff | sd | 95% CI | t (df) | p | verdict | "
    "pooled: diff [95% CI] (df), p |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    pooled = "–"
    if math.isfinite(r["pooled_mean"]):
      pooled = (
        f"{r['pooled_mean']:+.4f} [{r['pooled_lo']:+.4f}, {r['pooled_hi']:+.4f}] "
        f"({r['pooled_df']:.0f}), {format_p(r['pooled_p'])}"
      )
    ci = f"[{r['lo']:+.4f}, {r['hi']:+.4f}]" if math.isfinite(r["lo"]) else "–"
    lines.append(
      f"| `{r['contrast']}` | {METRICS[r['metric']]} | {r['n']} | {_f(r['mean'], '+.4f')} | "
      f"{_f(r['sd'])} | {ci} | {_f(r['t'], '.2f')} ({_f(r['df'], '.0f')}) | {format_p(r['p'])} | "
      f"**{r['verdict']}** | {pooled} |"
    )
  return lines


def convergence_lines(
  ablation: Ablation, rows: Sequence[Mapping[str, Any]], primary: Mapping[str, Any] | None
) -> list[str]:
  """Is each arm trained long enough for the primary contrast? Its eval curve's drop
  over the last 20% of steps (mean over seeds) against the effect tested."""
  if primary is None or not math.isfinite(primary["lo"]):
    return ["Long enough: not decided (the primary contrast needs ≥ 2 paired seeds)."]
  interval = stats.Interval(
    primary["mean"], NAN, primary["df"], primary["lo"], primary["hi"], primary["t"],
    primary["p"], primary["n"],
  )  # fmt: skip
  effect = stats.effect_tested(interval)
  drops = {}
  for arm in (ablation.primary.arm, ablation.primary.baseline):
    values = [r["eval_drop_last_20pct"] for r in rows if r["arm"] == arm]
    values = [v for v in values if math.isfinite(v)]
    if values:
      drops[arm] = statistics.mean(values)
  if len(drops) < 2:
    return ["Long enough: not decided (no evaluation at or before 80% of the steps)."]
  worst = max(drops.values())
  ok = worst < effect
  shown = ", ".join(f"`{a}` {d:.4f}" for a, d in drops.items())
  return [
    f"Long enough: **{'yes' if ok else 'no'}**. The eval bits/byte still fell over the last "
    f"20% of steps by {shown} (mean over seeds), "
    f"{'less' if ok else 'not less'} than the effect tested, {effect:.4f} "
    f"({'|mean difference|' if interval.hi < 0 or interval.lo > 0 else 'the largest |CI bound|'}"
    " of the primary contrast)." + ("" if ok else " Longer runs could still change this contrast.")
  ]


def _sweep_lines(ablation: Ablation, sweep_rows: Sequence[Mapping[str, Any]], rows) -> list[str]:
  if not sweep_rows:
    return []
  trained_at = {r["arm"]: r["learning_rate"] for r in rows}
  lines = [
    "",
    f"## Learning-rate sweep (seed {SWEEP_SEED})",
    "",
    f"Each arm's learning rate is the grid value with the lowest final "
    f"{METRICS[ablation.lr_metric]} of its sweep (arms with `lr_from` take that arm's). "
    "✓ marks the rate the seeds trained at.",
    "",
    "| arm | learning rate | train CE | eval bits/byte | |",
    "|---|---|---|---|---|",
  ]
  for r in sweep_rows:
    mark = "✓" if trained_at.get(r["arm"]) == r["learning_rate"] else ""
    lines.append(
      f"| `{r['arm']}` | {r['learning_rate']:g} | {_f(r['final_train_ce_loss'])} | "
      f"{_f(r['final_eval_bits_per_byte'])} | {mark} |"
    )
  return lines


def _ranking_lines(ablation: Ablation, sweep_rows) -> list[str]:
  """The primary contrast's sign at each swept learning rate (one seed: descriptive)."""
  c = ablation.primary
  at = {(r["arm"], r["learning_rate"]): r[c.metric] for r in sweep_rows}
  rates = sorted({lr for (arm, lr) in at if arm == c.arm and (c.baseline, lr) in at})
  if not rates:
    return []
  parts = [f"{lr:g}: {at[c.arm, lr] - at[c.baseline, lr]:+.4f}" for lr in rates]
  return [
    "",
    f"`{c.name}` ({METRICS[c.metric]}) at each swept learning rate, seed {SWEEP_SEED}: "
    + "; ".join(parts)
    + ".",
  ]


def _wall_lines(rows, sweep_rows, estimate: Mapping[str, Any] | None) -> list[str]:
  walls = [r["wall_s"] for r in list(rows) + list(sweep_rows) if math.isfinite(r["wall_s"])]
  lines = ["", "## Wall time", ""]
  if not walls:
    return lines + ["No finished run recorded its wall time."]
  measured = sum(walls)
  lines.append(
    f"Measured: {measured / 60:.1f} min over {len(walls)} runs "
    f"({measured / len(walls):.0f} s per run)."
  )
  if estimate:
    runs = sum(a["runs"] for a in estimate["per_arm"].values())
    lines.append(
      f"Estimated beforehand (`--estimate`, {estimate.get('measured_at', '?')}): "
      f"{estimate['total_s'] / 60:.1f} min for {runs} runs; measured / estimated per run = "
      f"{(measured / len(walls)) / (estimate['total_s'] / runs):.2f}."
    )
    step = {}
    for r in rows:
      step.setdefault(r["arm"], []).append(r["step_s"])
    parts = [
      f"`{arm}` {statistics.median(step[arm]) * 1e3:.0f} / {e['step_s'] * 1e3:.0f}"
      for arm, e in estimate["per_arm"].items()
      if arm in step
    ]
    if parts:
      lines.append("Seconds per step, measured median / estimated (ms): " + ", ".join(parts) + ".")
  return lines


def summary_markdown(
  ablation: Ablation,
  preset: str,
  arms,
  result: Mapping[str, Any],
  contrasts: Sequence[Mapping[str, Any]],
  constraint_lines: Sequence[str],
  estimate: Mapping[str, Any] | None = None,
) -> str:
  rows, sweep_rows, pending = result["rows"], result["sweep_rows"], result["pending"]
  r0 = rows[0]
  seeds = sorted({r["seed"] for r in rows})
  lines = [f"# {ablation.title} ({ablation.name}, preset `{preset}`)", ""]
  grid = ablation.learning_rates[preset]
  rates = (
    f"learning rates chosen by a sweep over {', '.join(f'{x:g}' for x in grid)} at seed "
    f"{SWEEP_SEED}"
    if len(grid) > 1
    else f"learning rate {grid[0]:g} (no sweep at this preset)"
  )
  steps = {r["arm"]: r["steps"] for r in rows}  # arms of equal FLOPs may differ in steps
  length = (
    f"{r0['steps']:.0f} steps of {_human(r0['tokens'] / r0['steps'])} tokens "
    f"({_human(r0['tokens'])} tokens per run)"
    if len(set(steps.values())) == 1
    else f"steps of {_human(r0['tokens'] / r0['steps'])} tokens, per arm: "
    + ", ".join(f"`{arm}` {n:.0f}" for arm, n in steps.items())
  )
  lines += [
    f"Protocol: {length}; evaluation on {r0['eval_batches']:.0f} "
    f"held-out batches during training and at the end; seeds {', '.join(map(str, seeds))}, "
    f"paired across arms; {rates}. Mean ± sample sd over seeds. Train CE: mean over the "
    "last 10% of steps; eval: the last evaluation; eval drop: from the last evaluation at "
    "or before 80% of the steps to the end.",
    "",
    "Constraints (checked with `moejax.models.flops` before training):",
    "",
  ]
  lines += [f"- {c}" for c in constraint_lines] + [""]
  lines += [
    "| arm | what | learning rate | active params | total params | FFN active | FFN total | "
    "fwd FLOPs/token | tokens/active param |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  outcome = [
    "| arm | seeds | eval bits/byte | train CE | eval drop, last 20% | ms/step | "
    "dropped (train) | dropped (eval) | imbalance |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for arm in arms:
    rs = [r for r in rows if r["arm"] == arm.name]
    if not rs:
      continue
    a = rs[0]
    col = lambda key, fmt, scale=1.0, rs=rs: _mean_sd([r[key] * scale for r in rs], fmt)
    arm_rates = sorted({r["learning_rate"] for r in rs})
    lines.append(
      f"| `{arm.name}` | {arm.note} | {', '.join(f'{x:g}' for x in arm_rates)} | "
      f"{_human(a['params_active'])} | {_human(a['params_total'])} | {_human(a['ffn_active'])} | "
      f"{_human(a['ffn_total'])} | {_human(a['flops_per_token'])} | "
      f"{a['tokens_per_active_param']:.2f} |"
    )
    outcome.append(
      f"| `{arm.name}` | {len(rs)} | {col('final_eval_bits_per_byte', '.4f')} | "
      f"{col('final_train_ce_loss', '.4f')} | {col('eval_drop_last_20pct', '.4f')} | "
      f"{col('step_s', '.0f', 1e3)} | {col('train_dropped_fraction', '.4f')} | "
      f"{col('eval_dropped_fraction', '.4f')} | {col('expert_load_imbalance', '.2f')} |"
    )
  lines += [""] + outcome + [""]
  missing = [a.name for a in arms if not any(r["arm"] == a.name for r in rows)]
  if missing or pending:
    lines += [f"Not finished yet: {', '.join(missing + list(pending))}.", ""]
  c = ablation.primary
  lines += [
    f"## Primary contrast (pre-registered): `{c.name}`",
    "",
    f"{c.claim} Expected sign of `{c.name}`: {c.expected} ({METRICS[c.metric]}). Verdict "
    "from the paired 95% CI: reproduced (excludes 0 on the expected side), contradicted "
    "(excludes 0 on the other), or no effect larger than its largest |bound|.",
    "",
  ]
  lines += contrast_table([r for r in contrasts if r["role"] == "primary"]) + [""]
  primary = next((r for r in contrasts if r["role"] == "primary"), None)
  lines += convergence_lines(ablation, rows, primary)
  if primary is not None and math.isfinite(primary["pooled_f"]):
    lines += [
      "",
      f"Pooled arm + seed model over all {len({r['arm'] for r in rows})} arms: "
      f"F = {primary['pooled_f']:.2f}, p = {format_p(primary['pooled_f_p'])} (some arm differs).",
    ]
  secondary = [r for r in contrasts if r["role"] == "secondary"]
  if secondary:
    lines += ["", "## Secondary contrasts (exploratory, not corrected for multiplicity)", ""]
    for s in ablation.secondary:
      lines.append(f"- `{s.name}`: {s.claim} Expected: {s.expected}.")
    lines += [""] + contrast_table(secondary)
  lines += _sweep_lines(ablation, sweep_rows, rows) + _ranking_lines(ablation, sweep_rows)
  lines += _wall_lines(rows, sweep_rows, estimate)
  if ablation.extra_report is not None:
    lines += [""] + ablation.extra_report(ablation, preset, rows)
  lines += [
    "",
    "![eval bits per byte](eval_bits_per_byte.png)",
    "",
    "![train cross-entropy](train_ce_loss.png)",
    "",
  ]
  return "\n".join(lines)


def arm_colors(count: int) -> list[tuple[float, float, float]]:
  """One RGB colour per arm: tab10's, or tab20's past 10 arms (`scaling` has 12), so that
  no two arms share a colour up to 20 arms."""
  from matplotlib import colormaps

  palette = colormaps["tab10" if count <= 10 else "tab20"].colors
  return [palette[i % len(palette)] for i in range(count)]


def plot_curves(
  ablation: Ablation, preset: str, arms, curves: Mapping[tuple[str, int], tuple[list, list]]
) -> dict[str, bytes]:
  """PNG bytes of eval bits/byte and train CE vs step, one line per arm (the mean over
  seeds; the band spans the seeds' min to max)."""
  # Figure objects of their own: no pyplot state, no backend switch for the caller.
  from matplotlib.figure import Figure

  out = {}
  for index, (name, label) in enumerate(
    (("eval_bits_per_byte", "eval bits per byte"), ("train_ce_loss", "train CE (nats/token)"))
  ):
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.subplots()
    for color, arm in zip(arm_colors(len(arms)), arms, strict=True):
      series = [dict(curves[key][index]) for key in sorted(curves) if key[0] == arm.name]
      if not series:
        continue
      steps = sorted(set.intersection(*(set(s) for s in series)))
      mean = [statistics.mean(s[x] for s in series) for x in steps]
      ax.plot(
        steps,
        mean,
        color=color,
        label=f"{arm.name} ({len(series)} seed{'s' if len(series) > 1 else ''})",
        marker="o" if index == 0 else None,
        markersize=3,
      )
      if len(series) > 1:
        low = [min(s[x] for s in series) for x in steps]
        high = [max(s[x] for s in series) for x in steps]
        ax.fill_between(steps, low, high, color=color, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title(f"{ablation.title} ({preset})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    out[f"{name}.png"] = buffer.getvalue()
  return out


def collect_results(
  ablation: Ablation,
  preset: str,
  workdir: str,
  *,
  base_overrides: Mapping[str, Any] | None = None,
  log: Callable[[str], None] = print,
  constraint_lines: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
  """Rows of every finished arm/seed under `workdir`, written with the contrasts, the
  summary and the plots (each file rewritten only if it changed; the previous kept).
  `base_overrides` (the CLI's `--set`) only shape the constraint lines; the rows come
  from what each run trained (its arm.json)."""
  arms, _, _, lines = checked_arms(ablation, preset, base_overrides)
  constraint_lines = lines if constraint_lines is None else constraint_lines
  result = collect_rows(ablation, preset, workdir, log=log)
  rows = result["rows"]
  if not rows:
    log(f"no finished runs under {workdir} yet")
    return rows
  contrasts = contrast_results(ablation, rows)
  estimate_path = os.path.join(workdir, "estimate.json")
  estimate = read_json(estimate_path) if os.path.exists(estimate_path) else None
  files = {
    "results.csv": csv_bytes(rows, RESULT_COLUMNS),
    "contrasts.csv": csv_bytes(contrasts, CONTRAST_COLUMNS),
    "summary.md": summary_markdown(
      ablation, preset, arms, result, contrasts, constraint_lines, estimate
    ).encode(),
  }
  if result["sweep_rows"]:
    files["lr_sweep.csv"] = csv_bytes(result["sweep_rows"], RESULT_COLUMNS)
  files.update(plot_curves(ablation, preset, arms, result["curves"]))
  for name, data in files.items():
    write_keeping_previous(os.path.join(workdir, name), data, log=log)
  primary = contrasts[0]
  log(
    f"results: {os.path.join(workdir, 'results.csv')} ({len(rows)} runs), contrasts.csv, "
    f"summary.md, plots; primary `{primary['contrast']}`: {primary['verdict']}"
  )
  return rows
