"""The published experiment configs: `configs/NAME.py` files with `get_config(arg)`."""
