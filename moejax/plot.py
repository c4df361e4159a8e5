"""Plot a run: `python -m moejax.plot --workdir=DIR [--out=DIR/plots]` (or `make plot`).

Reads `DIR/metrics.jsonl` (never writing to it) and writes three PNGs into `--out`:
- `loss.png`: train loss and cross-entropy per step, eval loss at the eval steps, and
  eval bits per byte;
- `dropped_fraction.png`: the share of expert assignments dropped by capacity, train and eval;
- `expert_load.png`: per MoE layer, a heat map of each expert's share of assignments
  over the logged steps (1/E everywhere when balanced).
Rerunning replaces these three files (they are derived from the log).
"""

from __future__ import annotations

from moejax.runtime import signals

if __name__ == "__main__":  # first thing: a signal at any later moment ends it cleanly
  signals.handle_signals("plotting stopped.")


import io
import re
from typing import Any

from absl import flags
from etils import epath

from moejax.runtime import cli
from moejax.training import workdir as workdir_lib
from moejax.training.metrics import METRICS_FILE, read_metrics

_LOAD_KEY = re.compile(r"^train/expert_load/layer_(\d+)$")


def define_flags() -> None:
  """The command's flags (defined when it runs, so that importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Run directory with metrics.jsonl (only read).")
  flags.DEFINE_string("out", None, "Directory for the PNGs (default: WORKDIR/plots).")
  flags.mark_flag_as_required("workdir")


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
  """(steps, values) of every record that has `key`."""
  pairs = [(r["step"], r[key]) for r in records if key in r]
  return [s for s, _ in pairs], [v for _, v in pairs]


def expert_loads(records: list[dict[str, Any]]) -> dict[int, tuple[list[int], list[list[float]]]]:
  """`{layer: (steps, [steps][experts] shares)}` from the `train/expert_load/layer_I` records."""
  layers = sorted({int(m.group(1)) for r in records for k in r if (m := _LOAD_KEY.match(k))})
  return {layer: series(records, f"train/expert_load/layer_{layer}") for layer in layers}


def figures(records: list[dict[str, Any]]) -> dict[str, Any]:
  """`{file name: matplotlib Figure}` of the run's curves and expert-load heat maps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  out = {}
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
  for key, label, style in (
    ("train/loss", "train loss", "-"),
    ("train/ce_loss", "train cross-entropy", ":"),
    ("eval/loss", "eval loss", "o-"),
  ):
    steps, values = series(records, key)
    if steps:
      left.plot(steps, values, style, ms=3, label=label)
  left.set(xlabel="step", ylabel="nats per token", title="Loss")
  steps, values = series(records, "eval/bits_per_byte")
  right.plot(steps, values, "o-", ms=3, color="C2")
  right.set(xlabel="step", ylabel="bits per byte", title="Eval bits per byte")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  if left.get_legend_handles_labels()[0]:
    left.legend()
  fig.tight_layout()
  out["loss.png"] = fig

  fig, ax = plt.subplots(figsize=(6, 3.6))
  for key, label, style in (
    ("train/dropped_fraction", "train", "-"),
    ("eval/dropped_fraction", "eval", "o-"),
  ):
    steps, values = series(records, key)
    if steps:
      ax.plot(steps, values, style, ms=3, label=label)
  ax.set(xlabel="step", ylabel="dropped share of assignments", title="Dropped by capacity")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  fig.tight_layout()
  out["dropped_fraction.png"] = fig

  loads = expert_loads(records)
  if loads:
    fig, axes = plt.subplots(
      len(loads), 1, figsize=(9, 1.2 + 1.6 * len(loads)), squeeze=False, sharex=True
    )
    for ax, (layer, (steps, shares)) in zip(axes[:, 0], loads.items(), strict=True):
      grid = np.asarray(shares, np.float64).T  # [experts, logged steps]
      experts = grid.shape[0]
      # A record covers the steps since the previous one: cells span (previous, step].
      x = np.asarray([steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1), *steps])
      image = ax.pcolormesh(
        x,
        np.arange(experts + 1) - 0.5,
        grid,
        cmap="viridis",
        vmin=0.0,
        vmax=max(2.0 / experts, float(grid.max())),
      )
      ax.invert_yaxis()
      ax.set_ylabel(f"layer {layer}\nexpert")
      fig.colorbar(image, ax=ax, label="share")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(f"Expert load per MoE layer (balanced: {1 / experts:.3f} each)")
    fig.tight_layout()
    out["expert_load.png"] = fig
  return out


def write_plots(workdir: str, out: str | None = None) -> list[epath.Path]:
  """Writes the PNGs of `figures` for the run in `workdir`; returns their paths."""
  import matplotlib.pyplot as plt

  run = workdir_lib.resolve(workdir)
  if not (run / METRICS_FILE).exists():
    raise ValueError(
      f"--workdir={workdir} has no {METRICS_FILE}; pass the workdir of a run (moejax.main)."
    )
  records = read_metrics(run)
  if not records:
    raise ValueError(f"{run / METRICS_FILE} holds no records yet; plot after the first log step.")
  directory = workdir_lib.resolve(out) if out else run / "plots"
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  for name, fig in figures(records).items():
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    (directory / name).write_bytes(buffer.getvalue())
    written.append(directory / name)
  return written


def main(argv) -> None:
  del argv
  for path in write_plots(flags.FLAGS.workdir, flags.FLAGS.out):
    print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
