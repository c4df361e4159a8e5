"""Checkpoints in HF's on-disk format (`config.json` + safetensors) in and out of moejax:
`python -m moejax.convert import|export` (`transfer`), the families it knows
(`families`), where each tensor goes (`layout`), and the files (`safetensors_dir`).
"""
