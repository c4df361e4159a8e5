"""What every command shares, light enough to import before jax: running an absl command
with one-line errors and exit codes (`cli`), and stopping on a signal (`signals`)."""
