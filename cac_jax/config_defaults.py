"""Base experiment configuration shared by every file in configs/.

`get_base_config(task, arch, local)` returns an ml_collections ConfigDict with
- `task`: "calcium" (3 classes: background, coronary, non-coronary calcium) or "heart" (2 classes);
- `seed`: the experiment's random seed;
- `data`: `data_pipeline.config.data_config(task, local)` (sizes, sampling, augmentation);
- `model`: `cac_jax.models.config.model_config(arch, task, local)` (architecture, dtype, norm).
Training fields (optimiser, schedule, checkpoints) are added by the training issue. `local=True` is
the tiny 64 px variant that tests and smoke runs use (big_vision's `:runlocal`);
`parse_config_arg(arg)` turns the config-file argument (`--config file.py:ARG`) into that flag.
"""

from __future__ import annotations

import ml_collections

from cac_jax.models.config import model_config
from data_pipeline.config import data_config

# The config-file arguments every file in configs/ accepts: none ("file.py" or "file.py:") for the
# full configuration, "local" ("file.py:local") for the tiny 64 px variant.
CONFIG_ARGS = (None, "", "local")


def parse_config_arg(arg: str | None) -> bool:
    """Return True for "local", False for None or ""; raise ValueError for any other argument.

    Unknown arguments are rejected instead of silently giving the full 512 px configuration (a
    typo such as "runlocal" must not start a full-size run).
    """
    if arg not in CONFIG_ARGS:
        raise ValueError(
            f"unknown config argument {arg!r}: expected None or '' (full config) or 'local' "
            "(tiny 64 px variant)"
        )
    return arg == "local"


def get_base_config(task: str, arch: str, local: bool = False) -> ml_collections.ConfigDict:
    """Combine the data and model settings for `task` and `arch` into one ConfigDict."""
    config = ml_collections.ConfigDict()
    config.task = task
    config.seed = 0
    config.data = data_config(task, local)
    config.model = model_config(arch, task, local)
    return config
