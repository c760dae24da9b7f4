"""The experiment configs, one file per experiment (`--config configs/NAME.py[:local]`).

Each file is loaded by path (ml_collections config_flags, `cac_jax.config_defaults.load_config_file`)
and defines `get_config(arg)`. The directory is a package only so that the wheel ships it next to
`cac_jax`: a path `configs/NAME.py` that does not exist relative to the working directory is read
from that installed copy (`cac_jax.config_defaults.resolve_config_path`).
"""
