"""Training: the steps (`steps`), a run's plan and loop (`run_plan`, `train`), workdirs and
their lock, checkpoints with checksums, metrics, fine-tuning starts (`init_from`,
`trainable`), and loading a trained model back (`loading`)."""
