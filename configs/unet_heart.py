"""`python -m cac_jax.main --config configs/unet_heart.py --workdir /tmp/unet_heart`

UNet baseline (base width 64) for the heart silhouette.
Tiny test variant: `--config configs/unet_heart.py:local` (64 px, narrow widths).
(The training entry point `cac_jax.main` comes with the training issue.)
"""

from cac_jax.config_defaults import get_base_config


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant."""
    return get_base_config("heart", "unet", local=arg == "local")
