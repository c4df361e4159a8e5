"""The ablation runner, apart from the ablations it runs (`experiments/ablations/`), by
concern: `spec` (what an ablation is), `accounting` (parameters, FLOPs, constraints),
`run` (sweep, seeds, skip/resume), `results` (rows), `stats` (paired tests, pooled model,
verdicts, the scaling law), `report` (contrasts, summary, plots), `estimate` (wall time),
`pod` (TPU commands), `prerequisites` (experiments that start from another's runs),
`presets` (the base configs of each preset), `cli`, over `workdir` (the files). See
docs/ablations.md."""
