"""What the tests share: NumPy references written from the papers and model cards
(`moe_reference`, `family_reference`, `hf_reference`), the dispatch harness, and small
models."""
