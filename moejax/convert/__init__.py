"""Checkpoints in HF's on-disk format (`config.json` + safetensors) in and out of moejax:
`python -m moejax.convert import|export` (`transfer`), the families it knows
(`families`), where each tensor goes (`layout`), the files (`safetensors_dir`), and the
directories it writes, removed when a command fails or is stopped (`output_dir`).
"""
