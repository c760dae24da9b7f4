"""`python -m cac_jax.main --config configs/unet_heart.py --workdir /tmp/unet_heart`

UNet baseline (base width 64) for the heart silhouette.
Tiny test variant: `--config configs/unet_heart.py:local` (64 px, narrow widths).
"""

from cac_jax.config_defaults import get_base_config, parse_config_arg


def get_config(arg: str | None = None):
    """Return the experiment ConfigDict; arg "local" gives the tiny 64 px variant.

    None or "" give the full config; any other arg raises ValueError.
    """
    return get_base_config("heart", "unet", local=parse_config_arg(arg))
